"""The worker process: one uvloop event loop holding HTTP streaming connections.

Its rooms, from the socket inward:

- ``process``  the process: listener, the supervisor's pipe (``ControlChannel``), drain, ``main``
- ``protocol`` one connection (``Conn``, an asyncio protocol) and its states
- ``http``     the request head parser, limits and routes (sans-IO)
- ``auth``     cross-origin rules and subscriber tokens
- ``tls``      the TLS context
- ``hub``      every connection by channel, history rings, broadcast fan-out, pings, deadlines
- ``wire``     the bytes on the wire: response heads, a message encoded per format (sans-IO)
- ``lag``      the event-loop lag sampler

Only ``service.contracts`` and ``service.config`` are shared with the other processes.
"""

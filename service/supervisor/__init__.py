"""The supervisor process: sizes, starts and keeps the workers, and speaks for them.

- ``process``   the ``Supervisor``: worker slots, broadcasts, the 1 Hz frame loop, shutdown, ``run``
- ``slot``      one worker slot: spawn, start gate, handshake, requests over its pipe, backoff
- ``plan``      the capacity plan and host warnings printed at start
- ``portcheck`` who else listens on the port
- ``control``   the control socket (JSON lines) that the sidecar and ``service.ask`` speak
- ``frames``    the 1 Hz stats FRAME from worker stats and /proc
- ``csvlog``    the CSV log for graphs
- ``screen``    the top-like live screen

The bus (ids, history, other nodes) is ``service.bus``; the worker is ``service.worker``.
"""

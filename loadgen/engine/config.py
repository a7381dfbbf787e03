"""What an engine is told: the target, how many connections, how fast; the client TLS context."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

# The longest ``EngineConfig.coalesce`` the bench and the agent take, in seconds: a delivery is
# timed up to this much late, and beyond it the timing says more about the clients than about
# the service.
MAX_COALESCE = 0.1


@dataclass
class EngineConfig:
    n: int = 0
    host: str = "127.0.0.1"
    port: int = 8888
    path: str = "/"
    concurrency: int = 100
    # Seconds a connection may wait for the response head before it counts as an error.
    head_timeout: float = 10.0
    # HTTPS: TLS to the target, its certificate checked against tls_ca (a PEM file; "" = the
    # system's CAs) and the host name.
    tls: bool = False
    tls_ca: str = ""
    # Seconds the engine lets data gather between two polls of its loop while data flows (0:
    # none). On a box shared with the server every wake-up of a client costs a context switch;
    # a delivery is timed up to this much later.
    coalesce: float = 0.0

    def target(self) -> tuple[str, int, str, bool]:
        return (self.host, self.port, self.path, self.tls)


_TLS_CONTEXTS: dict[str, ssl.SSLContext] = {}


def tls_context(ca_file: str) -> ssl.SSLContext:
    """One client context per CA file per process (a context per connection would cost ~KBs)."""
    ctx = _TLS_CONTEXTS.get(ca_file)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.set_alpn_protocols(["http/1.1"])
        _TLS_CONTEXTS[ca_file] = ctx
    return ctx

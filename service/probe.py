"""``python -m service.probe``: the container's health check. Healthy when a subscriber on
127.0.0.1:$COMET_PORT gets ``Welcome!`` — over TLS when $COMET_TLS_CERT is set — or, with
--require-token, the 401 that asks for a token (the service answered; a probe has no token)."""

from __future__ import annotations

import os
import socket
import ssl
import sys


def probe(port: int, tls: bool, timeout: float = 3.0) -> bool:
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        if tls:
            # A local liveness probe: the certificate names the public host, not 127.0.0.1.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        f = sock.makefile("rb")
        status = f.readline()
        if status.split(b" ")[1:2] == [b"401"]:
            return True
        return any(b"Welcome!" in f.readline() for _ in range(30))
    finally:
        sock.close()


def main() -> int:
    try:
        ok = probe(
            int(os.environ.get("COMET_PORT", "8888")), bool(os.environ.get("COMET_TLS_CERT"))
        )
    except (OSError, ValueError) as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

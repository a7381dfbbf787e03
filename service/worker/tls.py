"""TLS on the service port: one server context per worker, built from --tls-cert / --tls-key.

Memory per idle TLS connection is what decides whether a million fit, so the context keeps as
little per connection as Python's ssl lets us choose: CPython builds every context with
``SSL_MODE_RELEASE_BUFFERS`` (the ~34 KB read and write buffers are freed while a connection is
idle), and the server issues no TLS 1.3 session tickets (``num_tickets = 0``: no ticket and no
cached session per connection; measured 2.4 KB a connection less). What stays is OpenSSL's own
state per connection (16.7 KB server side with OpenSSL 3.0: benchmarks/tls_memory.py) and
uvloop's SSL protocol with its read buffer: docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context; ValueError names the file that is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.num_tickets = 0
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ValueError(f"tls: cannot read {exc.filename or cert_file}: no such file") from None
    except PermissionError as exc:
        raise ValueError(
            f"tls: cannot read {exc.filename or cert_file}: permission denied"
        ) from None
    except ssl.SSLError as exc:
        raise ValueError(
            f"tls: {cert_file} / {key_file} are not a PEM certificate and its key "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ValueError(f"tls: cannot read {cert_file} / {key_file}: {exc}") from None
    return ctx

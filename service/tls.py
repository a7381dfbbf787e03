"""TLS on the service port: one server context per worker, built from --tls-cert / --tls-key.

Memory per idle TLS connection is what decides whether a million fit, so the context is set up to
keep as little per connection as OpenSSL allows: CPython builds every context with
``SSL_MODE_RELEASE_BUFFERS`` (read and write buffers, ~34 KB, are freed while a connection is
idle), stateless session tickets are turned off (``OP_NO_TICKET``: no ticket keys or resumption
state per connection) and the server-side session cache is not used by the clients we serve.
docs/benchmarks.md has the measured cost.
"""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context; ValueError names the file that is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
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

"""Write a throw-away test CA and a certificate for 127.0.0.1/localhost (trustme), for TLS runs:

    .venv/bin/python benchmarks/make_test_cert.py /tmp/tls     # → ca.pem, cert.pem, key.pem
    .venv/bin/comet-bench --conns 100000 --tls-cert /tmp/tls/cert.pem --tls-key /tmp/tls/key.pem \\
        --tls-ca /tmp/tls/ca.pem

Never for production: the CA's key is thrown away, but the certificate is only as good as the
machine it was made on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import trustme


def write(out: Path) -> dict[str, Path]:
    """ca.pem, cert.pem (the chain) and key.pem in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    cert.private_key_pem.write_to_path(str(out / "key.pem"))
    with open(out / "cert.pem", "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    return {"ca": out / "ca.pem", "cert": out / "cert.pem", "key": out / "key.pem"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a throw-away test CA (ca.pem), a certificate chain for 127.0.0.1 and "
        "localhost (cert.pem) and its key (key.pem) into OUT_DIR, for TLS benchmarks. Never for "
        "production.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="made if missing")
    out = parser.parse_args(argv).out_dir
    if out.exists() and not out.is_dir():
        parser.error(f"{out}: exists and is not a directory")
    print(" ".join(str(path) for path in write(out).values()))


if __name__ == "__main__":
    main()

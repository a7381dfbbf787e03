"""benchmarks/tls_memory.py at a small size: it handshakes real OpenSSL pairs in memory and prints
what a server side keeps, and what a fresh server SSLObject costs before any handshake (the part
of the per-connection TLS floor that no option shrinks). Run here so the script cannot rot."""

from __future__ import annotations

import re

import pytest

from tests.support.service import run_benchmark


@pytest.mark.timeout(120)
def test_prints_the_server_side_and_the_fresh_object_and_the_handshake_adds_to_it() -> None:
    line = run_benchmark("tls_memory.py", "--n", "300", timeout=100)
    m = re.search(
        r"TLSv1\.3 \S+, n=300: pair ([\d,]+) B, server side ([\d,]+) B; "
        r"a fresh server SSLObject before its handshake ([\d,]+) B",
        line,
    )
    assert m, line
    pair, server, fresh = (int(g.replace(",", "")) for g in m.groups())
    # A pair holds two sides; a handshaken server side holds more than a fresh one (keys,
    # session); a fresh one is not free (OpenSSL's SSL object and the two BIOs).
    assert pair > server > fresh > 1000, line

"""What TCP_DEFER_ACCEPT does to the server socket's first round-trip time: a listener with
and without it, a client that connects and sends its request ``--delays`` seconds later, and
the accepted socket's ``rtt`` and ``rto`` as ``ss -ti`` reads them once the server's first write
(a welcome) has been acknowledged.

    .venv/bin/python benchmarks/defer_rtt.py [--delays 0,0.1,0.5,0.9] [--defer 1]

The kernel takes an accepted connection's first RTT sample from its SYN-ACK to the packet that
completes it. Without the option that is the client's ACK (the network's round trip); with it,
the first data, so a client that speaks late leaves the server's socket with a smoothed RTT of
its delay and a retransmission timeout of about three times that, until enough of the server's
writes have been acknowledged to bring them down: each acknowledgement moves the smoothed RTT an
eighth of the way (docs/benchmarks.md, "Fifty-four shares against one"). Loopback only; nothing
is left listening.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import time

ADDRESS = "127.0.0.1"


def accepted_rtt(defer: int, delay: float) -> tuple[float, int]:
    """(smoothed RTT in ms, RTO in ms) of the server's socket for a client that sends its
    request ``delay`` s after connecting, the listener deferring ``defer`` s (0: off)."""
    with socket.socket() as listener:
        listener.bind((ADDRESS, 0))
        listener.listen(8)
        if defer:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
        port = listener.getsockname()[1]
        with socket.create_connection((ADDRESS, port)) as client:
            time.sleep(delay)
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                # The service's first write (its welcome), acknowledged: the RTO then is the
                # one its next write would get.
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nWelcome!\n")
                client.recv(1024)
                time.sleep(0.25)  # the client's delayed ACK (at most 200 ms) has come
                out = subprocess.run(
                    ["ss", "-tin", "state", "established", "src", f"{ADDRESS}:{port}"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
    rtt = re.search(r"\brtt:([\d.]+)/", out)
    rto = re.search(r"\brto:(\d+)", out)
    if rtt is None or rto is None:
        raise SystemExit(f"defer_rtt: no rtt/rto in `ss -ti` output:\n{out}")
    return float(rtt.group(1)), int(rto.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description="The server socket's first RTT and RTO with and without TCP_DEFER_ACCEPT, "
        "for a client that sends its request late (loopback)."
    )
    parser.add_argument(
        "--delays",
        default="0,0.1,0.5,0.9",
        help="seconds between the client's connect and its request, comma-separated "
        "(default: %(default)s; keep them under --defer, or the kernel hands the connection "
        "over without its request)",
    )
    parser.add_argument(
        "--defer", type=int, default=1, help="TCP_DEFER_ACCEPT seconds (default: %(default)s)"
    )
    args = parser.parse_args()
    try:
        delays = [float(d) for d in args.delays.split(",")]
    except ValueError:
        parser.error(f"--delays: numbers separated by commas, got {args.delays!r}")
    if args.defer < 1 or any(d < 0 for d in delays):
        parser.error("--defer must be ≥ 1 and every delay ≥ 0")
    print(f"{'request after':>14} | {'rtt, rto: no defer':>20} | {'rtt, rto: defer':>20}")
    for delay in delays:
        cells = []
        for defer in (0, args.defer):
            rtt, rto = accepted_rtt(defer, delay)
            cells.append(f"{rtt:9.3f} ms, {rto:5d} ms")
        print(f"{delay:12.3f} s | {cells[0]:>20} | {cells[1]:>20}")


if __name__ == "__main__":
    main()

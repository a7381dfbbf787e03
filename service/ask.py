"""``python -m service.ask [--socket PATH] REQUEST...``: send JSON lines to the control socket and
print each answer (a ``watch`` prints frames until Ctrl-C). Nothing to install: the same
interpreter the service runs on."""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys

from service.config import Config, Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m service.ask", description=__doc__)
    parser.add_argument(
        "--socket",
        default=os.environ.get("COMET_CONTROL_SOCKET", Config.control_socket),
        help="the control socket (env COMET_CONTROL_SOCKET)",
    )
    parser.add_argument("request", nargs="+", help='e.g. \'{"op":"health"}\'')
    args = parser.parse_args(argv)
    lines = []
    for raw in args.request:
        try:
            json.loads(raw)
        except ValueError as exc:
            parser.error(f"not JSON: {raw!r} ({exc})")
        lines.append(raw.strip().encode() + b"\n")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(args.socket)
            s.sendall(b"".join(lines))
            reader = s.makefile("rb")
            watching = any(b'"watch"' in line for line in lines)
            for _ in itertools.count() if watching else lines:
                answer = reader.readline()
                if not answer:
                    break
                sys.stdout.write(answer.decode())
                sys.stdout.flush()
    except OSError as exc:
        print(f"python -m service.ask: {args.socket}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

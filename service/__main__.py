"""``python -m service`` / ``comet-service``: the supervisor and its workers."""

from __future__ import annotations

import logging
import sys

from service.config import parse_args


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from service.supervisor.process import run

    sys.exit(run(config, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()

"""``python -m service`` / ``comet-service``: placeholder until the supervisor lands."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from service.worker import main as worker_main

    worker_main(argv)


if __name__ == "__main__":
    main()

"""What ``ps``, ``top`` and ``htop`` show for the service's processes.

Without this every worker reads ``python -m service.worker.forkserver --report-fd 26`` (the
program that forked it) and its name in ``top`` is ``python``: 54 identical lines, none saying
which worker it is or whether it is on its way out. Like nginx's "master process" / "worker
process", each process sets its title (``/proc/PID/cmdline``, ``ps -o args``) and its name
(``/proc/PID/comm``, 15 bytes, what ``top`` and ``ps -o comm`` show) with the setproctitle
library:

    comet-service: supervisor :8888, 54 workers [--workers auto ...]   comm comet-service
    comet-service: worker 3 :8888                                      comm comet-worker 3
    comet-service: worker 3 :8888 (handing over)                       (a reload's old worker)
    comet-service: worker 3 :8888 (draining)                           (stopping)

The supervisor's title keeps its command-line flags (after the summary), as ``ps`` showed them
before, with a URL's password masked (``--bus redis://:***@host``: the title replaces the
command line ``ps`` shows every user). A load generator's engine processes keep their command
line (it names their index and source addresses) and are named ``comet-engine I``
(:func:`set_name`). A title is cosmetic: if setproctitle is missing or fails, nothing else
changes.
"""

from __future__ import annotations

import logging

log = logging.getLogger("comet.proctitle")

PREFIX = "comet-service"
COMM_LIMIT = 15  # bytes of /proc/PID/comm, without its NUL


def set_title(title: str, comm: str) -> None:
    """Set this process's title and name (``comm``, cut to 15 bytes); never raises."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a dependency; a title is not worth failing for
        return
    try:
        setproctitle.setproctitle(title)
    except Exception as exc:  # pragma: no cover - e.g. an unusual argv layout
        log.debug("cannot set the process title: %s", exc)
    set_name(comm)  # after the title: setproctitle also writes its first 15 bytes as the name


def set_name(comm: str) -> None:
    """Set only this process's name (top's column), keeping its command line; never raises."""
    try:
        import setproctitle

        setproctitle.setthreadtitle(comm[:COMM_LIMIT])
    except Exception as exc:  # pragma: no cover - as in set_title
        log.debug("cannot set the process name: %s", exc)


def supervisor_title(port: int, workers: int, args: list[str]) -> str:
    flags = f" [{' '.join(_masked(a) for a in args)}]" if args else ""
    return f"{PREFIX}: supervisor :{port}, {workers} worker{'s' if workers != 1 else ''}{flags}"


def _masked(arg: str) -> str:
    """A command-line word with a URL's password masked (``--bus redis://:***@host``)."""
    if "://" not in arg:
        return arg
    from service.bus.redis import redact  # only the supervisor: a worker never imports the bus

    flag, eq, url = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    return flag + eq + redact(url)


def worker_title(index: int, port: int, state: str = "") -> str:
    return f"{PREFIX}: worker {index} :{port}" + (f" ({state})" if state else "")


def worker_comm(index: int) -> str:
    return f"comet-worker {index}"

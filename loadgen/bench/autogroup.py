"""The kernel's autogroup of the bench's session: ``--client-autogroup-nice``.

Under autogroup scheduling (``kernel.sched_autogroup_enabled=1``, Debian's default, for processes
in the root cgroup) the kernel schedules each session as one entity. The bench and its engine
processes are one session; each of the service's workers is a session of its own. On a full CPU
the whole load generator then gets one share against one per busy worker (docs/benchmarks.md,
"Fifty-four shares against one"). The autogroup's nice value weighs that one share: -5 makes it
about three (the kernel's weights 3121 against 1024). It is the session's, so it applies to
every process of the bench's session, and the bench sets the old value back when it ends.
"""

from __future__ import annotations

from pathlib import Path

SELF = Path("/proc/self/autogroup")
ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")


def unavailable() -> str | None:
    """Why an autogroup nice value would change nothing here, or None."""
    if not SELF.exists():
        return f"this kernel has no autogroup scheduling ({SELF} is missing)"
    try:
        on = ENABLED.read_text().strip() != "0"
    except OSError:
        on = True  # the file is absent when the kernel has it always on
    if not on:
        return (
            "autogroup scheduling is off (kernel.sched_autogroup_enabled=0): each process is "
            "scheduled on its own, so use --client-nice"
        )
    return None


def read_nice(path: Path = SELF) -> int:
    """The nice value of the autogroup ``path`` names ("/autogroup-43613 nice 0")."""
    return int(path.read_text().split()[-1])


def set_nice(nice: int, path: Path = SELF) -> None:
    """Give the autogroup ``path`` names the nice value ``nice`` (a ``PermissionError`` that
    names the option when this process may not)."""
    try:
        path.write_text(f"{nice}\n")
    except PermissionError:
        raise PermissionError(
            f"--client-autogroup-nice {nice}: not permitted (a negative value needs root, "
            "CAP_SYS_NICE or a RLIMIT_NICE that allows it)"
        ) from None

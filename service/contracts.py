"""Rules every part of comet1m shares (service, admin sidecar, load generator), stated once.

A leaf module: it imports nothing of the project, so the sidecar and the supervisor can import it
without loading the worker's hot path.
"""

from __future__ import annotations

import re
from typing import TypedDict

# Channel names (docs/architecture.md, subscriber contract). Event names share the rule because
# they end up on an SSE ``event:`` line, where a newline would forge a second field. Match with
# NAME_RE.fullmatch: Python's ``$`` also matches before a trailing newline.
NAME_RULE = "[A-Za-z0-9_.:-]{1,64}"
NAME_RE = re.compile(NAME_RULE)
NAME_PATTERN = f"^{NAME_RULE}$"  # for pydantic (Rust regex: ``$`` is the end of the text)


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as UTF-8, or None.

    JSON can carry a lone surrogate (``"\\ud800"``) and Python decodes it into a ``str`` that
    ``encode()`` then refuses: every side that takes message text from JSON checks it here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"unpaired surrogate at character {exc.start}: not valid Unicode text"
    return None


# A worker's exit status when it cannot listen on the service port (EX_CONFIG): the supervisor
# stops instead of restarting it, since another try cannot succeed.
EXIT_CANNOT_LISTEN = 78


class Msg(TypedDict):
    """MSG of docs/architecture.md, the unit a worker writes to its subscribers."""

    id: int
    channel: str | None
    event: str | None
    data: str
    ts: float

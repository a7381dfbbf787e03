"""What the routes can answer besides 200, for the OpenAPI document (and schemathesis)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    detail: Any


def _doc(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


# Every route: a request head the sidecar will not read.
HEAD_ERRORS: dict[int | str, dict[str, Any]] = {
    431: _doc("more than 100 header fields, or a head over 16 KiB"),
}
TOKEN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _doc("missing or wrong bearer token"),
    **HEAD_ERRORS,
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    413: _doc("request body or data over the size cap"),
    422: _doc("the body is not valid JSON, not UTF-8, or a field is wrong (named in detail)"),
}
SERVICE_ERRORS: dict[int | str, dict[str, Any]] = {
    502: _doc("the service refused the request"),
    503: _doc("the service (or the Redis it shares) is unreachable"),
    504: _doc("the service did not answer in time"),
}
RELOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    409: _doc(
        "a reload or handover is under way already, or the TLS / token files are ones a new "
        "worker could not load (every worker serves on as it is; detail says why)"
    ),
}

"""``/healthz``: is the sidecar up, and can it reach the service? No auth (for probes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..control import ControlError
from ..deps import ControlDep
from ..responses import HEAD_ERRORS

router = APIRouter(tags=["health"], responses=HEAD_ERRORS)


@router.get("/healthz")
async def healthz(control: ControlDep) -> dict[str, Any]:
    """Always 200 while the sidecar runs (a service restart must not make probes kill it); the
    body says whether the service answers on the control socket."""
    service: dict[str, Any] = {"reachable": False, "control_socket": str(control.socket_path)}
    try:
        health = await control.health()
    except ControlError as exc:
        service["error"] = str(exc)
    else:
        service["reachable"] = True
        service["workers"] = health.get("workers")
        service["uptime_s"] = health.get("uptime_s")
    return {"status": "ok", "service": service}

"""``GET /api/cluster``: every node of a multi-node deployment (``COMET_BUS=redis://...``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import Authorized, ControlDep
from ..responses import SERVICE_ERRORS, TOKEN_ERRORS

router = APIRouter(
    prefix="/api",
    tags=["cluster"],
    dependencies=[Authorized],
    responses={**TOKEN_ERRORS, **SERVICE_ERRORS},
)


@router.get("/cluster")
async def cluster(control: ControlDep) -> dict[str, Any]:
    """Per-node summaries and their totals, as the service behind this sidecar sees them. A node
    leaves the list when its published frame expires (its ``node_ttl``). With the local bus the
    list holds this node alone; with Redis down the answer is 503 naming Redis."""
    return await control.cluster()

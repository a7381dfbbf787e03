"""``/metrics``: Prometheus text built from the latest frame."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import Authorized, ControlDep
from ..metrics import render
from ..responses import SERVICE_ERRORS, TOKEN_ERRORS

router = APIRouter(
    tags=["metrics"], dependencies=[Authorized], responses={**TOKEN_ERRORS, **SERVICE_ERRORS}
)


@router.get("/metrics", response_class=Response)
async def metrics(control: ControlDep) -> Response:
    return Response(render(await control.stats()), media_type=CONTENT_TYPE_LATEST)

"""``POST /api/reload``: replace every worker by a new process running the code and files now on
disk, each taking over its predecessor's live connections (the service's ``reload``; SIGHUP
does the same without an answer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, ValidationError

from ..control import ServiceRefused
from ..deps import Authorized, ControlDep, SettingsDep
from ..responses import RELOAD_ERRORS, SERVICE_ERRORS, TOKEN_ERRORS

router = APIRouter(
    prefix="/api",
    tags=["reload"],
    dependencies=[Authorized],
    responses={**TOKEN_ERRORS, **SERVICE_ERRORS, **RELOAD_ERRORS},
)


class ReloadOut(BaseModel):
    workers: int = Field(description="worker slots")
    reloaded: int = Field(description="slots now served by a new process")
    skipped: int = Field(description="slots not up when their turn came (restarting, stopping)")
    handed: int = Field(description="connections that moved, on the same TCP connections")
    kept: int = Field(description="connections that could not move and got the reconnect hint")
    failed: int = Field(description="slots whose handoff failed: the old process serves on")
    reconnecting: int = Field(
        description="connections a failed slot's new process had taken, told to reconnect"
    )
    seconds: float = Field(description="how long the reload took")
    slots: list[dict[str, Any]] = Field(description="each slot's outcome (docs/architecture.md)")


@router.post("/reload")
async def reload(control: ControlDep, settings: SettingsDep) -> ReloadOut:
    answer = await control.reload(timeout=settings.reload_timeout)
    try:
        return ReloadOut.model_validate(answer)
    except ValidationError:
        raise ServiceRefused("the reload answer lacks a field this sidecar knows") from None

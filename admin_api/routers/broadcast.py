"""``POST /api/broadcast``: push one message to every subscriber (or one channel's)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from service.contracts import text_problem

from ..deps import Authorized, ControlDep, SettingsDep
from ..responses import BODY_ERRORS, SERVICE_ERRORS, TOKEN_ERRORS
from ..settings import NAME_PATTERN

router = APIRouter(
    prefix="/api",
    tags=["broadcast"],
    dependencies=[Authorized],
    responses={**TOKEN_ERRORS, **BODY_ERRORS, **SERVICE_ERRORS},
)

Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN)]


class BroadcastIn(BaseModel):
    # Strict: a number or a list where a string belongs is a client bug worth a 422, not a coercion.
    model_config = ConfigDict(extra="forbid", strict=True)

    data: StrictStr = Field(description="the message; each line becomes a line on the stream")
    channel: Name | None = Field(None, description="one channel, or null for every connection")
    event: Name | None = Field(None, description="SSE event name, or null for a plain message")

    @field_validator("data")
    @classmethod
    def _text(cls, value: str) -> str:
        # JSON can carry a lone surrogate ("\\ud800"); no stream can carry it as UTF-8.
        problem = text_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class BroadcastOut(BaseModel):
    id: int = Field(description="the message id (SSE id:, long-poll id)")
    recipients: int = Field(description="connections it was written to")


@router.post("/broadcast")
async def broadcast(body: BroadcastIn, control: ControlDep, settings: SettingsDep) -> BroadcastOut:
    size = len(body.data.encode())
    if size > settings.max_message_bytes:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"data is {size} bytes, over the {settings.max_message_bytes}-byte cap "
            "(COMET_ADMIN_MAX_MESSAGE_BYTES)",
        )
    message_id, recipients = await control.broadcast(
        body.data, body.channel, body.event, timeout=settings.broadcast_timeout
    )
    return BroadcastOut(id=message_id, recipients=recipients)

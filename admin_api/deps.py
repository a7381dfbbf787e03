"""Shared dependencies, as ``Annotated`` aliases the routers put in their signatures."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from .control import ControlClient, FrameWatcher
from .settings import AdminSettings, get_settings

SettingsDep = Annotated[AdminSettings, Depends(get_settings)]


def get_control(request: Request) -> ControlClient:
    control: ControlClient = request.app.state.control
    return control


def get_watcher(request: Request) -> FrameWatcher:
    watcher: FrameWatcher = request.app.state.watcher
    return watcher


ControlDep = Annotated[ControlClient, Depends(get_control)]
WatcherDep = Annotated[FrameWatcher, Depends(get_watcher)]


def _unauthorized(detail: str, error: str | None = None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
    )


def require_token(request: Request, settings: SettingsDep) -> None:
    """401 unless ``Authorization: Bearer <token>`` carries the configured token."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise _unauthorized("expected Authorization: Bearer <token>", "invalid_request")
    expected = settings.token.get_secret_value() if settings.token is not None else ""
    # compare_digest on bytes: it rejects non-ASCII str, and a client may send anything.
    if not expected or not secrets.compare_digest(credentials.strip().encode(), expected.encode()):
        raise _unauthorized("wrong token", "invalid_token")


Authorized = Depends(require_token)

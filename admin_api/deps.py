"""Shared dependencies, as ``Annotated`` aliases the routers put in their signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .control import ControlClient, FrameWatcher
from .middleware import bearer_problem, unauthorized
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


# Declares the scheme in the OpenAPI document; the check itself is bearer_problem, shared with
# the BearerAuth middleware that runs before the body is parsed.
bearer_scheme = HTTPBearer(auto_error=False, description="the admin token (COMET_ADMIN_TOKEN)")


def require_token(
    request: Request,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> None:
    """401 unless ``Authorization: Bearer <token>`` carries the configured token."""
    expected = settings.token.get_secret_value() if settings.token is not None else ""
    problem = bearer_problem(request.headers.get("authorization"), expected)
    if problem is not None:
        raise unauthorized(*problem)


Authorized = Depends(require_token)

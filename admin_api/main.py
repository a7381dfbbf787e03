"""The app factory: ``create_app(settings)`` wires routers, error mapping and the control client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from .control import (
    ControlClient,
    FrameWatcher,
    ServiceBusy,
    ServiceConflict,
    ServiceRefused,
    ServiceTimeout,
    ServiceUnavailable,
)
from .middleware import BearerAuth, BodyCheck, HeaderCount, SecurityHeaders
from .routers import broadcast, cluster, dashboard, health, metrics, reload, stats, tokens
from .settings import AdminSettings, get_settings

LIMIT_HEADER_COUNT = 100


def _error(status_code: int, exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code, headers=headers)


def create_app(settings: AdminSettings | None = None) -> FastAPI:
    """Build the sidecar. ``settings`` defaults to the environment (``COMET_ADMIN_*``)."""
    if settings is None:
        settings = get_settings()
    if settings.token is None or not settings.token.get_secret_value():
        # __main__ resolves the token (env, file or generated) before building the app.
        raise ValueError("create_app needs settings with a token (see admin_api.token)")
    resolved = settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.control = ControlClient(resolved.control_socket, resolved.control_timeout)
        app.state.watcher = FrameWatcher(resolved.control_socket)
        try:
            yield
        finally:
            await app.state.watcher.stop()

    app = FastAPI(
        title="comet1m admin",
        summary="Live stats, metrics and broadcasts for the comet1m service",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # the docs page pulls its script from a CDN; no internet here
        redoc_url=None,
    )
    # Routes take the settings through the lru_cache'd getter; pin it to the ones given here.
    app.dependency_overrides[get_settings] = lambda: resolved

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return _error(status.HTTP_503_SERVICE_UNAVAILABLE, exc, {"Retry-After": "1"})

    async def timed_out(request: Request, exc: Exception) -> JSONResponse:
        return _error(status.HTTP_504_GATEWAY_TIMEOUT, exc)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        return _error(status.HTTP_502_BAD_GATEWAY, exc)

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return _error(status.HTTP_409_CONFLICT, exc)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        # Only where and what: echoing the input back could not even be encoded when it holds
        # a lone surrogate (a 500), and a client has its own copy.
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ServiceUnavailable, unavailable)
    # The service answered but cannot do it now (the Redis it shares with the other nodes is
    # down, it is stopping, it has no frame yet): still a 503.
    app.add_exception_handler(ServiceBusy, unavailable)
    app.add_exception_handler(ServiceTimeout, timed_out)
    app.add_exception_handler(ServiceRefused, refused)
    app.add_exception_handler(ServiceConflict, conflict)

    for module in (health, stats, cluster, broadcast, reload, tokens, metrics, dashboard):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")

    # Innermost first. JSON escaping can turn one byte of data into six characters (\u00XX).
    app.add_middleware(BodyCheck, limit=6 * settings.max_message_bytes + 4096)
    assert resolved.token is not None
    app.add_middleware(BearerAuth, token=resolved.token.get_secret_value())
    app.add_middleware(HeaderCount, limit=LIMIT_HEADER_COUNT)
    app.add_middleware(SecurityHeaders)
    return app

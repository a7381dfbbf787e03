"""The app factory: ``create_app(settings)`` wires routers, error mapping and the control client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .control import (
    BusUnavailable,
    ControlClient,
    FrameWatcher,
    ServiceRefused,
    ServiceTimeout,
    ServiceUnavailable,
)
from .routers import broadcast, cluster, dashboard, health, metrics, stats
from .settings import AdminSettings, get_settings

# Headers for every response. The token lives in the page's storage, so the page must never run
# script from anywhere but this origin; uPlot sizes its elements through style attributes.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before they are buffered in memory.

    The per-field cap (``max_message_bytes`` of ``data``) is checked by the route; this only keeps
    a multi-gigabyte upload from being read at all, whether sized or chunked."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside the route's body read: FastAPI passes HTTPException through
                    # to the exception middleware, which answers 413.
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE, f"request body over {self.limit} bytes"
                    )
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.limit} bytes"},
            status.HTTP_413_CONTENT_TOO_LARGE,
            headers={"Connection": "close"},
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class AdminServer(uvicorn.Server):
    """uvicorn that ends the open SSE streams first when it shuts down, so that a restart of the
    sidecar takes milliseconds instead of the whole graceful-shutdown timeout."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.admin_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        watcher = getattr(self.admin_app.state, "watcher", None)
        if isinstance(watcher, FrameWatcher):
            watcher.close_viewers()
        await super().shutdown(sockets)


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

    app.add_exception_handler(ServiceUnavailable, unavailable)
    # The service answered, but the Redis it shares with the other nodes did not: still a 503.
    app.add_exception_handler(BusUnavailable, unavailable)
    app.add_exception_handler(ServiceTimeout, timed_out)
    app.add_exception_handler(ServiceRefused, refused)

    for module in (health, stats, cluster, broadcast, metrics, dashboard):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")

    # JSON escaping can turn one byte of data into six characters (\u00XX).
    body_limit = 6 * settings.max_message_bytes + 4096
    app.add_middleware(BodyLimit, limit=body_limit)
    app.add_middleware(SecurityHeaders)
    return app

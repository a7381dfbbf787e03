"""Pure ASGI guards around the app, outermost first: security headers on every answer, a header
count cap, the bearer check, and the body's size and encoding.

The bearer check is here and not (only) in a route dependency because FastAPI parses a request's
body before it solves the route's dependencies: a malformed body from a stranger got a 422 with
parser details instead of the 401 it deserves. The route dependency (``deps.require_token``) stays,
so the OpenAPI document names the scheme, and it uses the same :func:`bearer_problem`.
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

# Paths behind the bearer token (everything but the probe, the page and its static files).
PROTECTED_PREFIXES = ("/api/", "/metrics")


def bearer_problem(header: str | None, expected: str) -> tuple[str, str | None] | None:
    """Why ``Authorization: <header>`` does not carry ``expected``: (detail, RFC 6750 error code),
    or None when it does."""
    if not header:
        return "missing Authorization: Bearer <token> header", None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return "expected Authorization: Bearer <token>", "invalid_request"
    # compare_digest on bytes: it rejects non-ASCII str, and a client may send anything.
    if not expected or not secrets.compare_digest(credentials.strip().encode(), expected.encode()):
        return "wrong token", "invalid_token"
    return None


def unauthorized(detail: str, error: str | None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
    )


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _answer(send: Send, response: JSONResponse) -> None:
    await response({"type": "http"}, _no_receive, send)


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


class HeaderCount:
    """431 for a request with more than ``limit`` header fields (the protocol caps their bytes)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["headers"]) > self.limit:
            await _answer(
                send,
                JSONResponse(
                    {"detail": f"more than {self.limit} request header fields"},
                    status.HTTP_431_REQUEST_HEADER_FIELDS_TOO_LARGE,
                    headers={"Connection": "close"},
                ),
            )
            return
        await self.app(scope, receive, send)


class BearerAuth:
    """401 for a protected path without the token, before anything reads the body."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            header = dict(scope["headers"]).get(b"authorization")
            problem = bearer_problem(
                header.decode("latin-1") if header is not None else None, self.token
            )
            if problem is not None:
                exc = unauthorized(*problem)
                await _answer(
                    send, JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)
                )
                return
        await self.app(scope, receive, send)


class BodyCheck:
    """The request body, read whole before the app sees it: 413 past ``limit`` bytes (sized or
    chunked, without buffering more than the limit), 422 naming the byte where it is not UTF-8
    (FastAPI would answer a bare 400). The per-field cap (``max_message_bytes`` of ``data``) is
    the route's."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _answer(send, self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client left; let the app see it
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _answer(send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            detail = {
                "type": "json_invalid",
                "loc": ["body", exc.start],
                "msg": f"request body is not valid UTF-8 (byte {exc.start})",
            }
            await _answer(
                send, JSONResponse({"detail": [detail]}, status.HTTP_422_UNPROCESSABLE_CONTENT)
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        return JSONResponse(
            {"detail": f"request body over {self.limit} bytes"},
            status.HTTP_413_CONTENT_TOO_LARGE,
            headers={"Connection": "close"},
        )

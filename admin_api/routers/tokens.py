"""``POST /api/tokens``: mint a short-lived subscriber token (JWT) for a private channel.

For the dashboard, a test or a curl session: an application normally signs its own tokens with
the same secret (README, "Private channels"). The signing key is the service's: the HS256 secret
(``COMET_ADMIN_SUBSCRIBER_SECRET_FILE``, else ``COMET_TOKEN_SECRET``) or, for RS256 / ES256, the
private key whose public half the service checks with (``COMET_ADMIN_SUBSCRIBER_PRIVATE_KEY_FILE``).
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import jwt
from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from service.contracts import ENV_TOKEN_SECRET, secret_lines

from ..deps import Authorized, SettingsDep
from ..responses import BODY_ERRORS, TOKEN_ERRORS, Problem
from ..settings import AdminSettings

router = APIRouter(
    prefix="/api",
    tags=["tokens"],
    dependencies=[Authorized],
    responses={
        **TOKEN_ERRORS,
        **BODY_ERRORS,
        503: {"model": Problem, "description": "no signing key is configured"},
    },
)

# A channel name or a glob over names: the channel characters plus * ? [ ] !
Pattern = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.:*?\[\]!-]{1,64}$")]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    channels: list[Pattern] = Field(
        min_length=1, max_length=64, description="channel names or glob patterns it may read"
    )
    ttl: StrictInt = Field(300, gt=0, description="lifetime in seconds (capped by the settings)")
    sub: StrictStr | None = Field(None, max_length=200, description="who the token is for")

    @field_validator("ttl", mode="before")
    @classmethod
    def _whole_number(cls, value: object) -> object:
        # JSON Schema's integer includes 300.0; a string stays a 422 (strict).
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class TokenOut(BaseModel):
    token: str = Field(description="the JWT: ?token=… on a subscribe URL, or a Bearer header")
    exp: int = Field(description="expiry, unix seconds; a stream is ended at this time")
    alg: str = Field(description="HS256, RS256 or ES256")


def signing_key(settings: AdminSettings) -> tuple[Any, str]:
    """The key and algorithm to sign with; 503 naming the setting when there is none."""
    try:
        if settings.subscriber_private_key_file is not None:
            from cryptography.hazmat.primitives.asymmetric import ec, rsa
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            key = load_pem_private_key(settings.subscriber_private_key_file.read_bytes(), None)
            if isinstance(key, rsa.RSAPrivateKey):
                return key, "RS256"
            if isinstance(key, ec.EllipticCurvePrivateKey):
                return key, "ES256"
            raise ValueError("not an RSA or EC private key")
        if settings.subscriber_secret_file is not None:
            text = settings.subscriber_secret_file.read_bytes()
        else:
            text = os.environ.get(ENV_TOKEN_SECRET, "").encode()
        # The first line: the others are older secrets the service still accepts (a rotation).
        secret = next(iter(secret_lines(text)), b"")
    except (OSError, ValueError) as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"cannot read the signing key: {exc}"
        ) from None
    if not secret:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="token signing is not configured: set COMET_ADMIN_SUBSCRIBER_SECRET_FILE, "
            f"{ENV_TOKEN_SECRET} or COMET_ADMIN_SUBSCRIBER_PRIVATE_KEY_FILE",
        )
    return secret, "HS256"


@router.post("/tokens")
async def mint(body: TokenIn, settings: SettingsDep) -> TokenOut:
    key, alg = signing_key(settings)
    exp = int(time.time()) + min(body.ttl, settings.subscriber_token_max_ttl)
    claims: dict[str, Any] = {"channels": body.channels, "exp": exp}
    if body.sub is not None:
        claims["sub"] = body.sub
    return TokenOut(token=jwt.encode(claims, key, algorithm=alg), exp=exp, alg=alg)

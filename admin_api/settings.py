"""Sidecar settings: ``COMET_ADMIN_*`` environment variables (pydantic-settings).

The token is deliberately not a CLI flag: a flag shows up in ``ps`` for every user of the host, an
environment variable or a 0600 file does not.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, CliSuppress, SettingsConfigDict

from service.contracts import MESSAGE_MAX_BYTES, NAME_PATTERN

__all__ = ["NAME_PATTERN", "AdminSettings", "get_settings"]


class AdminSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COMET_ADMIN_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="address the HTTP server binds")
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port")
    token: CliSuppress[SecretStr | None] = Field(
        default=None,
        description="bearer token; when unset it is read from (or generated into) token_file",
    )
    token_file: Path = Field(
        default=Path("/run/comet/admin-token"),
        description="file holding the bearer token (mode 0600)",
    )
    control_socket: Path = Field(
        default=Path("/run/comet/control.sock"), description="the supervisor's Unix control socket"
    )
    max_message_bytes: int = Field(
        default=MESSAGE_MAX_BYTES,
        gt=0,
        description="largest broadcast payload (UTF-8 bytes) accepted, else 413",
    )
    control_timeout: float = Field(
        default=5.0, gt=0, description="seconds to wait for a stats/channels/health answer"
    )
    broadcast_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds to wait for a broadcast to be written to every subscriber",
    )
    reload_timeout: float = Field(
        default=300.0,
        gt=0,
        description=(
            "seconds to wait for POST /api/reload to replace every worker; past it a 504, and "
            "the reload goes on (its progress is in /api/stats, 'reload')"
        ),
    )
    log_level: str = Field(default="info", description="debug, info, warning or error")
    subscriber_secret_file: Path | None = Field(
        default=None,
        description=(
            "file with the HS256 secret POST /api/tokens signs subscriber tokens with (the "
            "service's --token-secret-file); unset: COMET_TOKEN_SECRET, as the service reads it"
        ),
    )
    subscriber_private_key_file: Path | None = Field(
        default=None,
        description="PEM private key (RSA: RS256, EC P-256: ES256) to sign subscriber tokens",
    )
    subscriber_token_max_ttl: int = Field(
        default=3600, gt=0, description="longest lifetime in seconds POST /api/tokens grants"
    )

    @field_validator("subscriber_secret_file", "subscriber_private_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # A deployment sets every variable and leaves the unused ones empty.
        return None if value == "" else value


@lru_cache
def get_settings() -> AdminSettings:
    """The process-wide settings, read once from the environment (tests override it)."""
    return AdminSettings()

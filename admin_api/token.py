"""Where the bearer token comes from, and which addresses may be bound without one.

Order: ``COMET_ADMIN_TOKEN``; else the token file if it exists and is not empty (an operator's, or
ours from an earlier start, so a sidecar restart does not log every open dashboard out); else a
fresh random token written to the token file with mode 0600.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from .settings import AdminSettings

log = logging.getLogger("comet.admin")


class TokenError(Exception):
    """The token cannot be read or written; the message says what to do."""


@dataclass(frozen=True, slots=True)
class ResolvedToken:
    token: SecretStr
    source: str  # "environment", "file" or "generated"
    path: Path | None


def is_loopback(host: str) -> bool:
    """True when ``host`` only reaches this machine (127/8, ::1, or a name resolving to them)."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Create it 0600 from the first byte (no window where it is readable), then rename over.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case a stale tmp file existed with a wider mode
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def resolve_token(settings: AdminSettings) -> ResolvedToken:
    if settings.token is not None and settings.token.get_secret_value():
        return ResolvedToken(settings.token, "environment", None)
    path = settings.token_file
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror}") from None
    if text:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("token file %s has mode %04o; it should be 0600", path, mode)
        return ResolvedToken(SecretStr(text), "file", path)
    token = secrets.token_urlsafe(32)
    try:
        _write_private(path, token + "\n")
    except OSError as exc:
        raise TokenError(
            f"cannot write a generated token to {path}: {exc.strerror}; set "
            "COMET_ADMIN_TOKEN_FILE to a writable path (or COMET_ADMIN_TOKEN)"
        ) from None
    return ResolvedToken(SecretStr(token), "generated", path)


def token_configured(settings: AdminSettings) -> bool:
    """A token the operator chose: the environment variable, or a token file that already exists."""
    if settings.token is not None and settings.token.get_secret_value():
        return True
    try:
        return bool(settings.token_file.read_text().strip())
    except OSError:
        return False

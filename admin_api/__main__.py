"""``comet-admin`` / ``python -m admin_api``: run the sidecar with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from service.config import Parser

from .main import create_app
from .server import AdminServer, server_config
from .settings import AdminSettings
from .token import TokenError, is_loopback, resolve_token, token_configured

log = logging.getLogger("comet.admin")

DESCRIPTION = """\
comet1m admin sidecar: live stats, an SSE stream of frames, Prometheus /metrics, a dashboard at /
and authenticated broadcasts, talking to comet-service over its Unix control socket.

Every option is also an environment variable COMET_ADMIN_<OPTION> (a flag wins). The bearer token
is never a flag (flags show in `ps`): set COMET_ADMIN_TOKEN, or put it in the token file. With
neither, a random token is generated at start, written to the token file with mode 0600, and its
path (never the token) is logged. Binding an address other than loopback needs a token you
configured (COMET_ADMIN_TOKEN or an existing token file); a freshly generated one is refused.

Routes: GET /healthz (no auth); with 'Authorization: Bearer <token>': GET /api/stats,
GET /api/stats/stream (SSE), GET /api/channels, POST /api/broadcast {"data","channel","event"},
POST /api/tokens {"channels","ttl","sub"} (a subscriber token for private channels), GET /metrics.
GET / serves the dashboard, which asks for the token.
"""


# The token never comes from a flag: flags show in ``ps`` to every user of the host.
NEVER_FLAGS = ("token",)


def build_parser() -> argparse.ArgumentParser:
    return Parser(
        prog="comet-admin",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def read_settings(argv: list[str]) -> AdminSettings:
    """Flags (from AdminSettings' own fields, by pydantic-settings) over COMET_ADMIN_* over
    defaults. ValueError: a flag that must not be one; ValidationError: a bad value."""
    for arg in argv:
        name = arg.removeprefix("--").split("=", 1)[0].replace("-", "_")
        if arg.startswith("--") and name in NEVER_FLAGS:
            raise ValueError(
                f"--{name.replace('_', '-')} is never a flag (ps shows flags to every user): "
                f"set COMET_ADMIN_{name.upper()} or use the token file"
            )
    cli: CliSettingsSource[AdminSettings] = CliSettingsSource(
        AdminSettings,
        root_parser=build_parser(),
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_show_env_vars=True,
    )
    return AdminSettings(_cli_settings_source=cli(args=argv))  # type: ignore[call-arg]


def main(argv: list[str] | None = None) -> int:
    try:
        settings = read_settings(list(sys.argv[1:] if argv is None else argv))
    except ValueError as exc:  # ValidationError is one
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            exc = ValueError(f"{where}: {first['msg']}")
        print(f"comet-admin: {exc}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not is_loopback(settings.host) and not token_configured(settings):
        print(
            f"comet-admin: refusing to listen on {settings.host} (not loopback) without a "
            "configured token: set COMET_ADMIN_TOKEN or create the token file "
            f"{settings.token_file} (mode 0600)",
            file=sys.stderr,
        )
        return 2
    try:
        resolved = resolve_token(settings)
    except TokenError as exc:
        print(f"comet-admin: {exc}", file=sys.stderr)
        return 2
    if resolved.source == "generated":
        log.info("generated an admin token and wrote it to %s (mode 0600)", resolved.path)
    elif resolved.source == "file":
        log.info("admin token read from %s", resolved.path)
    else:
        log.info("admin token taken from COMET_ADMIN_TOKEN")
    settings = settings.model_copy(update={"token": resolved.token})
    log.info(
        "dashboard on http://%s:%d/ ; service control socket %s",
        settings.host,
        settings.port,
        settings.control_socket,
    )
    app = create_app(settings)
    config = server_config(app, settings.host, settings.port, settings.log_level.lower())
    AdminServer(config, app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

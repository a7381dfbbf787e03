"""``comet-admin`` as a process: --help, token file generation (0600), the loopback rule."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from admin_api.settings import AdminSettings
from admin_api.token import is_loopback, resolve_token, token_configured
from tests.support.service import run_module

from .processes import Sidecar

pytestmark = pytest.mark.filterwarnings("error")


def run_admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COMET_ADMIN_")}
    return run_module("admin_api", *args, env={**full_env, **(env or {})}, timeout=30)


def test_help_explains_the_options() -> None:
    result = run_admin("--help")
    assert result.returncode == 0
    for word in (
        "--host",
        "--port",
        "--control-socket",
        "--token-file",
        "--max-message-bytes",
        "COMET_ADMIN_TOKEN",
        "0600",
        "loopback",
        "/api/broadcast",
        "/metrics",
    ):
        assert word in result.stdout, word
    assert "--token " not in result.stdout  # the token is never a flag


def test_generated_token_file_is_0600_and_not_logged(short_dir: Path) -> None:
    token_file = short_dir / "sub" / "admin-token"
    with Sidecar(
        short_dir, short_dir / "nowhere.sock", token=None, COMET_ADMIN_TOKEN_FILE=str(token_file)
    ) as admin:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert admin.token == token
        ok = httpx.get(admin.url + "/api/channels", headers=admin.auth)
        assert ok.status_code == 503  # authenticated; the service is simply not there
        assert "nowhere.sock" in ok.json()["detail"]
        assert (
            httpx.get(
                admin.url + "/api/channels", headers={"Authorization": "Bearer x"}
            ).status_code
            == 401
        )
    log = admin.log_path.read_text()
    assert str(token_file) in log
    assert token not in log


def test_existing_token_file_is_reused(short_dir: Path) -> None:
    token_file = short_dir / "admin-token"
    token_file.write_text("operator-chosen-token\n")
    token_file.chmod(0o600)
    settings = AdminSettings(token_file=token_file)
    resolved = resolve_token(settings)
    assert resolved.source == "file"
    assert resolved.token.get_secret_value() == "operator-chosen-token"
    assert token_configured(settings)


def test_unwritable_token_file_is_a_clear_error(short_dir: Path) -> None:
    blocker = short_dir / "file"
    blocker.write_text("")
    # A path below a regular file cannot be read; one in /proc cannot be written, even by root.
    for path, says in (
        (blocker / "admin-token", "cannot read token file"),
        (Path("/proc/comet-admin-token"), "cannot write a generated token"),
    ):
        result = run_admin(env={"COMET_ADMIN_TOKEN_FILE": str(path), "COMET_ADMIN_PORT": "0"})
        assert result.returncode == 2
        assert says in result.stderr and str(path) in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_non_loopback_without_token_is_refused(short_dir: Path, host: str) -> None:
    token_file = short_dir / "admin-token"
    result = run_admin(
        "--host", host, "--port", "0", env={"COMET_ADMIN_TOKEN_FILE": str(token_file)}
    )
    assert result.returncode == 2
    assert "refusing to listen" in result.stderr and host in result.stderr
    assert not token_file.exists()  # refused before generating anything


def test_non_loopback_with_a_configured_token_is_allowed(short_dir: Path) -> None:
    # Bind the unspecified address (every interface; this host has no other exposure in CI),
    # with a configured token: it must start and serve.
    with Sidecar(
        short_dir, short_dir / "nowhere.sock", token="configured-token", COMET_ADMIN_HOST="0.0.0.0"
    ) as admin:
        assert httpx.get(admin.url + "/healthz").status_code == 200


def test_bad_settings_exit_2_with_the_field_name() -> None:
    result = run_admin("--port", "70000")
    assert result.returncode == 2
    assert "port" in result.stderr and "Traceback" not in result.stderr
    result = run_admin(env={"COMET_ADMIN_MAX_MESSAGE_BYTES": "lots"})
    assert result.returncode == 2
    assert "max_message_bytes" in result.stderr


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected

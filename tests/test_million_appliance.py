"""benchmarks/million_appliance.py refuses at its start what would fail it later: no appliance
to drive (a clear line, no traceback, no report), and a dashboard it cannot time because Chromium
or Playwright is missing (found before the ramp, not after a 20-minute ramp and hold)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import million_appliance
from tests.support import browser
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_without_an_appliance_it_says_so_and_writes_no_report(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("t" * 32 + "\n")
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "million_appliance.py"),
            *("--out", str(out), "--dashboard-seconds", "0"),
            *("--admin-url", f"http://127.0.0.1:{free_port()}"),
            *("--admin-token-file", str(token)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "million_appliance: no admin API at http://127.0.0.1:" in res.stderr, res.stderr
    assert "deploy the appliance first" in res.stderr, res.stderr
    assert not (out / "bench.json").exists()


def test_a_missing_browser_stops_it_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    assert million_appliance.browser_missing() == (
        f"{tmp_path / 'no-chromium'} is not installed (apt-get install chromium)"
    )
    # Stopped before anything is read or reached: the admin token file does not exist either.
    argv = ["million_appliance.py", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", [*argv, "--admin-token-file", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as stopped:
        million_appliance.main()
    assert str(stopped.value).startswith(
        "million_appliance: the dashboard is timed in Chromium: "
    ), stopped.value
    assert "or --dashboard-seconds 0 for a run without it" in str(stopped.value)
    assert not (tmp_path / "out").exists()

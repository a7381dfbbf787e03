"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), end to end:
real service, real sidecar process, real ``curl -N`` subscribers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.browser import launch, needs_chromium

from .conftest import TOKEN, ThreadedServer, make_settings
from .fake_control import FakeControl
from .processes import CurlClients, Sidecar, real_service, wait_for

pytestmark = [
    pytest.mark.browser,
    needs_chromium,
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (./dev test)"),
]


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            yield tab
            assert errors == [], f"JavaScript errors on the page: {errors}"
            context.close()
        finally:
            browser.close()


def screenshot(page, name: str) -> None:
    """Kept when COMET_SCREENSHOT_DIR is set (for looking at the page during development)."""
    target = os.environ.get("COMET_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / name), full_page=True)


def login(page, url: str, token: str) -> None:
    page.goto(url + "/")
    page.fill("#token-input", token)
    page.click("#token-save")
    page.wait_for_selector("#status[data-state=live]", timeout=20_000)


def shown_conns(page) -> str:
    return str(page.get_attribute("#conns", "data-value"))


def test_dashboard_end_to_end_with_the_real_service(short_dir: Path, page) -> None:
    with real_service(short_dir) as service, Sidecar(short_dir, service.control_path) as admin:
        assert admin.token is not None
        login(page, admin.url, admin.token)
        wait_for(lambda: shown_conns(page) == "0", 15, "0 connections on the page")
        assert page.locator("#workers tbody tr").count() == 1

        with CurlClients(short_dir, f"http://127.0.0.1:{service.port}/", 4) as curls:
            wait_for(lambda: shown_conns(page) == "4", 20, "4 connections on the page", every=0.25)
            wait_for(lambda: all("Welcome!" in t for t in curls.texts()), 10, "welcome lines")
            cells = page.locator("#workers tbody tr td").all_inner_texts()
            # The per-worker table follows the stream too, with each worker's state and restarts.
            assert cells[2:5] == ["up", "0", "4"], cells
            # Memory is drawn from 0, not auto-scaled around a few kB of noise.
            assert page.evaluate("charts['chart-mem'].plot.scales.y.min") == 0

            page.fill("#bc-data", "hello from chromium")
            page.click("#bc-send")
            page.wait_for_selector("#bc-result.ok", timeout=15_000)
            assert "to 4 connections" in page.inner_text("#bc-result")
            wait_for(
                lambda: all("hello from chromium\n" in t for t in curls.texts()),
                10,
                "the broadcast on every curl -N client",
            )

            # A reload from the page: the worker replaced, the four curl streams moved on their
            # TCP connections (each curl still running and getting a message after it).
            pid = cells[1]
            page.click("#reload-send")
            page.wait_for_selector("#reload-result.ok", timeout=30_000)
            assert page.inner_text("#reload-result").startswith(
                "1 of 1 workers replaced, 4 connections moved"
            ), page.inner_text("#reload-result")
            wait_for(
                lambda: page.locator("#workers tbody tr td").all_inner_texts()[1] != pid,
                10,
                "the new worker's pid in the table",
            )
            page.wait_for_selector("#reload-state[data-running=false]", timeout=10_000)
            assert "1 of 1 workers, 4 connections moved" in page.inner_text("#reload-state")
            page.fill("#bc-data", "after the reload")
            page.click("#bc-send")
            wait_for(
                lambda: all("after the reload\n" in t for t in curls.texts()),
                10,
                "a broadcast after the reload on every curl -N client",
            )
            assert all(p.poll() is None for p in curls.procs)  # no stream ended
            page.wait_for_timeout(1500)  # a couple more frames so the charts have lines
            screenshot(page, "dashboard-live.png")

        wait_for(lambda: shown_conns(page) == "0", 20, "connections back to 0", every=0.25)

        # A channel name the service would refuse is shown as an error, not sent.
        page.fill("#bc-data", "x")
        page.fill("#bc-channel", "has space")
        page.evaluate("document.getElementById('broadcast').noValidate = true")
        page.click("#bc-send")
        page.wait_for_selector("#bc-result.bad", timeout=10_000)
        assert "422" in page.inner_text("#bc-result")


def test_dashboard_token_prompt_and_service_restart(short_dir: Path, page) -> None:
    fake = FakeControl(short_dir / "control.sock", workers=3, interval=0.3).start()
    try:
        fake.set_conns(10, 20, 30)
        with ThreadedServer(create_app_for(fake)) as admin:
            page.goto(admin.url + "/")
            page.wait_for_selector("#token-input", state="visible")
            page.fill("#token-input", "wrong")
            page.click("#token-save")
            page.wait_for_selector("#token-error:has-text('refused')", timeout=10_000)

            login(page, admin.url, TOKEN)
            wait_for(lambda: shown_conns(page) == "60", 10, "60 connections")
            assert page.locator("#workers tbody tr").count() == 3
            # The token survives a reload (sessionStorage), without asking again.
            page.reload()
            page.wait_for_selector("#status[data-state=live]", timeout=10_000)

            fake.stop()
            page.wait_for_selector("#status[data-state=down]", timeout=15_000)
            assert str(fake.path) in page.inner_text("#status")
            screenshot(page, "dashboard-down.png")
            fake.set_conns(1, 2, 3)
            fake.start()
            page.wait_for_selector("#status[data-state=live]", timeout=15_000)
            wait_for(lambda: shown_conns(page) == "6", 10, "6 connections after the restart")

            page.click("#forget")
            page.wait_for_selector("#token-input", state="visible")
            assert page.evaluate("sessionStorage.length + localStorage.length") == 0
    finally:
        fake.close()


def create_app_for(fake: FakeControl):
    from admin_api.main import create_app

    return create_app(make_settings(fake.path))

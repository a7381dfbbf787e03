"""Cross-origin subscribers in a real headless Chromium: a page served from another port opens an
``EventSource`` to the real service (with ``withCredentials`` against an explicit origin list),
receives broadcasts, and resumes after every worker is killed."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from benchmarks.make_test_cert import write
from tests.support.browser import launch, needs_chromium
from tests.support.net import free_port, wait_for
from tests.support.service import Service

pytestmark = [
    pytest.mark.browser,
    needs_chromium,
]

PAGE = """<!doctype html><html><body><script>
window.got = []; window.opened = 0; window.errors = 0; window.resets = 0;
const es = new EventSource(%(url)s, {withCredentials: %(creds)s});
es.onopen = () => { window.opened += 1; };
es.onerror = () => { window.errors += 1; window.state = es.readyState; };
es.onmessage = (e) => { window.got.push([Number(e.lastEventId), e.data]); };
es.addEventListener('reset', () => { window.resets += 1; });
</script></body></html>"""


class PageServer:
    """Serves one HTML page on its own port: another origin than the service."""

    def __init__(self, html: str, port: int = 0) -> None:
        body = html.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw)
        try:
            yield b
        finally:
            b.close()


def page_html(svc: Service, creds: bool, scheme: str = "http") -> str:
    url = f"{scheme}://localhost:{svc.port}/sub/xo?format=sse"
    return PAGE % {"url": repr(url), "creds": "true" if creds else "false"}


def published(svc: Service, data: str) -> int:
    answer = svc.ask({"op": "broadcast", "data": data, "channel": "xo"})
    assert answer["ok"], answer
    return int(answer["id"])


def subscribe_and_resume_after_a_crash(svc: Service, tab: Any, origin: str) -> None:
    """The page at ``origin`` subscribes, gets three messages; every worker is killed: the
    browser reconnects (with Last-Event-ID, across origins) and gets what was published while
    it was away, then live messages — each once, in order."""
    tab.goto(origin + "/")
    tab.wait_for_function("window.opened >= 1", timeout=15_000)
    wait_for(lambda: svc.ask({"op": "channels"})["channels"].get("xo") == 1, 10, "subscriber")
    ids = [published(svc, f"m{i}") for i in range(3)]
    tab.wait_for_function("window.got.length >= 3", timeout=10_000)
    health = svc.health()
    assert health is not None
    for pid in health["pids"]:
        os.kill(pid, signal.SIGKILL)
    ids += [published(svc, f"m{i}") for i in range(3, 5)]
    svc.wait_up(2)
    tab.wait_for_function("window.got.length >= 5", timeout=20_000)
    wait_for(lambda: svc.ask({"op": "channels"})["channels"].get("xo") == 1, 10, "resubscribed")
    ids.append(published(svc, "m5"))
    tab.wait_for_function("window.got.length >= 6", timeout=10_000)
    got = tab.evaluate("window.got")
    assert got == [[i, f"m{n}"] for n, i in enumerate(ids)]
    assert tab.evaluate("window.opened") >= 2 and tab.evaluate("window.resets") == 0


def test_a_page_of_another_origin_subscribes_and_resumes_after_a_crash(
    tmp_path: Path, browser: Any
) -> None:
    svc = Service(tmp_path, "--workers", "2", "--sse-retry-ms", "300")
    try:
        svc.wait_up(2)
        with PageServer(page_html(svc, creds=False)) as site:
            subscribe_and_resume_after_a_crash(svc, browser.new_page(), site.origin)
    finally:
        svc.stop()


def test_with_credentials_against_an_explicit_origin(tmp_path: Path, browser: Any) -> None:
    # The page's origin must be known before the service starts: reserve the port first.
    page_port = free_port()
    allowed_origin = f"http://127.0.0.1:{page_port}"
    svc = Service(tmp_path, "--workers", "1", "--cors-origins", allowed_origin)
    try:
        svc.wait_up(1)
        html = page_html(svc, creds=True)
        with PageServer(html, page_port) as allowed, PageServer(html) as other:
            tab = browser.new_page()
            tab.goto(allowed.origin + "/")
            tab.wait_for_function("window.opened >= 1", timeout=15_000)
            published(svc, "hello")
            tab.wait_for_function("window.got.length >= 1", timeout=10_000)
            assert tab.evaluate("window.got")[0][1] == "hello"
            # A page of an origin not in the list: the browser refuses the stream for good.
            bad = browser.new_page()
            bad.goto(other.origin + "/")
            bad.wait_for_function("window.errors >= 1 && window.state === 2", timeout=15_000)
            assert bad.evaluate("window.opened") == 0
    finally:
        svc.stop()


def test_a_page_subscribes_over_https_and_resumes_after_a_crash(
    tmp_path: Path, browser: Any
) -> None:
    """Chromium's own TLS (BoringSSL) against the worker's record layer: the stream is sealed by
    the worker after the handshake (tls_offloaded_total), resumes after every worker is
    killed, and loses nothing."""
    pki = write(tmp_path / "pki")
    svc = Service(
        tmp_path, "--workers", "2", "--sse-retry-ms", "300",
        "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
    )  # fmt: skip
    try:
        # With the first frame out: a stats question before it is answered not_ready, and the
        # whole test can take less than the supervisor's first second.
        svc.wait_up(2, with_frame=True)
        with PageServer(page_html(svc, creds=False, scheme="https")) as site:
            context = browser.new_context(ignore_https_errors=True)  # the test CA is not its
            subscribe_and_resume_after_a_crash(svc, context.new_page(), site.origin)
            context.close()
        # The resumed stream, in the next frame (the killed workers' counts died with them).
        wait_for(
            lambda: svc.ask({"op": "stats"})["frame"]["totals"]["tls_offloaded_total"] >= 1,
            10,
            "the resumed stream counted as offloaded",
        )
    finally:
        svc.stop()

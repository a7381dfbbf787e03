"""Debian's Chromium for the browser tests, launched one way everywhere (Playwright drives it)."""

from __future__ import annotations

import os
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Put on every test that needs the browser; ./dev test installs it.
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (./dev test)"
)


def launch(pw: Any) -> Any:
    """A headless Chromium from a ``sync_playwright()`` context."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

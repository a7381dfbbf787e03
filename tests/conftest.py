"""Fixtures every suite shares; the helpers behind them are in :mod:`tests.support`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import short_dir as _short_dir


@pytest.fixture
def short_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh folder under /tmp for tests that put Unix sockets in it (see ``short_dir``)."""
    with _short_dir(f"c1m-{request.node.name[:20]}-") as path:
        yield path

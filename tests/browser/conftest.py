"""Browser fixtures: Debian's chromium driven by Playwright for Python (never
`playwright install`), one browser for the session, a fresh context per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.site import CHROMIUM, CHROMIUM_ARGS, Site


@pytest.fixture(scope="session")
def site(pg_dsn: str) -> Iterator[Site]:
    s = Site(pg_dsn, verify_email=True, attempts_per_ip=100_000, attempts_per_account=1_000,
             max_devices=2)
    yield s
    s.close()


# Module scope, not session: Playwright's sync API keeps its event loop set as the main
# thread's running loop while it is open, and every async test after it then fails
# ("Runner.run() cannot be called from a running event loop"). Closed with the module,
# the tests that follow run on loops of their own.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium fonts-noto-cjk)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()

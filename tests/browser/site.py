"""A gateway with the console, running on its own event loop in a thread, for browser
tests that drive it with Playwright's sync API (one browser for the whole session)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from tests import console_client as cc
from tests.gateway import Harness

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


class Site:
    def __init__(self, dsn: str, **accounts: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="site", daemon=True)
        self.thread.start()
        self.h: Harness = self.run(cc.start(dsn, **accounts))
        self.url = self.h.url
        self.console = cc.console_of(self.h)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def code_for(self, email: str) -> str:
        code = self.console.mailer.last_code(email)
        assert code, f"no code was sent to {email}"
        return code

    def flush(self) -> None:
        self.run(self.h.flush())

    def close(self) -> None:
        try:
            self.run(self.h.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

"""A browser-like HTTP client for console tests: cookies (on 127.0.0.1), the Origin a
browser sends, and the forms' CSRF tokens read from the pages."""

from __future__ import annotations

import re
import secrets
from typing import Any

import aiohttp

from tests.gateway import Harness

FAST_ARGON2 = {"argon2_memory_kib": 1024, "argon2_time_cost": 1}
PASSWORD = "correct horse battery"


def console_of(h: Harness) -> Any:
    assert h.worker is not None and h.worker.gw is not None
    return next(a for a in h.worker.gw.apis if hasattr(a, "mailer"))


async def start(pg_dsn: str, **accounts: Any) -> Harness:
    return await Harness().start(pg_dsn, accounts={**FAST_ARGON2, **accounts})


def new_email() -> str:
    return f"u{secrets.token_hex(5)}@example.com"


class Browser:
    def __init__(self, h: Harness, origin: str | None = None) -> None:
        self.h = h
        self.origin = h.url if origin is None else origin
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""
        self.last = ""

    async def close(self) -> None:
        await self.http.close()

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        hdrs = {"Origin": self.origin} if self.origin else {}
        hdrs.update(extra or {})
        return hdrs

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        r = await self.http.get(self.h.url + path, **kw)
        text = await r.text()
        m = re.search(r'name="csrf" value="([^"]*)"', text)
        if m:
            self.csrf = m.group(1)
        self.last = text
        return r

    async def post(self, path: str, data: dict[str, str] | None = None, *, csrf: bool = True,
                   headers: dict[str, str] | None = None, **kw: Any) -> aiohttp.ClientResponse:
        form = dict(data or {})
        if csrf:
            form.setdefault("csrf", self.csrf)
        r = await self.http.post(self.h.url + path, data=form, headers=self._headers(headers), **kw)
        text = await r.text()
        m = re.search(r'name="csrf" value="([^"]*)"', text)
        if m:
            self.csrf = m.group(1)
        self.last = text
        return r

    def cookie(self, name: str) -> str | None:
        for c in self.http.cookie_jar:
            if c.key == name:
                return c.value
        return None

    async def register(self, email: str, password: str = PASSWORD, invite: str = "",
                       verify: bool = True) -> aiohttp.ClientResponse:
        await self.get("/console/register")
        r = await self.post("/console/register", {"email": email, "password": password, "invite": invite})
        if verify and r.url.path == "/console/verify":
            code = console_of(self.h).mailer.last_code(email)
            r = await self.post("/console/verify", {"code": code})
        return r

    async def login(self, email: str, password: str = PASSWORD) -> aiohttp.ClientResponse:
        await self.get("/console/login")
        return await self.post("/console/login", {"email": email, "password": password})

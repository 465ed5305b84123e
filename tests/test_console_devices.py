"""The Devices page: console sessions against the device limit (revoke any), and the
addresses the user's keys were used from, in the limit's window against the limit and
over the last requests; never another user's."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import asyncpg

from tests import console_client as cc
from tests.console_client import Browser


async def _key(b: Browser) -> str:
    await b.get("/console/keys")
    r = await b.post("/console/keys", {"name": "k", "cap": ""})
    assert r.status == 200
    return re.search(r'data-testid="key-secret">([^<]+)<', b.last).group(1)


async def _fund(h, email: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(h.dsn)
    try:
        await conn.execute("UPDATE users SET balance_nano = 10000000000 WHERE email = $1", email)
    finally:
        await conn.close()


async def _chat(h, secret: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(100):  # the new balance reaches the gateway's cache on its next poll
            r = await s.post(h.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            await r.read()
            if r.status == 200:
                return
            assert r.status == 402
            import asyncio

            await asyncio.sleep(0.05)
        raise AssertionError("the key never answered")


async def test_sessions_and_addresses_against_their_limits(pg_dsn: str) -> None:
    h = await cc.Harness().start(pg_dsn, accounts={**cc.FAST_ARGON2, "verify_email": False,
                                                   "max_devices": 3},
                                 limits={"user_max_ips": 4}, server={"log_client_ip": True})
    a, a2, other = Browser(h), Browser(h), Browser(h)
    try:
        email = cc.new_email()
        await a.register(email)
        await a2.login(email)
        await other.register(cc.new_email())
        await _fund(h, email)
        await _chat(h, await _key(a))
        await h.flush()
        r = await a.get("/console/account/devices")
        assert r.status == 200
        assert len(re.findall(r'data-testid="session"', a.last)) == 2
        assert "of at most 3" in a.last
        assert re.search(r'data-testid="address-window"><td><code>127\.0\.0\.1</code>', a.last)
        assert re.search(r'data-testid="address-recent"><td><code>127\.0\.0\.1</code>', a.last)
        assert "1 of at most 4 distinct addresses in the last 5 minutes" in a.last
        # The account page lists the sessions too, and links here.
        await a.get("/console/account")
        assert len(re.findall(r'data-testid="session"', a.last)) == 2
        assert 'href="/console/account/devices"' in a.last
        # Another user sees neither the sessions nor the addresses.
        await other.get("/console/account/devices")
        assert len(re.findall(r'data-testid="session"', other.last)) == 1
        assert "address-window" not in other.last and "address-recent" not in other.last
        # Revoking the other browser from this page comes back to it.
        await a.get("/console/account/devices")
        sid = [s for s in re.findall(r'data-session-id="(\d+)"', a.last)]
        mine = re.search(r'data-session-id="(\d+)"[^<]*<span><strong>[^<]*</strong> <span class="tag ok"', a.last)
        victim = next(s for s in sid if mine is None or s != mine.group(1))
        r = await a.post(f"/console/account/sessions/{victim}/revoke", {"back": "/console/account/devices"})
        assert r.status == 200 and r.url.path == "/console/account/devices"
        assert len(re.findall(r'data-testid="session"', a.last)) == 1
        r = await a2.get("/console/keys")
        assert r.url.path == "/console/login"
    finally:
        for b in (a, a2, other):
            await b.close()
        await h.stop()


async def test_without_logged_addresses_the_devices_page_shows_the_limiters_view(pg_dsn: str) -> None:
    h = await cc.Harness().start(pg_dsn, accounts={**cc.FAST_ARGON2, "verify_email": False,
                                                   "low_balance_check_s": 0},
                                 limits={"user_max_ips": 3})
    b = Browser(h)
    try:
        email = cc.new_email()
        await b.register(email)
        conn = await asyncpg.connect(h.dsn)
        try:
            await conn.execute("UPDATE users SET balance_nano = 10000000000 WHERE email = $1", email)
        finally:
            await conn.close()
        await b.get("/console/keys")
        await b.post("/console/keys", {"name": "k", "cap": ""})
        secret = re.search(r'data-testid="key-secret">([^<]+)<', b.last).group(1)
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 10
            while True:  # the funds reach the gateway's cache on its next poll
                r = await s.post(h.url + "/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {secret}"},
                                 json={"model": "gpt-4o-mini",
                                       "messages": [{"role": "user", "content": "hi"}]})
                await r.read()
                if r.status == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        assert r.status == 200
        await b.get("/console/account/devices")
        assert "1 of at most 3 distinct addresses" in b.last
        assert re.search(r'data-testid="address-window"><td><code>127\.0\.0\.1</code>', b.last)
        assert "does not record the address" in b.last and "address-recent" not in b.last
    finally:
        await b.close()
        await h.stop()

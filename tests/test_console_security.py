"""Hostile tests of the console's accounts and sessions, over real HTTP on loopback:
session fixation, CSRF and Origin, cookie flags, throttling, the device limit, and
sessions that end with a reason."""

from __future__ import annotations

import re

import asyncpg
import pytest

from tests import console_client as cc
from tests.console_client import Browser


@pytest.fixture
async def h(pg_dsn: str):
    h = await cc.start(pg_dsn, attempts_per_ip=1000, attempts_per_account=1000)
    yield h
    await h.stop()


@pytest.fixture
async def browsers(h):
    made: list[Browser] = []

    def make(**kw) -> Browser:
        b = Browser(h, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


async def test_login_issues_a_new_token_and_ignores_a_planted_one(h, browsers) -> None:
    email = cc.new_email()
    a = browsers()
    await a.register(email)
    victim = browsers()
    # An attacker plants a session cookie of their own choosing: it is never accepted.
    victim.http.cookie_jar.update_cookies({"tw_session": "planted-by-attacker"},
                                          response_url=__import__("yarl").URL(h.url))
    r = await victim.get("/console", allow_redirects=False)
    assert r.status == 303 and r.headers["location"].startswith("/console/login")
    await victim.login(email)
    after = victim.cookie("tw_session")
    assert after and after != "planted-by-attacker"
    # Logging in again in the same browser replaces the token; the old one is dead.
    await victim.login(email)
    again = victim.cookie("tw_session")
    assert again != after
    stale = browsers()
    stale.http.cookie_jar.update_cookies({"tw_session": after},
                                         response_url=__import__("yarl").URL(h.url))
    r = await stale.get("/console", allow_redirects=False)
    assert r.status == 303


async def test_only_the_token_hash_is_stored(h, browsers, pg_dsn) -> None:
    b = browsers()
    await b.register(cc.new_email())
    token = b.cookie("tw_session")
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT token_hash FROM console_sessions")
    finally:
        await conn.close()
    assert token and all(token.encode() not in bytes(r["token_hash"]) for r in rows)
    import hashlib
    assert hashlib.sha256(token.encode()).digest() in {bytes(r["token_hash"]) for r in rows}


async def test_unsafe_requests_need_the_csrf_token_and_this_origin(h, browsers) -> None:
    b = browsers()
    await b.register(cc.new_email())
    await b.get("/console/account")
    good = b.csrf
    # No token.
    r = await b.post("/console/account/prefs", {"tz": "Asia/Shanghai"}, csrf=False)
    assert r.status == 403
    # Another session's token.
    other = browsers()
    await other.register(cc.new_email())
    r = await b.post("/console/account/prefs", {"tz": "Asia/Shanghai", "csrf": other.csrf})
    assert r.status == 403
    # The right token from another site.
    b.origin = "http://evil.example"
    r = await b.post("/console/account/prefs", {"tz": "Asia/Shanghai", "csrf": good})
    assert r.status == 403
    # No Origin and no Referer at all.
    b.origin = ""
    r = await b.post("/console/account/prefs", {"tz": "Asia/Shanghai", "csrf": good})
    assert r.status == 403
    b.origin = h.url
    r = await b.post("/console/account/prefs", {"tz": "Asia/Shanghai", "csrf": good})
    assert r.status == 200 and "Asia/Shanghai" in b.last
    # Before login: the double-submit token guards the login and sign-up forms too.
    anon = browsers()
    await anon.get("/console/login")
    r = await anon.post("/console/login", {"email": "x@example.com", "password": "x" * 10,
                                           "csrf": "forged"})
    assert r.status == 403


async def test_logout_is_a_post(h, browsers) -> None:
    b = browsers()
    await b.register(cc.new_email())
    r = await b.get("/console/logout", allow_redirects=False)
    assert r.status == 405
    r = await b.get("/console", allow_redirects=False)
    assert r.status == 200
    await b.post("/console/logout")
    r = await b.get("/console", allow_redirects=False)
    assert r.status == 303


async def test_cookie_flags(h, browsers) -> None:
    b = browsers()
    email = cc.new_email()
    await b.register(email)
    await b.get("/console/login")
    r = await b.post("/console/login", {"email": email, "password": cc.PASSWORD},
                     allow_redirects=False)
    cookie = next(v for k, v in r.raw_headers if k.lower() == b"set-cookie" and b"tw_session=" in v)
    assert b"HttpOnly" in cookie and b"SameSite=Lax" in cookie and b"Path=/" in cookie
    assert b"Secure" not in cookie  # plain HTTP on loopback
    # Behind a TLS proxy (trusted: loopback), the cookie is Secure with the __Host- prefix.
    tls = browsers()
    hdrs = {"X-Forwarded-Proto": "https"}
    r = await tls.http.get(h.url + "/console/login", headers=hdrs)
    pre_cookie = next(v for k, v in r.raw_headers if k.lower() == b"set-cookie" and b"tw_csrf=" in v)
    assert b"Secure" in pre_cookie
    pre = pre_cookie.split(b";")[0].split(b"=", 1)[1].decode()
    r = await tls.http.post(h.url + "/console/login",
                            headers={**hdrs, "Origin": h.url, "Cookie": f"tw_csrf={pre}"},
                            data={"email": email, "password": cc.PASSWORD, "csrf": pre},
                            allow_redirects=False)
    cookie = next(v for k, v in r.raw_headers if k.lower() == b"set-cookie" and b"tw_session=" in v)
    assert cookie.startswith(b"__Host-tw_session=")
    assert b"Secure" in cookie and b"HttpOnly" in cookie and b"Path=/" in cookie
    assert b"Domain" not in cookie


async def test_pages_carry_security_headers(h, browsers) -> None:
    b = browsers()
    r = await b.get("/console/login")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"


async def test_device_limit_signs_out_the_oldest_which_is_told_why(h, browsers) -> None:
    email = cc.new_email()
    first = browsers()
    await first.register(email)
    second, third = browsers(), browsers()
    await second.login(email)
    r = await first.get("/console", allow_redirects=False)
    assert r.status == 200  # two devices: both in
    r = await third.login(email)
    assert r.status == 200 and r.url.path == "/console"  # never refused
    r = await first.get("/console")
    assert r.url.path == "/console/login"
    assert "another device" in first.last
    assert (await second.get("/console", allow_redirects=False)).status == 200
    await third.get("/console/account")
    assert third.last.count('data-testid="session"') == 2


async def test_per_user_device_override(h, browsers, pg_dsn) -> None:
    email = cc.new_email()
    bs = [browsers() for _ in range(3)]
    await bs[0].register(email)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE users SET max_devices = 3 WHERE email = $1", email)
    finally:
        await conn.close()
    for b in bs[1:]:
        await b.login(email)
    for b in bs:
        assert (await b.get("/console", allow_redirects=False)).status == 200


async def test_password_change_ends_the_other_sessions(h, browsers) -> None:
    email = cc.new_email()
    a, b = browsers(), browsers()
    await a.register(email)
    await b.login(email)
    await a.get("/console/account")
    r = await a.post("/console/account/password", {"current": cc.PASSWORD, "password": "new password 1"})
    assert r.status == 200
    assert (await a.get("/console", allow_redirects=False)).status == 200
    r = await b.get("/console")
    assert r.url.path == "/console/login" and "password was changed" in b.last
    c = browsers()
    r = await c.login(email, "new password 1")
    assert r.url.path == "/console"


async def test_a_user_cannot_revoke_another_users_session(h, browsers, pg_dsn) -> None:
    a, b = browsers(), browsers()
    await a.register(cc.new_email())
    email_b = cc.new_email()
    await b.register(email_b)
    conn = await asyncpg.connect(pg_dsn)
    try:
        sid = await conn.fetchval("SELECT s.id FROM console_sessions s JOIN users u ON u.id = s.user_id"
                                  " WHERE u.email = $1 AND s.ended_at IS NULL", email_b)
    finally:
        await conn.close()
    await a.get("/console/account")
    await a.post(f"/console/account/sessions/{sid}/revoke")
    assert (await b.get("/console", allow_redirects=False)).status == 200


async def test_wrong_email_and_wrong_password_read_the_same(h, browsers) -> None:
    email = cc.new_email()
    await browsers().register(email)
    b = browsers()
    r1 = await b.login(email, "wrong password")
    t1 = b.last
    r2 = await b.login("nobody-" + email, "wrong password")
    assert r1.status == r2.status == 400
    assert "not right" in t1 and "not right" in b.last


async def test_next_never_leaves_the_site(h, browsers) -> None:
    email = cc.new_email()
    await browsers().register(email)
    b = browsers()
    await b.get("/console/login")
    r = await b.post("/console/login", {"email": email, "password": cc.PASSWORD,
                                        "next": "//evil.example/x"}, allow_redirects=False)
    assert r.headers["location"] == "/console"


async def test_static_files_are_immutable_and_hashed(h, browsers) -> None:
    b = browsers()
    await b.get("/console/login")
    import re
    url = re.search(r'href="(/console/static/[0-9a-f]{12}/console\.css)"', b.last).group(1)
    r = await b.http.get(h.url + url)
    assert r.status == 200 and "immutable" in r.headers["cache-control"]
    r = await b.http.get(h.url + url.replace(url.split("/")[3], "000000000000"))
    assert r.status == 404


async def test_throttling_answers_429_with_retry_after(pg_dsn) -> None:
    h = await cc.start(pg_dsn, attempts_per_ip=1000, attempts_per_account=3)
    b = Browser(h)
    try:
        email = cc.new_email()
        statuses = []
        for _ in range(5):
            r = await b.login(email, "wrong password")
            statuses.append(r.status)
        assert statuses[:3] == [400, 400, 400] and statuses[3] == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "Too many attempts" in b.last and email not in b.last
    finally:
        await b.close()
        await h.stop()


async def test_throttling_per_address_in_redis(pg_dsn) -> None:
    import redis.asyncio as aioredis
    try:
        probe = aioredis.from_url("redis://127.0.0.1:6379/0")
        await probe.ping()
        await probe.aclose()
    except Exception:
        pytest.skip("no Redis on 127.0.0.1:6379")
    h = await cc.start(pg_dsn, attempts_per_ip=2, attempts_per_account=1000)
    console = cc.console_of(h)
    import secrets

    from relay.console.throttle import Throttle
    console.throttle = Throttle(2, 1000, 600, "redis://127.0.0.1:6379/0",
                                prefix=f"test-{secrets.token_hex(4)}:")
    b = Browser(h)
    try:
        statuses = []
        for _ in range(3):
            r = await b.login(cc.new_email(), "wrong password")
            statuses.append(r.status)
        assert statuses == [400, 400, 429]
        assert int(r.headers["retry-after"]) >= 1
    finally:
        await console.throttle.close()
        await b.close()
        await h.stop()


async def test_the_throttle_counts_under_the_deployments_redis_prefix(pg_dsn: str) -> None:
    """Two deployments sharing a Redis never count each other's login attempts."""
    import redis.asyncio as aioredis

    url = "redis://127.0.0.1:6379/0"
    probe = aioredis.from_url(url, socket_connect_timeout=1)
    try:
        await probe.ping()
    except Exception:
        pytest.skip("no Redis at 127.0.0.1:6379")
    finally:
        await probe.aclose()
    h = await cc.Harness().start(pg_dsn, accounts=cc.FAST_ARGON2, limits={"redis_url": url})
    try:
        c = cc.console_of(h)
        shared = h.worker.gw.limiter.shared  # type: ignore[union-attr]
        assert re.fullmatch(r"tollway:[0-9a-f]{32}:", c.throttle.prefix)
        assert c.throttle.prefix == shared.prefix
    finally:
        await h.stop()

"""Console accounts over real HTTP: sign-up modes, invite codes, credits granted at
verification, password reset, 2FA, setup links, rehash on new argon2 parameters, the
demo login, and the config keys."""

from __future__ import annotations

import asyncpg
import pyotp
import pytest

from accounting import accounts, growth, store
from relay.config import ConfigError, parse
from tests import console_client as cc
from tests.console_client import Browser


async def _user(pg_dsn: str, email: str) -> asyncpg.Record:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return await conn.fetchrow("SELECT * FROM users WHERE email = $1", email)
    finally:
        await conn.close()


async def _invite_code(pg_dsn: str) -> tuple[int, str]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        uid = await store.create_user(conn, f"inviter-{cc.new_email()}")
        return uid, await growth.create_invite_code(conn, uid)
    finally:
        await conn.close()


async def test_open_signup_credits_wait_for_verification(pg_dsn) -> None:
    h = await cc.start(pg_dsn, signup="open", verify_email=True)
    h.worker.gw.cfg  # noqa: B018
    console = cc.console_of(h)
    console.terms = growth.Terms(signup_nano=2_000_000_000, invite_nano=1_000_000_000,
                                 share=console.terms.share)
    inviter, code = await _invite_code(pg_dsn)
    b = Browser(h)
    try:
        email = cc.new_email()
        await b.get(f"/console/register?aff={code}")
        assert f'value="{code}"' in b.last  # ?aff= fills the invite field
        r = await b.register(email, invite=code, verify=False)
        assert r.url.path == "/console/verify"
        assert (await _user(pg_dsn, email))["balance_nano"] == 0
        r = await b.post("/console/verify", {"code": "000000" if console.mailer.last_code(email) != "000000" else "111111"})
        assert r.status == 400
        r = await b.post("/console/verify", {"code": console.mailer.last_code(email)})
        assert r.url.path == "/console"
        u = await _user(pg_dsn, email)
        assert u["email_verified"] and u["balance_nano"] == 3_000_000_000
        assert "$3.00" in b.last
        # Verifying twice grants nothing more.
        code2 = console.mailer.last_code(email)
        conn = await asyncpg.connect(pg_dsn)
        try:
            assert await accounts.grant_credits(conn, u["id"], console.terms) is None
            assert await conn.fetchval("SELECT inviter_id FROM invites WHERE invitee_id = $1", u["id"]) == inviter
        finally:
            await conn.close()
        assert code2
    finally:
        await b.close()
        await h.stop()


async def test_invite_mode_requires_a_valid_code_and_closed_refuses(pg_dsn) -> None:
    h = await cc.start(pg_dsn, signup="invite", verify_email=False)
    b = Browser(h)
    try:
        r = await b.register(cc.new_email())
        assert r.status == 400 and "invite code is required" in b.last
        r = await b.register(cc.new_email(), invite="INV-NOPE")
        assert r.status == 400 and "does not exist" in b.last
        _, code = await _invite_code(pg_dsn)
        email = cc.new_email()
        r = await b.register(email, invite=code)
        assert r.url.path == "/console"  # verification off: straight in
        assert (await _user(pg_dsn, email))["email_verified"]
        r = await Browser(h).register(email)
    finally:
        await b.close()
        await h.stop()
    h = await cc.start(pg_dsn, signup="closed")
    b = Browser(h)
    try:
        r = await b.register(cc.new_email())
        assert r.status == 403
    finally:
        await b.close()
        await h.stop()


async def test_duplicate_email_is_refused(pg_dsn) -> None:
    h = await cc.start(pg_dsn, verify_email=False)
    a, b = Browser(h), Browser(h)
    try:
        email = cc.new_email()
        await a.register(email)
        r = await b.register(email.upper().replace("@EXAMPLE.COM", "@example.com"))
        assert r.status == 400 and "already exists" in b.last
    finally:
        await a.close()
        await b.close()
        await h.stop()


async def test_password_reset_by_code(pg_dsn) -> None:
    h = await cc.start(pg_dsn, verify_email=False)
    console = cc.console_of(h)
    a, b = Browser(h), Browser(h)
    try:
        email = cc.new_email()
        await a.register(email)
        await b.get("/console/reset")
        r = await b.post("/console/reset", {"email": email})
        assert r.url.path == "/console/reset/confirm"
        code = console.mailer.last_code(email)
        r = await b.post("/console/reset/confirm", {"email": email, "code": "999999" if code != "999999" else "0",
                                                    "password": "brand new pass"})
        assert r.status == 400
        r = await b.post("/console/reset/confirm", {"email": email, "code": code, "password": "brand new pass"})
        assert r.url.path == "/console/login"
        r = await a.get("/console")
        assert r.url.path == "/console/login"  # the old session ended
        r = await b.login(email, "brand new pass")
        assert r.url.path == "/console"
        # An unknown email looks the same and sends nothing.
        n = len(console.mailer.outbox)
        r = await Browser(h).post("/console/reset", {"email": "nobody@example.com"}, csrf=False)
        assert len(console.mailer.outbox) == n
    finally:
        await a.close()
        await b.close()
        await h.stop()


async def test_totp_two_factor_and_recovery_codes(pg_dsn) -> None:
    h = await cc.start(pg_dsn, verify_email=False)
    a = Browser(h)
    try:
        email = cc.new_email()
        await a.register(email)
        await a.get("/console/account")
        import re
        secret = re.search(r'data-testid="totp-secret">([A-Z2-7]+)<', a.last).group(1)
        r = await a.post("/console/account/2fa/enable", {"secret": secret, "code": "000000"})
        assert r.status == 400
        r = await a.post("/console/account/2fa/enable", {"secret": secret, "code": pyotp.TOTP(secret).now()})
        assert r.status == 200
        recovery = re.search(r'data-testid="recovery-codes">([^<]+)<', a.last).group(1).split()
        assert len(recovery) == 8
        b = Browser(h)
        r = await b.login(email)
        assert r.url.path == "/console/login/2fa"
        assert (await b.get("/console/account", allow_redirects=False)).status == 303
        r = await b.post("/console/login/2fa", {"code": "123456" if pyotp.TOTP(secret).now() != "123456" else "654321"})
        assert r.status == 400
        before = b.cookie("tw_session")
        r = await b.post("/console/login/2fa", {"code": pyotp.TOTP(secret).now()})
        assert r.url.path == "/console"
        assert b.cookie("tw_session") != before  # a new token once the second factor passed
        c = Browser(h)
        await c.login(email)
        r = await c.post("/console/login/2fa", {"code": recovery[0]})
        assert r.url.path == "/console"
        d = Browser(h)
        await d.login(email)
        r = await d.post("/console/login/2fa", {"code": recovery[0]})
        assert r.status == 400  # each recovery code works once
        for x in (b, c, d):
            await x.close()
    finally:
        await a.close()
        await h.stop()


async def test_setup_link_for_an_admin_created_user(pg_dsn) -> None:
    h = await cc.start(pg_dsn)
    b = Browser(h)
    try:
        conn = await asyncpg.connect(pg_dsn)
        try:
            uid = await store.create_user(conn, f"made-by-admin-{cc.new_email()}")
            token = await accounts.new_code(conn, uid, "setup")
        finally:
            await conn.close()
        await b.get(f"/console/setup?token={token}")
        email = cc.new_email()
        r = await b.post("/console/setup", {"token": token, "email": email, "password": "set by link 1"})
        assert r.url.path == "/console"
        r = await Browser(h).get(f"/console/setup?token={token}")
        assert r.status == 400  # one time
        b2 = Browser(h)
        assert (await b2.login(email, "set by link 1")).url.path == "/console"
        await b2.close()
    finally:
        await b.close()
        await h.stop()


async def test_rehash_when_parameters_change(pg_dsn) -> None:
    h = await cc.start(pg_dsn, verify_email=False)
    b = Browser(h)
    email = cc.new_email()
    try:
        await b.register(email)
    finally:
        await b.close()
        await h.stop()
    old = (await _user(pg_dsn, email))["password_hash"]
    assert "m=1024" in old
    h = await cc.start(pg_dsn, verify_email=False, argon2_memory_kib=2048)
    b = Browser(h)
    try:
        assert (await b.login(email)).url.path == "/console"
    finally:
        await b.close()
        await h.stop()
    new = (await _user(pg_dsn, email))["password_hash"]
    assert "m=2048" in new and new != old


async def test_unknown_accounts_are_checked_against_a_dummy_hash() -> None:
    pw = accounts.Passwords(time_cost=1, memory_kib=1024, threads=1)
    calls = []
    real = pw._check
    pw._check = lambda stored, password: calls.append(stored) or real(stored, password)  # type: ignore[method-assign]
    try:
        assert await pw.verify(None, "anything") == (False, False)
        assert calls and calls[0].startswith("$argon2id$")
    finally:
        pw.close()


def test_accounts_config_keys() -> None:
    cfg = parse({"accounts": {"signup": "invite", "verify_email": False, "max_devices": 3}})
    assert (cfg.accounts.signup, cfg.accounts.verify_email, cfg.accounts.max_devices) == ("invite", False, 3)
    with pytest.raises(ConfigError, match=r"accounts\.signup"):
        parse({"accounts": {"signup": "sometimes"}})
    with pytest.raises(ConfigError, match=r"accounts\.nope"):
        parse({"accounts": {"nope": 1}})
    with pytest.raises(ConfigError, match="max_devices"):
        parse({"accounts": {"max_devices": 0}})


async def test_demo_start_writes_a_console_login(pg_dsn, tmp_path) -> None:
    from relay.server import DEMO_EMAIL, _demo_login
    cfg = parse({"database": {"data_dir": str(tmp_path)}, "accounts": cc.FAST_ARGON2})
    conn = await asyncpg.connect(pg_dsn)
    try:
        uid = await store.create_user(conn, f"demo-{cc.new_email()}")
        await conn.execute("UPDATE users SET email = NULL WHERE email = $1", DEMO_EMAIL)
        await _demo_login(cfg, conn, uid)
    finally:
        await conn.close()
    text = (tmp_path / "demo-login").read_text()
    assert DEMO_EMAIL in text
    password = text.split("password: ")[1].strip()
    h = await cc.start(pg_dsn)
    b = Browser(h)
    try:
        assert (await b.login(DEMO_EMAIL, password)).url.path == "/console"
    finally:
        await b.close()
        await h.stop()

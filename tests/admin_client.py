"""Operators for tests of the operator pages: a user of each role with a password and,
for those who may change things, 2FA turned on, signed in through the real login."""

from __future__ import annotations

import re
import secrets

import asyncpg
import pyotp

from accounting import accounts, store
from tests.console_client import PASSWORD, Browser, console_of, new_email
from tests.gateway import Harness

TOTP_SECRET = pyotp.random_base32()


async def make_operator(h: Harness, role: str, *, totp: bool | None = None) -> tuple[int, str]:
    """(user id, email) of a new user with `role`; owners and admins get 2FA unless told."""
    email = new_email()
    hashed = await console_of(h).passwords.hash(PASSWORD)
    conn = await asyncpg.connect(h.dsn)
    try:
        uid = await store.create_user(conn, f"{role}-{secrets.token_hex(4)}")
        await conn.execute("UPDATE users SET email = $2, password_hash = $3, email_verified = true,"
                           " role = $4 WHERE id = $1", uid, email, hashed, role)
        if totp if totp is not None else role in ("owner", "admin"):
            await accounts.enable_totp(conn, uid, TOTP_SECRET, pyotp.TOTP(TOTP_SECRET).now())
    finally:
        await conn.close()
    return uid, email


async def sign_in(h: Harness, email: str) -> Browser:
    b = Browser(h)
    r = await b.login(email)
    if r.url.path == "/console/login/2fa":
        r = await b.post("/console/login/2fa", {"code": pyotp.TOTP(TOTP_SECRET).now()})
    assert r.status == 200, b.last[:500]
    return b


async def operator(h: Harness, role: str) -> tuple[Browser, int]:
    uid, email = await make_operator(h, role)
    return await sign_in(h, email), uid


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]*)"', html)
    return m.group(1) if m else ""

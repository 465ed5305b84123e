"""Console accounts: email and password, verification and reset codes, 2FA, setup links.

Passwords are argon2id (argon2-cffi). Hashing costs tens of milliseconds of CPU, so it
runs in a small thread pool (never on the event loop) and the pool's size bounds how
many run at once; a login for an unknown email verifies against a dummy hash made with
the same parameters, so it costs the same time as a real one. A hash made with older
parameters is replaced at the next successful login.

Codes sent by email (verification, reset) and setup links are random, stored as their
SHA-256 only, expire, and allow a few attempts. Recovery codes for 2FA are stored the
same way. Sign-up credits (accounting.growth) are granted when the email is verified
(or at sign-up when verification is off), never twice (`credits_granted`).
This module never imports relay.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import argon2
import pyotp

from accounting import growth, store
from accounting.store import Conflict, NotFound, StoreError

Conn = Any

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
MIN_PASSWORD = 8  # the messages of check_password say these figures
MAX_PASSWORD = 1024  # argon2 takes any length; bound the work an attacker can ask for
CODE_TTL = timedelta(minutes=30)
SETUP_TTL = timedelta(days=7)
CODE_ATTEMPTS = 5
RECOVERY_CODES = 8
LANGS = ("en", "zh_Hans")


class AccountError(StoreError):
    """A refusal whose message is safe to show (wrong code, weak password...)."""


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    email: str | None
    status: str
    email_verified: bool
    role: str
    lang: str
    tz: str
    max_devices: int | None
    totp_enabled: bool
    balance_nano: int
    low_balance_nano: int
    has_password: bool


_COLS = ("id, name, email, status, email_verified, role, lang, tz, max_devices, totp_enabled,"
         " balance_nano, low_balance_nano, password_hash IS NOT NULL AS has_password")


def _account(r: Any) -> Account:
    return Account(**dict(r))


async def get(conn: Conn, user_id: int) -> Account | None:
    r = await conn.fetchrow(f"SELECT {_COLS} FROM users WHERE id = $1", user_id)
    return None if r is None else _account(r)


async def by_email(conn: Conn, email: str) -> Account | None:
    r = await conn.fetchrow(f"SELECT {_COLS} FROM users WHERE lower(email) = lower($1)", email.strip())
    return None if r is None else _account(r)


def normalize_email(email: str) -> str:
    email = email.strip()
    if not EMAIL_RE.match(email):
        raise AccountError("Enter a valid email address")
    local, _, domain = email.rpartition("@")
    return f"{local}@{domain.lower()}"


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError("The password must have at least 8 characters")
    if len(password) > MAX_PASSWORD:
        raise AccountError("The password must have at most 1024 characters")
    return password


# --- password hashing off the event loop -------------------------------------------------


class Passwords:
    """argon2id hashing in a bounded thread pool; `verify` of an unknown account costs
    the same as a real one."""

    def __init__(self, *, time_cost: int = 3, memory_kib: int = 65536, parallelism: int = 1,
                 threads: int = 2) -> None:
        self.hasher = argon2.PasswordHasher(time_cost=time_cost, memory_cost=memory_kib,
                                            parallelism=parallelism, type=argon2.Type.ID)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self._dummy: str | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def hash(self, password: str) -> str:
        return str(await self._run(self.hasher.hash, password))

    async def verify(self, stored: str | None, password: str) -> tuple[bool, bool]:
        """(matches, needs rehash). `stored` None: compare against a dummy hash."""
        if stored is None:
            if self._dummy is None:
                self._dummy = await self.hash(secrets.token_urlsafe(16))
            await self._run(self._check, self._dummy, password)
            return False, False
        ok = await self._run(self._check, stored, password)
        return ok, bool(ok and self.hasher.check_needs_rehash(stored))

    def _check(self, stored: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(stored, password))
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# --- sign-up, verification, credits ------------------------------------------------------


async def check_invite(conn: Conn, code: str) -> str:
    """The normalised invite code if it exists and has uses left; else AccountError."""
    code = code.strip().upper()
    row = await conn.fetchrow("SELECT uses, max_uses FROM invite_codes WHERE code = $1", code)
    if row is None:
        raise AccountError("This invite code does not exist")
    if row["max_uses"] and row["uses"] >= row["max_uses"]:
        raise AccountError("This invite code has no uses left")
    return code


async def register(conn: Conn, email: str, password_hash: str, *, invite: str | None,
                   verified: bool, lang: str = "en", tz: str = "UTC") -> int:
    """Create a console user (name = email). Credits wait for verification unless
    `verified` (verification is off), in which case they are granted now."""
    email = normalize_email(email)
    async with store._transaction(conn) as tx:
        if await tx.fetchval("SELECT 1 FROM users WHERE lower(email) = lower($1)"
                             " OR name = $1", email):
            raise Conflict("An account with this email already exists")
        uid = await store.create_user(tx, email)
        await tx.execute(
            "UPDATE users SET email = $2, password_hash = $3, email_verified = $4, lang = $5,"
            " tz = $6, pending_invite = $7, credits_granted = false WHERE id = $1",
            uid, email, password_hash, verified, lang if lang in LANGS else "en", tz, invite)
    return uid


async def grant_credits(conn: Conn, user_id: int, terms: growth.Terms) -> dict[str, Any] | None:
    """Grant the sign-up (and invite) credit once; None when already granted. An invite
    code used up since sign-up grants the sign-up credit alone."""
    async with store._transaction(conn) as tx:
        code = await tx.fetchval(
            "UPDATE users SET credits_granted = true WHERE id = $1 AND NOT credits_granted"
            " RETURNING coalesce(pending_invite, '')", user_id)
        if code is None:
            return None
        try:
            async with store._transaction(tx) as inner:
                return await growth.grant(inner, user_id, terms, code or None)
        except (NotFound, StoreError):
            return await growth.grant(tx, user_id, terms, None)


def _code_hash(code: str) -> bytes:
    return hashlib.sha256(code.strip().upper().encode()).digest()


async def new_code(conn: Conn, user_id: int, purpose: str) -> str:
    """A fresh code for `purpose` (earlier unused ones stop working): 6 digits for
    verify/reset (typed from an email), a long token for a setup link."""
    if purpose == "setup":
        code, ttl = secrets.token_urlsafe(24), SETUP_TTL
    else:
        code, ttl = f"{secrets.randbelow(10**6):06d}", CODE_TTL
    async with store._transaction(conn) as tx:
        await tx.execute("UPDATE account_codes SET used_at = now() WHERE user_id = $1"
                         " AND purpose = $2 AND used_at IS NULL", user_id, purpose)
        await tx.execute("INSERT INTO account_codes (user_id, purpose, code_hash, expires_at)"
                         " VALUES ($1, $2, $3, now() + $4::interval)",
                         user_id, purpose, _code_hash(code), ttl)
    return code


async def use_code(conn: Conn, user_id: int, purpose: str, code: str) -> None:
    """Consume the user's current code for `purpose`; AccountError when wrong, expired
    or out of attempts (each wrong try counts)."""
    async with store._transaction(conn) as tx:
        row = await tx.fetchrow(
            "SELECT id, code_hash, attempts, expires_at < now() AS expired FROM account_codes"
            " WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL"
            " ORDER BY created_at DESC LIMIT 1 FOR UPDATE", user_id, purpose)
        if row is None or row["expired"] or row["attempts"] >= CODE_ATTEMPTS:
            raise AccountError("This code has expired; ask for a new one")
        if not hmac.compare_digest(bytes(row["code_hash"]), _code_hash(code)):
            await tx.execute("UPDATE account_codes SET attempts = attempts + 1 WHERE id = $1", row["id"])
            raise AccountError("The code is not right")
        await tx.execute("UPDATE account_codes SET used_at = now() WHERE id = $1", row["id"])


async def user_of_setup_token(conn: Conn, token: str) -> int | None:
    return await conn.fetchval(
        "SELECT user_id FROM account_codes WHERE purpose = 'setup' AND code_hash = $1"
        " AND used_at IS NULL AND expires_at > now()", _code_hash(token))


async def mark_verified(conn: Conn, user_id: int) -> None:
    await conn.execute("UPDATE users SET email_verified = true WHERE id = $1", user_id)


async def set_password(conn: Conn, user_id: int, password_hash: str) -> None:
    await conn.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)


async def password_hash(conn: Conn, user_id: int) -> str | None:
    v = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)
    return None if v is None else str(v)


async def set_login(conn: Conn, user_id: int, email: str) -> None:
    """Give a user (made by an admin) a console email, verified by the admin's say-so."""
    email = normalize_email(email)
    try:
        await conn.execute("UPDATE users SET email = $2, email_verified = true WHERE id = $1",
                           user_id, email)
    except Exception as exc:  # asyncpg.UniqueViolationError, without importing asyncpg here
        if type(exc).__name__ == "UniqueViolationError":
            raise Conflict("An account with this email already exists")
        raise


async def set_prefs(conn: Conn, user_id: int, *, lang: str | None = None, tz: str | None = None,
                    low_balance_nano: int | None = None) -> None:
    if lang is not None:
        if lang not in LANGS:
            raise AccountError("Unknown language")
        await conn.execute("UPDATE users SET lang = $2 WHERE id = $1", user_id, lang)
    if tz is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise AccountError("Unknown time zone")
        await conn.execute("UPDATE users SET tz = $2 WHERE id = $1", user_id, tz)
    if low_balance_nano is not None:
        if low_balance_nano < 0:
            raise AccountError("The alert threshold must not be negative")
        # A new threshold re-arms the alert (accounting.alerts); saving the same one (the
        # Account form sends it with the language and zone) must not tell a crossing twice.
        await conn.execute(
            "UPDATE users SET low_balance_sent_at = CASE WHEN low_balance_nano = $2"
            " THEN low_balance_sent_at END, low_balance_nano = $2 WHERE id = $1",
            user_id, low_balance_nano)


# --- two-factor authentication -----------------------------------------------------------


def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, email: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name=issuer)


def totp_ok(secret: str, code: str) -> bool:
    code = code.strip().replace(" ", "")
    return code.isdigit() and pyotp.TOTP(secret).verify(code, valid_window=1)


async def enable_totp(conn: Conn, user_id: int, secret: str, code: str) -> list[str]:
    """Turn 2FA on once the user proves the authenticator works; returns the recovery
    codes (shown once; only their hashes are kept)."""
    if not totp_ok(secret, code):
        raise AccountError("The code is not right")
    codes = [f"{secrets.token_hex(4)}-{secrets.token_hex(4)}" for _ in range(RECOVERY_CODES)]
    async with store._transaction(conn) as tx:
        await tx.execute("UPDATE users SET totp_secret = $2, totp_enabled = true WHERE id = $1",
                         user_id, secret)
        await tx.execute("DELETE FROM recovery_codes WHERE user_id = $1", user_id)
        await tx.executemany("INSERT INTO recovery_codes (user_id, code_hash) VALUES ($1, $2)",
                             [(user_id, _code_hash(c)) for c in codes])
    return codes


async def disable_totp(conn: Conn, user_id: int) -> None:
    async with store._transaction(conn) as tx:
        await tx.execute("UPDATE users SET totp_secret = NULL, totp_enabled = false WHERE id = $1",
                         user_id)
        await tx.execute("DELETE FROM recovery_codes WHERE user_id = $1", user_id)


async def second_factor_ok(conn: Conn, user_id: int, code: str) -> bool:
    """A TOTP code, or an unused recovery code (then spent)."""
    secret = await conn.fetchval("SELECT totp_secret FROM users WHERE id = $1 AND totp_enabled",
                                 user_id)
    if secret is None:
        return False
    if totp_ok(secret, code):
        return True
    used = await conn.fetchval(
        "UPDATE recovery_codes SET used_at = now() WHERE user_id = $1 AND code_hash = $2"
        " AND used_at IS NULL RETURNING 1", user_id, _code_hash(code))
    return used is not None


async def recovery_left(conn: Conn, user_id: int) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL", user_id))


# --- demo --------------------------------------------------------------------------------


async def demo_login(conn: Conn, user_id: int, email: str, password_hash: str) -> None:
    """Make the demo user able to sign in to the console."""
    await conn.execute("UPDATE users SET email = $2, password_hash = $3, email_verified = true,"
                       " credits_granted = true WHERE id = $1", user_id, email, password_hash)


def mask_email(email: str | None) -> str:
    if not email:
        return "—"
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}" if domain else f"{local[:1]}***"


__all__ = ["Account", "AccountError", "Conflict", "NotFound", "Passwords"]


# --- operators ---------------------------------------------------------------------------

# Who may do what on the operator pages: a viewer sees everything an admin sees and
# changes nothing; only an owner changes operators' roles.
ROLES = ("user", "viewer", "admin", "owner")
ROLE_RANK = {r: i for i, r in enumerate(ROLES)}
OWNER_SETUP_TTL = timedelta(days=1)


def check_role(role: str) -> str:
    if role not in ROLE_RANK:
        raise AccountError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    return role


async def set_role(conn: Conn, user_id: int, role: str) -> None:
    await conn.execute("UPDATE users SET role = $2 WHERE id = $1", user_id, check_role(role))


async def set_max_devices(conn: Conn, user_id: int, n: int | None) -> None:
    if n is not None and not 1 <= n <= 100:
        raise AccountError("The device limit must be between 1 and 100 (empty: the site's)")
    await conn.execute("UPDATE users SET max_devices = $2 WHERE id = $1", user_id, n)


async def owner_exists(conn: Conn) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE role = 'owner')"))


async def new_owner_setup(conn: Conn) -> str | None:
    """While no owner exists: a fresh one-time set-up token (the previous one stops
    working); None once there is an owner."""
    token = secrets.token_urlsafe(24)
    async with store._transaction(conn) as tx:
        await tx.execute("LOCK TABLE owner_setup IN EXCLUSIVE MODE")
        if await owner_exists(tx):
            await tx.execute("DELETE FROM owner_setup")
            return None
        await tx.execute(
            "INSERT INTO owner_setup (token_hash, expires_at) VALUES ($1, now() + $2::interval)"
            " ON CONFLICT (one) DO UPDATE SET token_hash = EXCLUDED.token_hash,"
            " expires_at = EXCLUDED.expires_at, created_at = now()",
            _code_hash(token), OWNER_SETUP_TTL)
    return token


async def owner_setup_ok(conn: Conn, token: str) -> bool:
    if not token or await owner_exists(conn):
        return False
    h = await conn.fetchval("SELECT token_hash FROM owner_setup WHERE expires_at > now()")
    return h is not None and hmac.compare_digest(bytes(h), _code_hash(token))


async def create_owner(conn: Conn, token: str, email: str, password_hash: str) -> int:
    """Spend the set-up token: the first owner, with a verified email."""
    email = normalize_email(email)
    async with store._transaction(conn) as tx:
        await tx.execute("LOCK TABLE owner_setup IN EXCLUSIVE MODE")
        if not await owner_setup_ok(tx, token):
            raise AccountError("This set-up link has expired.")
        existing = await tx.fetchval("SELECT id FROM users WHERE lower(email) = lower($1)", email)
        uid = existing if existing is not None else await store.create_user(tx, email)
        await tx.execute(
            "UPDATE users SET email = $2, password_hash = $3, email_verified = true, role = 'owner',"
            " credits_granted = true WHERE id = $1", uid, email, password_hash)
        await tx.execute("DELETE FROM owner_setup")
    return int(uid)

"""Console sessions in Postgres: opaque tokens, only their SHA-256 stored.

A session has an idle expiry (since it was last seen) and an absolute one (since it was
made). At most N live sessions per user (the device limit): making one more ends the
oldest, whose row keeps the reason (`device_limit`), so the browser holding it is told
why it was signed out instead of being silently logged out. Logins are never refused
for the limit. Ending a session keeps its row; rows older than the absolute expiry are
swept. This module never imports relay.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from accounting import store

Conn = Any

TOUCH_EVERY = timedelta(seconds=60)  # last_seen is written at most this often per session


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Session:
    id: int
    user_id: int
    csrf: str
    mfa_pending: bool
    created_at: datetime
    last_seen: datetime
    ip: str
    user_agent: str


@dataclass(frozen=True, slots=True)
class Ended:
    """A token whose session ended: `why` is logout, device_limit, password, revoked,
    2fa or expired."""

    why: str


_COLS = "id, user_id, csrf, mfa_pending, created_at, last_seen, ip, user_agent"


async def create(conn: Conn, user_id: int, *, ip: str, user_agent: str, max_devices: int,
                 absolute: timedelta, mfa_pending: bool = False) -> tuple[str, Session, int]:
    """A new session: (token for the cookie, session, how many older sessions the
    device limit ended)."""
    token = secrets.token_urlsafe(32)
    async with store._transaction(conn) as tx:
        # Serialise one user's logins so two at once cannot both keep N sessions.
        await tx.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        row = await tx.fetchrow(
            "INSERT INTO console_sessions (user_id, token_hash, csrf, mfa_pending, expires_at, ip,"
            f" user_agent) VALUES ($1, $2, $3, $4, now() + $5::interval, $6, $7) RETURNING {_COLS}",
            user_id, token_hash(token), secrets.token_urlsafe(24), mfa_pending, absolute, ip,
            user_agent[:300])
        ended = await tx.fetch(
            "UPDATE console_sessions SET ended_at = now(), ended_why = 'device_limit'"
            " WHERE id IN (SELECT id FROM console_sessions WHERE user_id = $1 AND ended_at IS NULL"
            " AND NOT mfa_pending AND expires_at > now() ORDER BY created_at DESC, id DESC OFFSET $2)"
            " RETURNING id", user_id, max(1, max_devices))
    return token, Session(**dict(row)), len(ended)


async def lookup(conn: Conn, token: str, idle: timedelta) -> Session | Ended | None:
    """The live session of a token; Ended (with the reason) for one that ended; None for
    a token never issued."""
    row = await conn.fetchrow(
        f"SELECT {_COLS}, ended_why, ended_at IS NOT NULL AS ended,"
        " expires_at <= now() OR last_seen + $2::interval <= now() AS expired,"
        " last_seen + $3::interval <= now() AS stale"
        " FROM console_sessions WHERE token_hash = $1", token_hash(token), idle, TOUCH_EVERY)
    if row is None:
        return None
    if row["ended"]:
        return Ended(row["ended_why"] or "revoked")
    if row["expired"]:
        await end(conn, row["id"], "expired")
        return Ended("expired")
    if row["stale"]:
        await conn.execute("UPDATE console_sessions SET last_seen = now() WHERE id = $1", row["id"])
    d = dict(row)
    for k in ("ended_why", "ended", "expired", "stale"):
        d.pop(k)
    return Session(**d)


async def end(conn: Conn, session_id: int, why: str) -> None:
    await conn.execute("UPDATE console_sessions SET ended_at = now(), ended_why = $2"
                       " WHERE id = $1 AND ended_at IS NULL", session_id, why)


async def end_others(conn: Conn, user_id: int, keep_id: int | None, why: str) -> int:
    rows = await conn.fetch(
        "UPDATE console_sessions SET ended_at = now(), ended_why = $3 WHERE user_id = $1"
        " AND ended_at IS NULL AND id IS DISTINCT FROM $2 RETURNING id", user_id, keep_id, why)
    return len(rows)


async def revoke(conn: Conn, user_id: int, session_id: int) -> bool:
    """End one of the user's own sessions; False when it is not theirs or already ended."""
    done = await conn.fetchval(
        "UPDATE console_sessions SET ended_at = now(), ended_why = 'revoked'"
        " WHERE id = $1 AND user_id = $2 AND ended_at IS NULL RETURNING 1", session_id, user_id)
    return done is not None


async def promote(conn: Conn, session: Session, max_devices: int) -> tuple[str, int]:
    """A session that passed its second factor gets a new token (privilege change) and
    now counts against the device limit: (new token, sessions ended)."""
    token = secrets.token_urlsafe(32)
    async with store._transaction(conn) as tx:
        await tx.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", session.user_id)
        await tx.execute("UPDATE console_sessions SET token_hash = $2, mfa_pending = false,"
                         " csrf = $3 WHERE id = $1", session.id, token_hash(token),
                         secrets.token_urlsafe(24))
        ended = await tx.fetch(
            "UPDATE console_sessions SET ended_at = now(), ended_why = 'device_limit'"
            " WHERE id IN (SELECT id FROM console_sessions WHERE user_id = $1 AND ended_at IS NULL"
            " AND NOT mfa_pending AND expires_at > now() ORDER BY created_at DESC, id DESC OFFSET $2)"
            " RETURNING id", session.user_id, max(1, max_devices))
    return token, len(ended)


async def live(conn: Conn, user_id: int) -> list[Session]:
    rows = await conn.fetch(
        f"SELECT {_COLS} FROM console_sessions WHERE user_id = $1 AND ended_at IS NULL"
        " AND NOT mfa_pending AND expires_at > now() ORDER BY created_at DESC", user_id)
    return [Session(**dict(r)) for r in rows]


async def sweep(conn: Conn, keep: timedelta) -> int:
    """Delete session rows that ended (or expired) more than `keep` ago."""
    rows = await conn.fetch(
        "DELETE FROM console_sessions WHERE coalesce(ended_at, expires_at) < now() - $1::interval"
        " RETURNING 1", keep)
    return len(rows)

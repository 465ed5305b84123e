"""Redemption codes: prepaid credit an operator hands out, redeemed exactly once.

A code is a bearer secret (`TW-XXXX-XXXX-XXXX-XXXX`, 80 random bits). Only its
SHA-256 is stored, with a short display prefix, so a leaked table cannot be redeemed.
Redeeming is one conditional UPDATE (`WHERE redeemed_by IS NULL`) that a concurrent
redeemer cannot also win, followed in the same transaction by the balance credit and
its `topups` row (whose unique external_id is the code's hash: a second credit for
the same code is impossible even by mistake). This module never prints or logs a code.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import datetime

import asyncpg

PREFIX = "TW-"
_GROUPS = 4
_GROUP_LEN = 4
DISPLAY_LEN = len(PREFIX) + _GROUP_LEN  # "TW-ABCD": enough to tell codes apart in a list


class CodeError(Exception):
    """A code cannot be redeemed; the message says why and is safe to show the user."""


class CodeNotFound(CodeError):
    pass


class CodeAlreadyRedeemed(CodeError):
    pass


class CodeExpired(CodeError):
    pass


class UnknownUser(CodeError):
    pass


def new_code() -> str:
    raw = base64.b32encode(secrets.token_bytes(10)).decode()  # 16 chars, no padding
    groups = [raw[i:i + _GROUP_LEN] for i in range(0, _GROUPS * _GROUP_LEN, _GROUP_LEN)]
    return PREFIX + "-".join(groups)


def normalize(code: str) -> str:
    """Case, spaces and dashes do not matter when a person types a code back."""
    s = "".join(code.split()).upper().replace("-", "")
    head = PREFIX[:-1]
    if len(s) == len(head) + _GROUPS * _GROUP_LEN and s.startswith(head):
        return s[len(head):]
    return s


def code_hash(code: str) -> bytes:
    return hashlib.sha256(normalize(code).encode()).digest()


async def create_codes(
    conn: asyncpg.Connection, amount_nano: int, count: int, expires_at: datetime | None = None
) -> list[str]:
    """Create `count` codes worth `amount_nano` each, as one batch; return them (shown once)."""
    if isinstance(amount_nano, bool) or not isinstance(amount_nano, int) or amount_nano <= 0:
        raise ValueError(f"amount: expected a positive integer of nano-USD, got {amount_nano!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100_000:
        raise ValueError(f"count: expected 1..100000, got {count!r}")
    if expires_at is not None and expires_at.tzinfo is None:
        raise ValueError("expires_at: expected a timezone-aware datetime")
    codes = [new_code() for _ in range(count)]
    async with conn.transaction():
        batch = await conn.fetchval("SELECT nextval('redemption_batch_seq')")
        await conn.executemany(
            "INSERT INTO redemption_codes (code_hash, prefix, amount_nano, batch_id, expires_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(code_hash(c), c[:DISPLAY_LEN], amount_nano, batch, expires_at) for c in codes],
        )
    return codes


async def redeem(conn: asyncpg.Connection, code: str, user_id: int) -> int:
    """Credit the code's amount to `user_id` exactly once; return the amount in nano-USD."""
    h = code_hash(code)
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE redemption_codes SET redeemed_by = $2, redeemed_at = now()"
            " WHERE code_hash = $1 AND redeemed_by IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())"
            " RETURNING amount_nano, prefix",
            h, user_id,
        )
        if row is None:
            why = await conn.fetchrow(
                "SELECT redeemed_by, expires_at <= now() AS expired FROM redemption_codes"
                " WHERE code_hash = $1", h)
            if why is None:
                raise CodeNotFound("unknown redemption code")
            if why["redeemed_by"] is not None:
                raise CodeAlreadyRedeemed("this redemption code has already been used")
            raise CodeExpired("this redemption code has expired")
        amount = int(row["amount_nano"])
        credited = await conn.fetchval(
            "UPDATE users SET balance_nano = balance_nano + $2 WHERE id = $1 RETURNING id",
            user_id, amount)
        if credited is None:
            raise UnknownUser(f"user {user_id} not found")  # rolls the redemption back too
        await conn.execute(
            "INSERT INTO topups (user_id, amount_nano, external_id, note) VALUES ($1, $2, $3, $4)",
            user_id, amount, "code:" + h.hex(), f"redemption code {row['prefix']}…",
        )
    return amount


async def void_codes(conn: asyncpg.Connection, *, batch_id: int | None = None,
                     prefix: str | None = None) -> int:
    """Void the unredeemed codes of a batch, or the one code with this display prefix:
    they can no longer be redeemed. Returns how many were voided."""
    if (batch_id is None) == (prefix is None):
        raise ValueError("give a batch or a code prefix")
    arg: int | str
    if batch_id is not None:
        col, arg = "batch_id", batch_id
    else:
        col, arg = "prefix", (prefix or "").strip().upper()
    rows = await conn.fetch(
        "UPDATE redemption_codes SET voided_at = now(),"
        " expires_at = least(coalesce(expires_at, now()), now())"
        f" WHERE {col} = $1 AND redeemed_by IS NULL AND voided_at IS NULL RETURNING 1", arg)
    return len(rows)

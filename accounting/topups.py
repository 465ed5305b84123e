"""Balance credits from operators and payment integrations, idempotent by external id.

A payment provider retries its webhook until it sees a 2xx, so the same payment can
arrive ten times, concurrently: `credit` inserts the `topups` row first and lets the
unique `external_id` decide, inside the caller's transaction, so exactly one of the
retries moves the balance and the others learn that they were duplicates (and of the
original topup). Debits for usage are the ledger's job, not this module's; it never
imports relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from accounting.money import MAX_NANO
from accounting.store import Conflict, NotFound, StoreError

Conn = Any  # asyncpg.Connection or a pool's connection proxy


@dataclass(frozen=True, slots=True)
class Credit:
    topup_id: int
    user_id: int
    amount_nano: int
    external_id: str | None
    balance_nano: int  # the balance right after this call (not after the original credit)
    duplicate: bool  # True: the external id was seen before and nothing moved
    created_at: datetime


async def credit(
    conn: Conn, user_id: int, amount_nano: int, external_id: str | None = None, note: str = ""
) -> Credit:
    """Credit `amount_nano` (> 0) to a user and journal it, at most once per external id.

    A repeat with the same external id, user and amount is a no-op that returns the
    original topup with `duplicate=True`; a repeat that differs raises Conflict.
    """
    if isinstance(amount_nano, bool) or not isinstance(amount_nano, int) or amount_nano <= 0:
        raise StoreError(f"amount: expected a positive amount, got {amount_nano!r}")
    if amount_nano > MAX_NANO:
        raise StoreError("amount: too large")
    if external_id is not None and not external_id:
        raise StoreError("external_id: must not be empty when given")
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO topups (user_id, amount_nano, external_id, note)"
            " SELECT id, $2, $3, $4 FROM users WHERE id = $1"
            " ON CONFLICT (external_id) DO NOTHING RETURNING id, created_at",
            user_id, amount_nano, external_id, note,
        )
        if row is None:
            if external_id is None:
                raise NotFound(f"user {user_id} not found")
            prior = await conn.fetchrow(
                "SELECT id, user_id, amount_nano, created_at FROM topups WHERE external_id = $1",
                external_id,
            )
            if prior is None:  # no such user (the SELECT inserted nothing)
                raise NotFound(f"user {user_id} not found")
            if prior["user_id"] != user_id or prior["amount_nano"] != amount_nano:
                raise Conflict(f"external_id {external_id!r} was already used for another topup")
            balance = await conn.fetchval("SELECT balance_nano FROM users WHERE id = $1", user_id)
            return Credit(prior["id"], user_id, amount_nano, external_id, int(balance), True,
                          prior["created_at"])
        try:
            balance = await conn.fetchval(
                "UPDATE users SET balance_nano = balance_nano + $2 WHERE id = $1 RETURNING balance_nano",
                user_id, amount_nano,
            )
        except asyncpg.NumericValueOutOfRangeError:
            raise StoreError("amount: the balance would exceed the int64 range")
        return Credit(row["id"], user_id, amount_nano, external_id, int(balance), False,
                      row["created_at"])


async def list_topups(
    conn: Conn, user_id: int | None = None, *, limit: int = 50, before_id: int | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest topups first (optionally of one user): (rows, before_id of the next page or None)."""
    limit = max(1, min(limit, 1000))
    where: list[str] = []
    args: list[Any] = []
    if user_id is not None:
        args.append(user_id)
        where.append(f"user_id = ${len(args)}")
    if before_id is not None:
        args.append(before_id)
        where.append(f"id < ${len(args)}")
    args.append(limit + 1)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    rows = [dict(r) for r in await conn.fetch(
        "SELECT id, user_id, amount_nano, external_id, note, created_at FROM topups"
        f"{clause} ORDER BY id DESC LIMIT ${len(args)}", *args)]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1]["id"] if more else None)

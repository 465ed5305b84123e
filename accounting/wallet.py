"""Transfers of balance between users, and a user's balance history.

A transfer is one `transfers` row keyed by the sender's idempotency token (the form
carries one), plus a debit and a credit in the topups journal, all in one transaction:
a repeated submission finds its row and moves nothing, so money moves exactly once. The
debit never takes the sender below zero (accounting.store.topup refuses). Both users
see it in their history; the audit log records it. This module never imports relay.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from accounting import store
from accounting.store import Conflict, NotFound, StoreError

Conn = Any


async def transfer(conn: Conn, from_user: int, to_email: str, amount_nano: int, idem: str,
                   *, min_nano: int = 1) -> dict[str, Any]:
    """Send `amount_nano` to the user with this email; returns the transfer row (the
    first one for `idem`, unchanged, when repeated)."""
    if not idem or len(idem) > 100:
        raise StoreError("transfer: missing idempotency token")
    if isinstance(amount_nano, bool) or not isinstance(amount_nano, int) or amount_nano < max(1, min_nano):
        raise StoreError("amount: below the smallest transfer")
    async with store._transaction(conn) as tx:
        prior = await tx.fetchrow("SELECT * FROM transfers WHERE idem = $1", idem)
        if prior is not None:
            if prior["from_user"] != from_user:
                raise Conflict("transfer: this form was already used")
            return dict(prior)
        to = await tx.fetchrow("SELECT id, email FROM users WHERE lower(email) = lower($1)"
                               " AND status = 'active'", to_email.strip())
        if to is None:
            raise NotFound("No active account has this email")
        if to["id"] == from_user:
            raise StoreError("You cannot send money to yourself")
        sender = await tx.fetchval("SELECT email FROM users WHERE id = $1", from_user)
        row = await tx.fetchrow(
            "INSERT INTO transfers (from_user, to_user, amount_nano, idem) VALUES ($1, $2, $3, $4)"
            " RETURNING *", from_user, to["id"], amount_nano, idem)
        # Lower id first, so two opposite transfers at once cannot deadlock.
        legs = sorted([(from_user, -amount_nano, f"transfer:{row['id']}:out",
                        f"transfer to {to['email']}"),
                       (to["id"], amount_nano, f"transfer:{row['id']}:in",
                        f"transfer from {sender}")])
        for uid, amount, ext, note in legs:
            await store.topup(tx, uid, amount, external_id=ext, note=note)
        await store.audit(tx, f"user:{from_user}", "wallet.transfer", str(to["id"]),
                          {"transfer_id": row["id"], "amount_nano": amount_nano})
    return dict(row)


async def history(conn: Conn, user_id: int, *, limit: int = 50,
                  before_id: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """The balance's journal, newest first: top-ups, codes, transfers, plan purchases,
    sign-up and invite credits (everything that moved the balance but usage)."""
    from accounting.topups import list_topups

    return await list_topups(conn, user_id, limit=limit, before_id=before_id)


async def usage_by_day(conn: Conn, user_id: int, start: datetime, end: datetime,
                       tz: str) -> list[dict[str, Any]]:
    from accounting import reports

    return await reports.spend_series(conn, start, end, "day", user_id=user_id, tz=tz)

"""Redemption codes: batches made with an amount and an expiry, listing by batch,
prefix or state. A code itself is returned once, by the call that makes it.
"""

from __future__ import annotations

from typing import Any

from accounting import codes, reports, store
from relay import errors as E
from relay.ops.base import Op
from relay.ops.parse import (
    int_,
    nano,
    only,
    q_int,
    text,
    time_,
)
from relay.ops.views import (
    code_json,
    money,
)
from relay.webapi import Reply


async def codes_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"amount", "amount_nano", "count", "expires_at"})
    amount = nano(body, "amount", required=True)
    count = int_(body, "count", lo=1, hi=10_000)
    if count is None:
        raise E.InvalidRequest("count: required (1..10000)")
    expires = time_(body, "expires_at")
    assert amount is not None
    async with op.tx() as conn:
        made = await codes.create_codes(conn, amount, count, expires)
        batch = await conn.fetchval(
            "SELECT batch_id FROM redemption_codes WHERE code_hash = $1", codes.code_hash(made[0]))
        await store.audit(conn, op.actor, "codes.create", str(batch),
                          {"count": count, "amount_nano": amount,
                           "expires_at": expires.isoformat() if expires else None})
    return Reply(201, {"batch_id": batch, **money("amount", amount), "count": count,
                       "expires_at": expires, "codes": made})


async def codes_list(op: Op) -> Any:
    q = op.query
    limit = q_int(q, "limit", 100, lo=1, hi=1000) or 100
    offset = q_int(q, "cursor", 0) or 0
    async with op.read() as conn:
        rows = await reports.list_codes(conn, batch_id=q_int(q, "batch"),
                                        prefix=(q.get("prefix") or "").upper() or None,
                                        state=q.get("state") or None,
                                        limit=limit + 1, offset=offset)
    more = len(rows) > limit
    return {"data": [code_json(r) for r in rows[:limit]],
            "next": str(offset + limit) if more else None}


async def codes_show(op: Op) -> Any:
    prefix = op.params["prefix"].upper()
    async with op.read() as conn:
        rows = await reports.list_codes(conn, prefix=prefix, limit=1000)
    if not rows:
        raise E.NotFound(f"no redemption code starts with {prefix!r}")
    return {"data": [code_json(r) for r in rows], "next": None}


async def codes_void(op: Op) -> dict[str, Any]:
    """Void a batch's unredeemed codes (`batch`) or one code (`prefix`)."""
    body = op.body()
    only(body, {"batch", "prefix"})
    batch = int_(body, "batch", lo=1, hi=2**62)
    prefix = (text(body, "prefix") or "").strip().upper() or None
    async with op.tx() as conn:
        n = await codes.void_codes(conn, batch_id=batch, prefix=prefix)
        if n == 0:
            raise E.NotFound("no unredeemed code to void there")
        await store.audit(conn, op.actor, "codes.void", str(batch or prefix), {"voided": n})
    return {"voided": n}

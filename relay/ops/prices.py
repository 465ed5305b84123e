"""Model prices: the current version of each model, setting a new version, the history.
"""

from __future__ import annotations

from typing import Any

from accounting import pricing, store
from accounting.pricing import LONG_CONTEXT_CLASSES, MAX_LONG_CONTEXT_THRESHOLD
from relay import errors as E
from relay.config import Price
from relay.ops.base import Op
from relay.ops.parse import (
    int_,
    only,
    text,
    time_,
)
from relay.ops.views import (
    price_json,
)
from relay.webapi import Reply


async def prices_list(op: Op) -> Any:
    async with op.read() as conn:
        rows = await pricing.current_all(conn)
    if op.query.get("model"):
        rows = [r for r in rows if r.model == op.query["model"]]
    return {"data": [price_json(r) for r in rows], "next": None}


async def prices_scheduled(op: Op) -> Any:
    """Versions written to take effect later (not part of the JSON API's table: the
    prices page shows them; the API's history lists them with their effective_at)."""
    async with op.read() as conn:
        versions = await pricing.scheduled(conn)
    return {"data": [{**price_json(v.row), "created_at": v.created_at, "created_by": v.created_by}
                     for v in versions], "next": None}


async def prices_set(op: Op) -> Reply:
    body = op.body()
    only(body, {"model", "input", "output", "cache_read", "cache_write", "effective_at",
                "long_context_threshold", *LONG_CONTEXT_CLASSES})
    effective_at = time_(body, "effective_at")
    model = (text(body, "model", required=True) or "").strip()
    if not model:
        raise E.InvalidRequest("model: must not be empty (\"default\" prices unknown models)")
    parts: dict[str, Any] = {}
    for f in ("input", "output", "cache_read", "cache_write", *LONG_CONTEXT_CLASSES):
        v = body.get(f)
        if v is None and f in ("input", "output"):
            raise E.InvalidRequest(f"{f}: required (USD per 1M tokens, e.g. \"0.15\")")
        if v is not None and not isinstance(v, str):
            raise E.InvalidRequest(f"{f}: expected a decimal string such as \"0.15\", got {v!r}")
        parts[f] = v or ""
    # Input tokens above which the whole request is billed at the long_context_* prices.
    threshold = int_(body, "long_context_threshold", hi=MAX_LONG_CONTEXT_THRESHOLD) or 0
    if threshold:
        parts["long_context_threshold"] = threshold
    price = Price(**parts)
    async with op.tx() as conn:
        before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM prices")
        current = (await pricing.current_all(conn))
        old = next((r for r in current if r.model == model), None)
        row = await pricing.set_price(conn, model, price, op.actor, effective_at)
        created = row.version > before
        if created:
            await store.audit(conn, op.actor, "price.set", model,
                              {"version": row.version, **parts,
                               "effective_at": effective_at.isoformat() if effective_at else None},
                              before=None if old is None else price_json(old))
    return Reply(201 if created else 200, {**price_json(row), "created": created})


async def prices_history(op: Op) -> Any:
    model = op.query.get("model")
    if not model:
        raise E.InvalidRequest("model: required")
    async with op.read() as conn:
        versions = await pricing.history(conn, model)
    return {"data": [{**price_json(v.row), "created_at": v.created_at, "created_by": v.created_by}
                     for v in versions], "next": None}

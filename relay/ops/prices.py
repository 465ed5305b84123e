"""Model prices: the current version of each model, setting a new version, the history.
"""

from __future__ import annotations

from typing import Any

from accounting import pricing, store
from relay import errors as E
from relay.config import Price
from relay.ops.base import Op
from relay.ops.parse import (
    only,
    text,
)
from relay.ops.views import (
    price_json,
)
from relay.webapi import Reply


async def prices_list(op: Op) -> Any:
    async with op.read() as conn:
        book = pricing.PriceBook(await pricing.load_since(conn, 0))
    models = book.models()
    if op.query.get("model"):
        models = [m for m in models if m == op.query["model"]]
    return {"data": [price_json(book.lookup(m)) for m in models], "next": None}


async def prices_set(op: Op) -> Reply:
    body = op.body()
    only(body, {"model", "input", "output", "cache_read", "cache_write"})
    model = (text(body, "model", required=True) or "").strip()
    if not model:
        raise E.InvalidRequest("model: must not be empty (\"default\" prices unknown models)")
    parts = {}
    for f in ("input", "output", "cache_read", "cache_write"):
        v = body.get(f)
        if v is None and f in ("input", "output"):
            raise E.InvalidRequest(f"{f}: required (USD per 1M tokens, e.g. \"0.15\")")
        if v is not None and not isinstance(v, str):
            raise E.InvalidRequest(f"{f}: expected a decimal string such as \"0.15\", got {v!r}")
        parts[f] = v or ""
    price = Price(**parts)
    async with op.tx() as conn:
        before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM prices")
        row = await pricing.set_price(conn, model, price, op.actor)
        created = row.version > before
        if created:
            await store.audit(conn, op.actor, "price.set", model,
                              {"version": row.version, **parts})
    return Reply(201 if created else 200, {**price_json(row), "created": created})


async def prices_history(op: Op) -> Any:
    model = op.query.get("model")
    if not model:
        raise E.InvalidRequest("model: required")
    async with op.read() as conn:
        versions = await pricing.history(conn, model)
    return {"data": [{**price_json(v.row), "created_at": v.created_at, "created_by": v.created_by}
                     for v in versions], "next": None}

"""Usage for the whole site: spend over time, per model, the request log with each
request's bill, and health by group, key, user, model or channel.
"""

from __future__ import annotations

from datetime import timedelta
from fractions import Fraction
from typing import Any

from accounting import health, pricing, reports
from accounting.money import parse_multiplier
from relay import errors as E
from relay.ops.base import Op
from relay.ops.parse import (
    decode_cursor,
    encode_cursor,
    parse_time,
    q_bool,
    q_int,
    window,
)
from relay.ops.views import (
    with_usd,
)


async def _usage_filters(op: Op, conn: Any, q: dict[str, str]) -> dict[str, Any]:
    return {"user_id": await op._user_id(conn, q), "key_id": q_int(q, "key"),
            "group": q.get("group") or None}


async def usage_series(op: Op) -> Any:
    q = op.query
    bucket = q.get("bucket") or "hour"
    if bucket not in reports.BUCKETS:
        raise E.InvalidRequest(f"bucket: expected hour or day, got {bucket!r}")
    start, end = window(q, timedelta(days=30) if bucket == "day" else timedelta(hours=24))
    async with op.read() as conn:
        f = await _usage_filters(op, conn, q)
        rows = await reports.spend_series(conn, health.hour_floor(start), end, bucket,
                                          model=q.get("model") or None, **f)
    return {"start": start, "end": end, "bucket": bucket,
            "data": [with_usd(r, "cost_nano") for r in rows]}


async def usage_models(op: Op) -> Any:
    q = op.query
    start, end = window(q, timedelta(hours=24))
    async with op.read() as conn:
        f = await _usage_filters(op, conn, q)
        rows = await reports.per_model(conn, health.hour_floor(start), end, **f)
    if q.get("model"):
        rows = [r for r in rows if r["model"] == q["model"]]
    return {"start": start, "end": end, "data": [with_usd(r, "cost_nano") for r in rows]}


async def requests_list(op: Op) -> Any:
    q = op.query
    if q.get("request_id"):
        async with op.read() as conn:
            row = await reports.usage_row(conn, q["request_id"])
        return {"data": [] if row is None else [with_usd(row, "cost_nano")], "next": None}
    start = parse_time(q["start"], "start") if q.get("start") else None
    end = parse_time(q["end"], "end") if q.get("end") else None
    async with op.read() as conn:
        f = await _usage_filters(op, conn, q)
        rows, nxt = await reports.request_log(
            conn, start=start, end=end, model=q.get("model") or None,
            status=q_int(q, "status", lo=0, hi=999), errors_only=q_bool(q, "errors_only"),
            limit=q_int(q, "limit", 50, lo=1, hi=1000) or 50,
            before_cursor=decode_cursor(q.get("cursor")), channel=q.get("channel") or None, **f)
    return {"data": [with_usd(r, "cost_nano") for r in rows], "next": encode_cursor(nxt)}


async def requests_show(op: Op) -> Any:
    async with op.read() as conn:
        row = await reports.usage_row(conn, op.params["request_id"])
        if row is None:
            raise E.NotFound(f"no usage row for request {op.params['request_id']!r}")
        bill = await explain_row(op.gw, conn, row)
    return {"usage": with_usd(row, "cost_nano"), "bill": bill}


async def health_view(op: Op) -> Any:
    q = op.query
    by = q.get("by") or "group"
    if by not in health.BY:
        raise E.InvalidRequest(f"by: expected one of {', '.join(health.BY)}, got {by!r}")
    start, end = window(q, timedelta(hours=1))
    async with op.read() as conn:
        f = await _usage_filters(op, conn, q)
        rows = await health.health(conn, start, end, by, model=q.get("model") or None, **f)
    start, end = health.widened(start, end)  # the window the figures cover
    return {"start": start, "end": end, "by": by,
            "data": [with_usd(r, "cost_nano") for r in rows]}


async def explain_row(gw: Any, conn: Any, row: dict[str, Any]) -> dict[str, Any] | None:
    """The bill of a logged request with its own price version and the multiplier stored
    on the row; None when the request was never priced.

    Rows written before the multiplier was stored read '1'; when that does not
    reproduce the charge, the group's current multiplier is tried (see 004_ledger.sql).
    """
    version = row["price_version"]
    if not version:
        return None
    price = gw.pricebook.by_version(version) if gw.pricebook is not None else None
    if price is None:
        price = await pricing.load_version(conn, version)
    if price is None:
        return None
    stored = await conn.fetchval(
        "SELECT multiplier FROM usage_log WHERE request_id = $1 AND ts = $2",
        row["request_id"], row["ts"])
    try:
        mult = parse_multiplier(stored) if stored else Fraction(1)
    except ValueError:
        mult = Fraction(1)
    bill = reports.explain(row, price, mult)
    current = gw.groups.multiplier.get(row["group"], Fraction(1))
    if not bill["matches_charged"] and current != mult:
        other = reports.explain(row, price, current)
        if other["matches_charged"]:
            return other
    return bill

"""Health of traffic per group, user, key or model over a window: request count, success
rate, spend, cache-hit rate, average latency and time to first byte, last request.

Read-only queries over `usage_hourly` (the flusher keeps it), so a health view costs
the same on a busy day as on a quiet one and never scans the request log. A window is
widened to whole hours, the aggregates' grain. This module never writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

# How rows are grouped, and what each group is called in the output.
BY = {
    "group": ("h.group_name", "", "group"),
    "user": ("h.user_id", " LEFT JOIN users u ON u.id = h.user_id", "user_id"),
    "key": ("h.key_id", " LEFT JOIN keys k ON k.id = h.key_id", "key_id"),
    "model": ("h.model", "", "model"),
}
_LABEL = {"user": ", min(u.name) AS user_name", "key": ", min(k.name) AS key_name,"
          " min(k.key_prefix) AS key_prefix, min(k.user_id) AS user_id_of_key"}


def hour_floor(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _rate(num: int, den: int) -> float | None:
    """A ratio for display (not money), four decimals; None when there is nothing to divide."""
    return None if den <= 0 else round(num / den, 4)


async def health(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    by: str = "group",
    *,
    user_id: int | None = None,
    key_id: int | None = None,
    group: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """One row per group (or user, key, model) with traffic in [start, end), busiest first."""
    if by not in BY:
        raise ValueError(f"by: expected one of {', '.join(BY)}, got {by!r}")
    col, join, name = BY[by]
    args: list[Any] = [hour_floor(start), end]
    where = ["h.hour >= $1", "h.hour < $2"]
    for column, value in (("h.user_id", user_id), ("h.key_id", key_id),
                          ("h.group_name", group), ("h.model", model)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    rows = await conn.fetch(
        f"SELECT {col} AS name{_LABEL.get(by, '')},"
        " sum(h.requests)::bigint AS requests, sum(h.errors)::bigint AS errors,"
        " sum(h.input_tokens)::bigint AS input_tokens,"
        " sum(h.output_tokens)::bigint AS output_tokens,"
        " sum(h.cache_read_tokens)::bigint AS cache_read_tokens,"
        " sum(h.cache_write_tokens)::bigint AS cache_write_tokens,"
        " sum(h.cost_nano)::bigint AS cost_nano,"
        " sum(h.latency_ms_sum)::bigint AS latency_ms_sum,"
        " sum(h.ttfb_ms_sum)::bigint AS ttfb_ms_sum,"
        " max(h.last_at) AS last_at"
        f" FROM usage_hourly h{join} WHERE {' AND '.join(where)}"
        " GROUP BY 1 ORDER BY requests DESC, 1", *args)
    out = []
    for r in rows:
        d = dict(r)
        req, err = d["requests"], d["errors"]
        cached, fresh = d["cache_read_tokens"], d["input_tokens"]
        lat, ttfb = d.pop("latency_ms_sum"), d.pop("ttfb_ms_sum")
        d[name] = d.pop("name")
        if by == "key":
            d["user_id"] = d.pop("user_id_of_key")
        d["success_rate"] = _rate(req - err, req)
        d["cache_hit_rate"] = _rate(cached, fresh + cached)
        d["avg_latency_ms"] = lat // req if req else None
        d["avg_ttfb_ms"] = ttfb // req if req else None
        out.append(d)
    return out

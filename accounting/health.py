"""Health of traffic per group, user, key or model over a window: request count, success
rate, spend, cache-hit rate, average latency and time to first byte, last request.

Read-only queries over the aggregates the flusher keeps (007_scale.sql), so a health
view never scans the request log and stays fast on tens of millions of rows:
narrowed to a user or key, `usage_hourly` through its user / key index; by group or
model, `usage_hourly_models`; by user or key across everyone, `usage_daily_keys` for
the whole UTC days of the window and `usage_hourly_keys` for the partial days at its
ends (008_views.sql: per key, without the model; `usage_daily` / `usage_hourly` when
also narrowed by model). A window is widened to whole hours, the aggregates' grain, and
one longer than two days to whole UTC days. This module never writes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg

# How rows are grouped, and what each group is called in the output.
BY = {
    "group": ("h.group_name", "", "group"),
    "user": ("h.user_id", " LEFT JOIN users u ON u.id = a.grp", "user_id"),
    "key": ("h.key_id", " LEFT JOIN keys k ON k.id = a.grp", "key_id"),
    "model": ("h.model", "", "model"),
}
_LABEL = {"user": ", u.name AS user_name", "key": ", k.name AS key_name,"
          " k.key_prefix AS key_prefix, k.user_id AS user_id_of_key"}


def hour_floor(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


# Planner settings for one aggregate query, local to its transaction. JIT compiles
# expressions for ~150 ms once a plan's estimated cost passes jit_above_cost, which a
# 30-day view over usage_hourly does, to save less than that; and the server's default
# random_page_cost (4, for spinning disks) makes an hour-range read of usage_hourly
# (rows stored in hour order) look dearer than reading the whole table. Measured in
# bench/RESULTS.md, "Usage views at scale".
_TUNE = "SET LOCAL jit = off; SET LOCAL random_page_cost = 1.1"


async def fetch_aggregate(conn: asyncpg.Connection, sql: str, *args: Any) -> list[asyncpg.Record]:
    """`conn.fetch(sql, *args)` with the planner settings above, for the aggregate views."""
    async with conn.transaction(readonly=not conn.is_in_transaction()):
        await conn.execute(_TUNE)
        return await conn.fetch(sql, *args)


def _day_floor(t: datetime) -> datetime:
    """00:00 UTC of `t`'s UTC day (the grain of usage_daily)."""
    return t - timedelta(seconds=t.timestamp() % 86400)


_MEASURES = ("requests, errors, input_tokens, output_tokens, cache_read_tokens,"
             " cache_write_tokens, cost_nano, latency_ms_sum, ttfb_ms_sum, last_at")


def _source(by: str, start: datetime, end: datetime, narrowed: bool, model: str | None,
            args: list[Any]) -> tuple[str, list[str]]:
    """FROM clause (aliased h) and its time conditions for a window [start, end)."""
    if narrowed:
        return "usage_hourly h", ["h.hour >= $1", "h.hour < $2"]
    if by in ("group", "model"):
        return "usage_hourly_models h", ["h.hour >= $1", "h.hour < $2"]
    # By user or key across everyone: without a model filter, the per-key aggregates
    # (008_views.sql), one row per key and hour or day instead of one per key, model
    # and hour or day.
    hourly, daily, cols = (("usage_hourly", "usage_daily", "user_id, key_id, group_name, model")
                           if model is not None else
                           ("usage_hourly_keys", "usage_daily_keys", "user_id, key_id, group_name"))
    d0 = _day_floor(start)
    if d0 < start:
        d0 += timedelta(days=1)
    d1 = _day_floor(end)
    if d1 <= d0:
        return f"{hourly} h", ["h.hour >= $1", "h.hour < $2"]
    if (d0, d1) == (start, end):  # whole days (a window longer than WHOLE_DAYS_PAST)
        return f"{daily} h", ["h.day >= $1", "h.day < $2"]
    args += [d0, d1]
    cols = f"{cols}, {_MEASURES}"
    n0, n1 = len(args) - 1, len(args)
    return (f"(SELECT {cols} FROM {hourly}"
            f" WHERE (hour >= $1 AND hour < ${n0}) OR (hour >= ${n1} AND hour < $2)"
            f" UNION ALL SELECT {cols} FROM {daily} WHERE day >= ${n0} AND day < ${n1}) h"), []


# A window longer than this is widened to whole UTC days: from 00:00 UTC of its first
# day to 00:00 UTC after its last. Summing the partial days at both ends from the hourly
# aggregates read up to two days of per-hour rows (5,000 busy keys: ~240k rows) to
# refine a 7-day figure by hours; whole days read one row per key and day.
WHOLE_DAYS_PAST = timedelta(days=2)


def _rate(num: int, den: int) -> float | None:
    """A ratio for display (not money), four decimals; None when there is nothing to divide."""
    return None if den <= 0 else round(num / den, 4)


def widened(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The window [start, end) a health view actually covers: whole hours, and whole UTC
    days when longer than WHOLE_DAYS_PAST (the admin API reports this one)."""
    if end - start > WHOLE_DAYS_PAST:
        start, last = _day_floor(start), _day_floor(end)
        end = last if last == end else last + timedelta(days=1)
    return hour_floor(start), end


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
    """One row per group (or user, key, model) with traffic in [start, end), busiest first.

    The window is widened to whole hours, and when longer than two days
    (WHOLE_DAYS_PAST) to whole UTC days.
    """
    if by not in BY:
        raise ValueError(f"by: expected one of {', '.join(BY)}, got {by!r}")
    col, join, name = BY[by]
    start, end = widened(start, end)
    args: list[Any] = [start, end]
    source, where = _source(by, start, end, user_id is not None or key_id is not None,
                            model, args)
    for column, value in (("h.user_id", user_id), ("h.key_id", key_id),
                          ("h.group_name", group), ("h.model", model)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    # Sum first, then look up the few labels: joining every aggregate row to keys or
    # users before grouping cost more than the sums.
    rows = await fetch_aggregate(
        conn,
        f"SELECT a.grp AS name{_LABEL.get(by, '')}, a.* FROM (SELECT {col} AS grp,"
        " sum(h.requests)::bigint AS requests, sum(h.errors)::bigint AS errors,"
        " sum(h.input_tokens)::bigint AS input_tokens,"
        " sum(h.output_tokens)::bigint AS output_tokens,"
        " sum(h.cache_read_tokens)::bigint AS cache_read_tokens,"
        " sum(h.cache_write_tokens)::bigint AS cache_write_tokens,"
        " sum(h.cost_nano)::bigint AS cost_nano,"
        " sum(h.latency_ms_sum)::bigint AS latency_ms_sum,"
        " sum(h.ttfb_ms_sum)::bigint AS ttfb_ms_sum,"
        " max(h.last_at) AS last_at"
        f" FROM {source}{' WHERE ' if where else ''}{' AND '.join(where)} GROUP BY 1) a{join}"
        " ORDER BY a.requests DESC, 1", *args)
    out = []
    for r in rows:
        d = dict(r)
        req, err = d["requests"], d["errors"]
        cached, fresh = d["cache_read_tokens"], d["input_tokens"]
        lat, ttfb = d.pop("latency_ms_sum"), d.pop("ttfb_ms_sum")
        d[name] = d.pop("name")
        del d["grp"]
        if by == "key":
            d["user_id"] = d.pop("user_id_of_key")
        d["success_rate"] = _rate(req - err, req)
        d["cache_hit_rate"] = _rate(cached, fresh + cached)
        d["avg_latency_ms"] = lat // req if req else None
        d["avg_ttfb_ms"] = ttfb // req if req else None
        out.append(d)
    return out

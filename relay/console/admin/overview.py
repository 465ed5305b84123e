"""The overview: the whole site's requests, spend and errors over the last day (hourly)
or month (daily), the top users, keys and models, channels by state, and the usage
ledger's backlog and last flush. Everything is read from the hourly aggregates (never
usage_log), so the page costs the same at 10 rows or 10M.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import orjson

from accounting import health, reports
from relay.console.admin import show
from relay.console.home import chart_json
from relay.console.web import VIEWER, Page, Response

TOP = 10


def routes(c: Any) -> None:
    c.router.add("GET", "/admin", lambda p: overview(c, p), VIEWER)


async def overview(c: Any, p: Page) -> Response:
    span = p.query.get("span", "day")
    if span not in ("day", "month"):
        span = "day"
    now = c.now()
    if span == "day":
        start, bucket = health.hour_floor(now - timedelta(hours=23)), "hour"
    else:
        start = (now - timedelta(days=29)).replace(hour=0, minute=0, second=0, microsecond=0)
        bucket = "day"
    end = now + timedelta(hours=1)
    day_start = health.hour_floor(now - timedelta(hours=23))

    async def on_own_connection(fn: Any, *args: Any) -> Any:
        async with c.db.acquire() as conn:
            return await fn(conn, *args)

    async def newest(conn: Any) -> Any:
        return await conn.fetchval("SELECT max(last_at) FROM usage_hourly_keys WHERE hour >= $1",
                                   health.hour_floor(now - timedelta(hours=2)))

    # Independent aggregates, each on a connection of its own: the page waits for the
    # slowest, not for their sum.
    series, users, keys, models, last_row = await asyncio.gather(
        on_own_connection(reports.spend_series, start, end, bucket),
        on_own_connection(reports.top_spenders, day_start, end, "user", TOP),
        on_own_connection(reports.top_spenders, day_start, end, "key", TOP),
        on_own_connection(reports.top_spenders, day_start, end, "model", TOP),
        on_own_connection(newest))
    totals = {k: sum(int(r[k] or 0) for r in series) for k in ("requests", "errors", "cost_nano")}
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    last = health.hour_floor(now) if bucket == "hour" else midnight
    spend_data = orjson.loads(chart_json(series, c._(p, "Spend (USD)"), start, last, bucket))
    spend_data["bucket"] = bucket
    errors_at = {int(r["bucket"].timestamp()): int(r["errors"] or 0) for r in series}
    errors_data = {**spend_data, "label": c._(p, "Errors"), "unit": "count",
                   "y": [errors_at.get(x, 0) for x in spend_data["x"]]}
    status = c.gw.router.status() if getattr(c.gw, "router", None) is not None else {}
    states: dict[str, list[str]] = {}
    for name, snap in sorted(status.items()):
        states.setdefault(str(snap.get("state", "closed")), []).append(name)
    flusher = getattr(c.worker, "flusher", None) if c.worker is not None else None
    ledger = flusher.stats() if flusher is not None else None
    return show(c, p, "overview.html", span=span, series=series, totals=totals,
                chart=orjson.dumps(spend_data).decode(),
                users=users, keys=keys, models=models, states=states,
                ledger=ledger, last_row=last_row,
                errors_chart=orjson.dumps(errors_data).decode())


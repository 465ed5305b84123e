"""Usage (curve and per-model table, CSV), the request log (cursor pages, each request's
bill, CSV) and group health, always narrowed to the signed-in user.

The user id comes from the session, never from the request; a key, request id or
subscription of another user answers 404 like one that does not exist. Days and hours
are those of the user's time zone. The queries are accounting.reports' and
accounting.health's (the admin API's), over the hourly aggregates; the request log is
keyset-paginated (never OFFSET).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from accounting import health, reports, store
from accounting.money import format_usd
from relay.console.home import chart_json
from relay.console.web import USER, Page, Refused, Response, redirect
from relay.ops.usage import explain_row

LOG_PAGE = 50
CSV_MAX_ROWS = 100_000


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/console/usage", lambda p: usage(c, p), USER)
    r.add("GET", "/console/usage.csv", lambda p: usage_csv(c, p), USER)
    r.add("GET", "/console/logs", lambda p: logs(c, p), USER)
    r.add("GET", "/console/logs.csv", lambda p: logs_csv(c, p), USER)
    r.add("GET", "/console/logs/{request_id}", lambda p: log_one(c, p), USER)
    r.add("GET", "/console/health", lambda p: health_page(c, p), USER)


def _day(c: Any, p: Page, text: str, default: datetime) -> datetime:
    if not text:
        return default
    try:
        d = datetime.fromisoformat(text.strip())
    except ValueError:
        raise Refused(400, c._(p, "Dates look like 2026-12-31."))
    if d.tzinfo is None:
        d = d.replace(tzinfo=c.zone(p))
    return d


async def filters(c: Any, p: Page, conn: Any, days: int = 30) -> dict[str, Any]:
    """The page's filters, checked: a key must be one of the user's own."""
    q = p.query
    zone = c.zone(p)
    today = c.now().astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    start = _day(c, p, q.get("from", ""), today - timedelta(days=days - 1))
    end_day = _day(c, p, q.get("to", ""), today)
    end = end_day + timedelta(days=1)  # the "to" day is included
    if end <= start:
        raise Refused(400, c._(p, "The end date is before the start date."))
    keys = await store.list_keys(conn, p.user_id, include_deleted=True)
    key_id = None
    if q.get("key"):
        try:
            key_id = int(q["key"])
        except ValueError:
            key_id = -1
        if key_id not in {k.id for k in keys}:
            raise Refused(404, c._(p, "No such key."))
    bucket = q.get("bucket", "day")
    if bucket not in reports.BUCKETS:
        bucket = "day"
    status = None
    if q.get("status"):
        try:
            status = int(q["status"])
        except ValueError:
            status = None
    return {"start": start.astimezone(UTC), "end": end.astimezone(UTC), "key_id": key_id,
            "model": q.get("model", "").strip() or None, "group": q.get("group", "").strip() or None,
            "bucket": bucket, "keys": keys, "status": status,
            "from_text": start.strftime("%Y-%m-%d"), "to_text": end_day.strftime("%Y-%m-%d")}


def _query(p: Page, **over: str) -> str:
    from urllib.parse import urlencode

    q = {k: v for k, v in p.query.items() if v and k not in ("cursor", "ok")}
    q.update(over)
    return urlencode({k: v for k, v in q.items() if v})


async def usage(c: Any, p: Page) -> Response:
    async with c.db.acquire() as conn:
        f = await filters(c, p, conn)
        series = await reports.spend_series(conn, f["start"], f["end"], f["bucket"],
                                            user_id=p.user_id, key_id=f["key_id"],
                                            model=f["model"], group=f["group"], tz=p.tz)
        models = await reports.per_model(conn, f["start"], f["end"], user_id=p.user_id,
                                         key_id=f["key_id"], group=f["group"])
    if f["model"]:
        models = [m for m in models if m["model"] == f["model"]]
    total = sum(int(m["cost_nano"] or 0) for m in models)
    last = f["end"] - (timedelta(days=1) if f["bucket"] == "day" else timedelta(hours=1))
    chart = chart_json(series, c._(p, "Spend (USD)"), f["start"], last, f["bucket"])
    chart = chart[:-1] + f',"bucket":"{f["bucket"]}"}}'
    return c.render(p, "usage.html", f=f, series=series, models=models, total=total,
                    chart=chart, csv_url="/console/usage.csv?" + _query(p))


def _csv(rows: list[list[Any]], name: str) -> Response:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return Response(200, buf.getvalue().encode(), b"text/csv; charset=utf-8", [
        (b"content-disposition", f'attachment; filename="{name}"'.encode()),
        (b"cache-control", b"no-store")])


async def usage_csv(c: Any, p: Page) -> Response:
    """Per model: requests, tokens and cost, then the total; cost in nano-USD and USD
    (exact decimals), summing to the ledger's figure for the same window."""
    async with c.db.acquire() as conn:
        f = await filters(c, p, conn)
        models = await reports.per_model(conn, f["start"], f["end"], user_id=p.user_id,
                                         key_id=f["key_id"], group=f["group"])
    if f["model"]:
        models = [m for m in models if m["model"] == f["model"]]
    cols = ["requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens",
            "cache_write_tokens", "reasoning_tokens", "cost_nano"]
    rows: list[list[Any]] = [["model", *cols, "cost_usd"]]
    totals = dict.fromkeys(cols, 0)
    for m in models:
        rows.append([m["model"], *(int(m[k] or 0) for k in cols), format_usd(int(m["cost_nano"] or 0))])
        for k in cols:
            totals[k] += int(m[k] or 0)
    rows.append(["TOTAL", *(totals[k] for k in cols), format_usd(totals["cost_nano"])])
    return _csv(rows, f"usage-{f['from_text']}-{f['to_text']}.csv")


async def _log_rows(c: Any, p: Page, conn: Any, f: dict[str, Any], cursor: str | None,
                    limit: int) -> tuple[list[dict[str, Any]], str | None]:
    try:
        return await reports.request_log(
            conn, start=f["start"], end=f["end"], user_id=p.user_id, key_id=f["key_id"],
            model=f["model"], group=f["group"], status=f["status"],
            errors_only=p.query.get("errors") == "1", limit=limit, before_cursor=cursor)
    except ValueError:
        raise Refused(400, c._(p, "This page link is not valid."))


async def logs(c: Any, p: Page) -> Response:
    rid = p.query.get("request_id", "").strip()
    if rid:
        from urllib.parse import quote

        return redirect(f"/console/logs/{quote(rid, safe='')}")
    async with c.db.acquire() as conn:
        f = await filters(c, p, conn, days=7)
        rows, nxt = await _log_rows(c, p, conn, f, p.query.get("cursor") or None, LOG_PAGE)
    names = {k.id: k.name or f"#{k.id}" for k in f["keys"]}
    more = "/console/logs?" + _query(p, cursor=nxt) if nxt else ""
    if p.htmx and p.query.get("cursor"):
        return c.render(p, "_log_rows.html", rows=rows, names=names, more=more)
    return c.render(p, "logs.html", f=f, rows=rows, names=names, more=more,
                    csv_url="/console/logs.csv?" + _query(p), errors=p.query.get("errors") == "1")


# The request log's CSV: the columns, and the SQL that gives each from a page of
# reports.request_log_query (Postgres writes the CSV: no Python per row).
_CSV_COLS = (
    ("request_id", "request_id"),
    ("ts", "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"),
    ("key_id", "key_id"), ("group", "group_name"), ("model", "model"), ("status", "status"),
    ("error_code", "error_code"), ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"), ("cache_read_tokens", "cache_read_tokens"),
    ("cache_write_tokens", "cache_write_tokens"), ("reasoning_tokens", "reasoning_tokens"),
    ("cost_nano", "cost_nano"), ("price_version", "price_version"), ("latency_ms", "latency_ms"),
    ("ttfb_ms", "ttfb_ms"), ("usage_source", "usage_source"),
    # Exact decimal dollars, as accounting.money.format_usd writes them ("0.00015", "5").
    ("cost_usd", "trim_scale(cost_nano::numeric / 1000000000)::text"),
)
async def logs_csv(c: Any, p: Page) -> Response:
    """Every request in the window, newest first, up to CSV_MAX_ROWS, streamed: one
    statement (the Logs page's filters) that Postgres writes as CSV (COPY), passed to the
    client as it comes, so a heavy user's export costs one sorted read and no Python per
    row (bench/RESULTS.md, "Console pages at scale")."""
    async with c.db.acquire() as conn:
        f = await filters(c, p, conn, days=7)
    select = ", ".join(sql for _, sql in _CSV_COLS)
    head = ",".join(name for name, _ in _CSV_COLS).encode() + b"\n"

    async def body(write: Any) -> None:
        await write(head)
        async with c.db.acquire() as conn:
            query = await reports.request_log_query(
                conn, start=f["start"], end=f["end"], user_id=p.user_id, key_id=f["key_id"],
                model=f["model"], group=f["group"], status=f["status"],
                errors_only=p.query.get("errors") == "1", limit=CSV_MAX_ROWS, export=True)
            if query is None:
                return
            sql, args = query

            async def out(data: bytes) -> None:
                await write(bytes(data))

            await conn.copy_from_query(f"SELECT {select} FROM ({sql}) q", *args, output=out,
                                       format="csv")

    return Response(200, b"", b"text/csv; charset=utf-8", [
        (b"content-disposition",
         f'attachment; filename="requests-{f["from_text"]}-{f["to_text"]}.csv"'.encode()),
        (b"cache-control", b"no-store")], stream=body)


async def log_one(c: Any, p: Page) -> Response:
    rid = p.params["request_id"]
    async with c.db.acquire() as conn:
        row = await reports.usage_row(conn, rid)
        if row is None or row["user_id"] != p.user_id:
            raise Refused(404, c._(p, "No such request."))
        bill = await explain_row(c.gw, conn, row)
        key = await store.get_key(conn, row["key_id"])
    return c.render(p, "log.html", row=row, bill=bill, key=key)


async def health_page(c: Any, p: Page) -> Response:
    hours = 24
    try:
        hours = max(1, min(24 * 30, int(p.query.get("hours", "24"))))
    except ValueError:
        pass
    end = c.now()
    start = end - timedelta(hours=hours)
    async with c.db.acquire() as conn:
        by_group = await health.health(conn, start, end, "group", user_id=p.user_id)
        by_key = await health.health(conn, start, end, "key", user_id=p.user_id)
        by_model = await health.health(conn, start, end, "model", user_id=p.user_id)
        # A plan's owner sees each member key's traffic (team keys share the plan credit).
        team = await conn.fetch(
            "SELECT k.id, k.name, k.plan_id FROM keys k JOIN subscriptions s ON s.id = k.plan_id"
            " WHERE s.user_id = $1 AND k.plan_id <> 0 ORDER BY k.plan_id, k.id", p.user_id)
    team_ids = {r["id"]: dict(r) for r in team}
    members = [dict(r, plan_id=team_ids[r["key_id"]]["plan_id"]) for r in by_key
               if r.get("key_id") in team_ids]
    return c.render(p, "health.html", by_group=by_group, by_key=by_key, by_model=by_model,
                    members=members, hours=hours)

"""The request log across every user: the key holder's filters (time, key, model, group,
status, errors, request id) plus user and channel, newest first in keyset pages (never
OFFSET), and each request's bill (the same explanation the key holder sees).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from relay.console.admin import Failed, run, show
from relay.console.web import VIEWER, Page, Response, redirect
from relay.ops import usage as ops

FILTERS = ("from", "to", "user", "key", "model", "group", "channel", "status", "errors")
PAGE = 50


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/logs", lambda p: listing(c, p), VIEWER)
    r.add("GET", "/admin/logs/{request_id}", lambda p: one(c, p), VIEWER)


def _day(c: Any, p: Page, text: str) -> datetime | None:
    if not text.strip():
        return None
    try:
        d = datetime.fromisoformat(text.strip())
    except ValueError:
        raise Failed(c._(p, "Dates look like 2026-12-31."), status=400)
    return d.replace(tzinfo=c.zone(p)) if d.tzinfo is None else d


async def listing(c: Any, p: Page) -> Response:
    q = p.query
    rid = q.get("request_id", "").strip()
    if rid:
        return redirect(f"/admin/logs/{quote(rid, safe='')}")
    error = ""
    rows: list[dict[str, Any]] = []
    nxt = None
    try:
        start = _day(c, p, q.get("from", "")) or (c.now() - timedelta(days=7))
        end_day = _day(c, p, q.get("to", ""))
        query = {"start": start.astimezone(UTC).isoformat(), "limit": str(PAGE)}
        if end_day is not None:
            query["end"] = (end_day + timedelta(days=1)).astimezone(UTC).isoformat()
        for k in ("user", "key", "model", "group", "channel", "status", "cursor"):
            if q.get(k, "").strip():
                query[k] = q[k].strip()
        if q.get("errors") == "1":
            query["errors_only"] = "true"
        found = await run(c, p, ops.requests_list, query=query)
        rows, nxt = found["data"], found["next"]
    except Failed as exc:
        error = exc.message
    kept = {k: q[k] for k in FILTERS if q.get(k)}
    more = "/admin/logs?" + urlencode({**kept, "cursor": nxt}) if nxt else ""
    filters = {k: q.get(k, "") for k in FILTERS}
    names = await _names(c, rows)
    return show(c, p, "logs.html", 400 if error else 200, error=error, rows=rows, more=more,
                filters=filters, names=names)


async def _names(c: Any, rows: list[dict[str, Any]]) -> dict[int, str]:
    ids = sorted({r["user_id"] for r in rows})
    if not ids:
        return {}
    async with c.db.acquire() as conn:
        found = await conn.fetch("SELECT id, coalesce(email, name) AS n FROM users"
                                 " WHERE id = ANY($1::bigint[])", ids)
    return {r["id"]: r["n"] for r in found}


async def one(c: Any, p: Page) -> Response:
    try:
        got = await run(c, p, ops.requests_show, params={"request_id": p.params["request_id"]})
    except Failed as exc:
        return show(c, p, "missing.html", exc.status, error=exc.message)
    row = got["usage"]
    names = await _names(c, [row])
    return show(c, p, "log.html", row=row, bill=got["bill"], user_name=names.get(row["user_id"], ""))

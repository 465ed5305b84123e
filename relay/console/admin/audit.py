"""The audit log: every operator action (actor, action, target, what it set and what it
replaced, when), newest first, filterable by actor, action, target and time, one keyset
page at a time. Secrets never reach it (relay.ops records ids and prefixes only).
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.console.admin import Failed, run, show
from relay.console.web import VIEWER, Page, Response
from relay.ops import audit as ops

FILTERS = ("actor", "action", "target", "start", "end")


def routes(c: Any) -> None:
    c.router.add("GET", "/admin/audit", lambda p: listing(c, p), VIEWER)


def _json(v: Any) -> str:
    if v is None or v == {}:
        return ""
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS, default=str).decode()


async def listing(c: Any, p: Page) -> Response:
    q = {k: p.query[k].strip() for k in (*FILTERS, "cursor") if p.query.get(k, "").strip()}
    error = ""
    try:
        found = await run(c, p, ops.audit_list, query={**q, "limit": "100"})
    except Failed as exc:
        found, error = {"data": [], "next": None}, exc.message
    rows = [{**r, "detail_text": _json(r["detail"]), "before_text": _json(r.get("before"))}
            for r in found["data"]]
    return show(c, p, "audit.html", 400 if error else 200, error=error, rows=rows,
                next=found["next"], filters={k: p.query.get(k, "") for k in FILTERS})

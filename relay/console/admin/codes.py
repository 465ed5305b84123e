"""Redemption codes: make a batch (amount, count, expiry) and see its codes once, on the
page or as a CSV download; list codes by batch, prefix and state (CSV too); void a
batch's unredeemed codes or one code. Only display prefixes are stored, so a list
never holds a redeemable code.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from relay.console import back
from relay.console.admin import Failed, body, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import codes as ops


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/codes", lambda p: listing(c, p), VIEWER)
    r.add("GET", "/admin/codes.csv", lambda p: listing_csv(c, p), VIEWER)
    r.add("POST", "/admin/codes", lambda p: create(c, p), ADMIN)
    r.add("POST", "/admin/codes/void", lambda p: void(c, p), ADMIN)


def _query(p: Page) -> dict[str, str]:
    return {k: p.query[k] for k in ("batch", "prefix", "state", "cursor") if p.query.get(k)}


async def listing(c: Any, p: Page, error: str = "", status: int = 200,
                  made: dict[str, Any] | None = None) -> Response:
    try:
        found = await run(c, p, ops.codes_list, query={**_query(p), "limit": "100"})
    except Failed as exc:
        found, error = {"data": [], "next": None}, exc.message
    return show(c, p, "codes.html", status, error=error, codes=found["data"], next=found["next"],
                filters={k: p.query.get(k, "") for k in ("batch", "prefix", "state")}, made=made,
                form=p.form)


def _csv(rows: list[list[Any]], name: str) -> Response:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return Response(200, buf.getvalue().encode(), b"text/csv; charset=utf-8",
                    [(b"content-disposition", f'attachment; filename="{name}"'.encode()),
                     (b"cache-control", b"no-store")])


async def listing_csv(c: Any, p: Page) -> Response:
    rows: list[list[Any]] = [["prefix", "batch_id", "amount_usd", "state", "expires_at",
                              "redeemed_by", "redeemed_at", "created_at"]]
    query, cursor = _query(p), None
    for _ in range(100):  # at most 100,000 rows
        found = await run(c, p, ops.codes_list, query={**query, "limit": "1000",
                                                       **({"cursor": cursor} if cursor else {})})
        rows += [[r["prefix"], r["batch_id"], r["amount_usd"], r["state"], r["expires_at"] or "",
                  r["redeemed_by"] or "", r["redeemed_at"] or "", r["created_at"]]
                 for r in found["data"]]
        cursor = found["next"]
        if cursor is None:
            break
    return _csv(rows, "codes.csv")


async def create(c: Any, p: Page) -> Response:
    fields: dict[str, Any] = {"amount": p.form.get("amount", "").strip()}
    try:
        count = p.form.get("count", "").strip()
        fields["count"] = int(count) if count.isdigit() else count
        if p.form.get("expires_at", "").strip():
            fields["expires_at"] = p.form["expires_at"].strip()
        made = body(await run(c, p, ops.codes_create, fields=fields))
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    if p.form.get("format") == "csv":
        return _csv([["code", "amount_usd", "batch_id", "expires_at"],
                     *[[code, made["amount_usd"], made["batch_id"], made["expires_at"] or ""]
                       for code in made["codes"]]], f"codes-batch-{made['batch_id']}.csv")
    return await listing(c, p, made=made)


async def void(c: Any, p: Page) -> Response:
    fields: dict[str, Any] = {}
    if p.form.get("batch", "").strip().isdigit():
        fields["batch"] = int(p.form["batch"])
    elif p.form.get("prefix", "").strip():
        fields["prefix"] = p.form["prefix"].strip()
    try:
        await run(c, p, ops.codes_void, fields=fields)
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back("/admin/codes", ok="done")

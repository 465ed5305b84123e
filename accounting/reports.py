"""Usage reports: one request's row and bill, spend over time, per-model totals, and the
request log, for the CLI and the admin API.

Totals come from the aggregates the flusher keeps, so they stay fast on tens of
millions of rows (bench/usage_scale.py): `usage_hourly` when narrowed to a user or key
(through its user / key index), else `usage_hourly_models` (per hour, group and
model). Only single-row lookups and the paged request log touch `usage_log`, always
through an index. Read-only: this module never writes.
"""

from __future__ import annotations

from datetime import datetime
from fractions import Fraction
from typing import Any

import asyncpg
import orjson

from accounting import pricing
from accounting.health import fetch_aggregate
from accounting.money import parse_multiplier
from accounting.records import Usage

_LOG_COLS = (
    "request_id, ts, user_id, key_id, group_name, model, upstream_model, channel, protocol,"
    " route, stream, status, error_code, input_tokens, output_tokens, cache_read_tokens,"
    " cache_write_tokens, reasoning_tokens, usage_source, cost_nano, price_version, latency_ms,"
    " ttfb_ms, attempts, channels_tried, client_request_id, client_ip, plan_id, multiplier,"
    " upstream_request_id, response_id"
)
_SUMS = (
    "sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,"
    " sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens,"
    " sum(cache_read_tokens)::bigint AS cache_read_tokens,"
    " sum(cache_write_tokens)::bigint AS cache_write_tokens,"
    " sum(reasoning_tokens)::bigint AS reasoning_tokens, sum(cost_nano)::bigint AS cost_nano,"
    " (sum(latency_ms_sum) / nullif(sum(requests), 0))::bigint AS avg_latency_ms,"
    " (sum(ttfb_ms_sum) / nullif(sum(requests), 0))::bigint AS avg_ttfb_ms"
)
BUCKETS = ("hour", "day")


def _totals(user_id: int | None, key_id: int | None) -> str:
    """The aggregate table for a view narrowed (or not) to a user or key."""
    return "usage_hourly" if user_id is not None or key_id is not None else "usage_hourly_models"


def _row_dict(r: asyncpg.Record) -> dict[str, Any]:
    d = dict(r)
    d["group"] = d.pop("group_name")
    return d


async def usage_row(
    conn: asyncpg.Connection, request_id: str, *, key_id: int | None = None
) -> dict[str, Any] | None:
    """The usage row for a gateway request id, else for a client's own request id, else
    for the id of the response body the client got (chatcmpl-…, msg_…, resp_…).

    With `key_id`, only that key's rows are candidates (a key holder's view: another
    key's row with the same client request id must neither show nor hide its own).
    """
    # The key id goes in as a constant, not a parameter: from its sixth run a prepared
    # statement may switch to a generic plan, and the generic plan for "request_id = $1
    # AND key_id = $2 ORDER BY ts DESC" walks the key's (key_id, ts) index newest first,
    # filtering on the request id: over a second for a busy key (bench/RESULTS.md,
    # "Usage views at scale"). With the key as a constant the planner sees how busy the
    # key is and takes the request id index.
    scope, args = ("", [request_id]) if key_id is None else (f" AND key_id = {int(key_id)}", [request_id])
    r = await conn.fetchrow(
        f"SELECT {_LOG_COLS} FROM usage_log WHERE request_id = $1{scope} ORDER BY ts DESC LIMIT 1",
        *args)
    if r is None and request_id:
        r = await conn.fetchrow(
            f"SELECT {_LOG_COLS} FROM usage_log WHERE client_request_id = $1"
            f" AND client_request_id <> ''{scope} ORDER BY ts DESC LIMIT 1", *args)
    if r is None and request_id:
        r = await conn.fetchrow(
            f"SELECT {_LOG_COLS} FROM usage_log WHERE response_id = $1"
            f" AND response_id <> ''{scope} ORDER BY ts DESC LIMIT 1", *args)
    return None if r is None else _row_dict(r)


def explain(
    row: dict[str, Any],
    price: pricing.PriceRow,
    multiplier: Fraction | None = None,
    *,
    fallback: Fraction | None = None,
) -> dict[str, Any]:
    """The bill of a logged request: tokens × its price version × multiplier, the rounding,
    and whether that reproduces the cost actually charged.

    The multiplier is the one stored in the row, the one actually applied at
    settlement. A row logged before the column existed stores '' : `fallback` (the
    group's multiplier, which may have changed since) is used for it, else 1. An
    explicit `multiplier` overrides both (a what-if). `multiplier_source` says which
    one the bill used: "row", "argument", "fallback" or "none".
    """
    source = "argument"
    if multiplier is None:
        multiplier, source = _row_multiplier(row)
        if multiplier is None:
            multiplier, source = (fallback, "fallback") if fallback is not None else (Fraction(1), "none")
    usage = Usage(
        input=row["input_tokens"], output=row["output_tokens"],
        cache_read=row["cache_read_tokens"], cache_write=row["cache_write_tokens"],
        reasoning=row["reasoning_tokens"],
    )
    out = pricing.explain(usage, price, multiplier)
    out["request_id"] = row["request_id"]
    out["usage_source"] = row["usage_source"]
    out["charged_nano"] = row["cost_nano"]
    out["matches_charged"] = out["cost_nano"] == row["cost_nano"]
    out["multiplier_source"] = source
    if price.version != row["price_version"]:
        out["warning"] = (f"row was priced with version {row['price_version']},"
                          f" explained with version {price.version}")
    return out


def _row_multiplier(row: dict[str, Any]) -> tuple[Fraction | None, str]:
    text = row.get("multiplier") or ""
    if not text:
        return None, "none"
    try:
        return parse_multiplier(text), "row"
    except ValueError:
        return None, "none"


def _filters(start: datetime | None, end: datetime | None, col: str, **eq: Any) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if start is not None:
        args.append(start)
        where.append(f"{col} >= ${len(args)}")
    if end is not None:
        args.append(end)
        where.append(f"{col} < ${len(args)}")
    for name, value in eq.items():
        if value is not None:
            args.append(value)
            where.append(f"{name} = ${len(args)}")
    return (" WHERE " + " AND ".join(where)) if where else "", args


async def spend_series(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    bucket: str = "hour",
    user_id: int | None = None,
    key_id: int | None = None,
    model: str | None = None,
    group: str | None = None,
    tz: str = "UTC",
) -> list[dict[str, Any]]:
    """Requests, errors, tokens and cost per hour or day in [start, end); days are those
    of the time zone `tz` (an IANA name; the aggregates are hourly, so a zone whose offset
    is not whole hours gets days that start at the hour before its midnight)."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket: expected one of {', '.join(BUCKETS)}, got {bucket!r}")
    where, args = _filters(start, end, "hour", user_id=user_id, key_id=key_id, model=model,
                           group_name=group)
    args.append(tz)
    rows = await fetch_aggregate(
        conn, f"SELECT date_trunc('{bucket}', hour, ${len(args)}) AS bucket, {_SUMS}"
        f" FROM {_totals(user_id, key_id)}{where} GROUP BY 1 ORDER BY 1", *args)
    return [dict(r) for r in rows]


async def per_model(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    user_id: int | None = None,
    key_id: int | None = None,
    group: str | None = None,
) -> list[dict[str, Any]]:
    """Totals per model in [start, end), dearest first."""
    where, args = _filters(start, end, "hour", user_id=user_id, key_id=key_id, group_name=group)
    rows = await fetch_aggregate(
        conn, f"SELECT model, {_SUMS} FROM {_totals(user_id, key_id)}{where} GROUP BY model"
        " ORDER BY cost_nano DESC, model", *args)
    return [dict(r) for r in rows]


def _cursor(r: dict[str, Any]) -> str:
    return f"{r['ts'].isoformat()}|{r['request_id']}"


# A user's request log walks each of their keys on usage_log (key_id, ts) (007 dropped
# the (user_id, ts) index) and merges the newest rows: one short index walk per key. Past
# this many keys, walking the ts index newest first and filtering by user costs less.
_USER_KEYS_WALK_MAX = 64
# Errors have their own partial index (007); a filter on one error status repeats its
# predicate, which a parameterised status alone would not let the planner prove.
_ERROR_PRED = "(status >= 400 OR error_code <> '')"


async def request_log(
    conn: asyncpg.Connection,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    user_id: int | None = None,
    key_id: int | None = None,
    model: str | None = None,
    group: str | None = None,
    status: int | None = None,
    errors_only: bool = False,
    limit: int = 50,
    before_cursor: str | None = None,
    channel: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest requests first, one page: (rows, cursor of the next page or None).

    Keyset pagination on (ts, request_id): a page costs the same at row 10 and row 10M.
    """
    limit = max(1, min(limit, 1000))
    query = await request_log_query(
        conn, start=start, end=end, user_id=user_id, key_id=key_id, model=model, group=group,
        status=status, errors_only=errors_only, limit=limit + 1, before_cursor=before_cursor,
        channel=channel)
    if query is None:
        return [], None
    sql, args = query
    rows = [_row_dict(r) for r in await conn.fetch(sql, *args)]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (_cursor(rows[-1]) if more and rows else None)


async def request_log_query(
    conn: asyncpg.Connection,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    user_id: int | None = None,
    key_id: int | None = None,
    model: str | None = None,
    group: str | None = None,
    status: int | None = None,
    errors_only: bool = False,
    limit: int = 50,
    before_cursor: str | None = None,
    channel: str | None = None,
    export: bool = False,
) -> tuple[str, list[Any]] | None:
    """The statement of one page of `request_log` (up to `limit` rows, newest first, every
    column of _LOG_COLS), for a caller that reads it another way; None when the user has
    no keys (no rows).

    `export`: one statement for many rows at once (the console's CSV export copies it
    out as CSV): the user's keys are read together and sorted once, instead of walking
    each key for `limit` rows, which for a large limit reads far back on quiet keys."""
    key_ids: list[int] = []
    if user_id is not None and key_id is None:
        key_ids = [r[0] for r in await conn.fetch(
            "SELECT id FROM keys WHERE user_id = $1 ORDER BY id LIMIT $2",
            user_id, _USER_KEYS_WALK_MAX + 1)]
        if not key_ids:
            return None
    walk_keys = 0 < len(key_ids) <= _USER_KEYS_WALK_MAX
    # Walking the user's keys, the user's id is no filter (keys never change owner), and
    # Postgres, taking it for one, would expect a few rows per key and sort them all.
    where, args = _filters(start, end, "ts", user_id=None if walk_keys else user_id,
                           key_id=key_id, model=model, group_name=group, channel=channel)
    clauses = [where[len(" WHERE "):]] if where else []
    if status is not None:
        args.append(status)
        clauses.append(f"status = ${len(args)}")
    if errors_only or (status is not None and status >= 400):
        clauses.append(_ERROR_PRED)
    if before_cursor:
        ts_text, sep, rid = before_cursor.partition("|")
        try:
            ts = datetime.fromisoformat(ts_text)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"before_cursor: not a cursor returned by request_log: {before_cursor!r}")
        args += [ts, rid]
        clauses.append(f"(ts, request_id) < (${len(args) - 1}, ${len(args)})")
    order = "ORDER BY ts DESC, request_id DESC"
    # Each walk is ordered by ts alone, which the (key_id, ts), (ts), (model, ts) and
    # error indexes give directly, and keeps the rows tied with its last one (WITH TIES),
    # so the outer (ts, request_id) order over them is exact. Ordered by
    # (ts, request_id) inside, no index gives the order: with a plan made for the
    # parameters' values (asyncpg's first five runs of a statement) Postgres read and
    # sorted every row of a busy key in the window, 0.4-0.8 s for a week
    # (bench/RESULTS.md, "Console pages at scale").
    walk = "ORDER BY ts DESC FETCH FIRST {n} ROWS WITH TIES"
    args.append(limit)
    lim = f"LIMIT ${len(args)}"
    first = walk.format(n=f"${len(args)}")
    if walk_keys and export:
        args.append(key_ids)
        clauses.append(f"key_id = ANY(${len(args)}::bigint[])")
        sql = f"SELECT {_LOG_COLS} FROM usage_log WHERE {' AND '.join(clauses)} {order} {lim}"
    elif walk_keys:
        args.append(key_ids)
        clauses.append("key_id = k.id")
        sql = (f"SELECT l.* FROM unnest(${len(args)}::bigint[]) AS k(id) CROSS JOIN LATERAL"
               f" (SELECT {_LOG_COLS} FROM usage_log WHERE {' AND '.join(clauses)} {first}) l"
               f" {order} {lim}")
    else:
        where_sql = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = (f"SELECT * FROM (SELECT {_LOG_COLS} FROM usage_log{where_sql} {first}) l"
               f" {order} {lim}")
    return sql, args


async def daily_model_costs(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    *,
    user_id: int | None = None,
    key_id: int | None = None,
) -> list[dict[str, Any]]:
    """Cost per UTC day and model in [start, end): rows of (day, model, requests, cost_nano)."""
    where, args = _filters(start, end, "hour", user_id=user_id, key_id=key_id)
    rows = await fetch_aggregate(
        conn, "SELECT date_trunc('day', hour, 'UTC') AS day, model, sum(requests)::bigint AS requests,"
        f" sum(cost_nano)::bigint AS cost_nano FROM {_totals(user_id, key_id)}{where}"
        " GROUP BY 1, 2 ORDER BY 1, 2", *args)
    return [dict(r) for r in rows]


CODE_STATES = ("unused", "redeemed", "expired")


async def list_codes(
    conn: asyncpg.Connection,
    *,
    batch_id: int | None = None,
    prefix: str | None = None,
    state: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Redemption codes by display prefix only (the codes themselves are not stored), newest
    batch first. `prefix` matches the start of the display prefix ("TW-AB")."""
    if state is not None and state not in CODE_STATES:
        raise ValueError(f"state: expected one of {', '.join(CODE_STATES)}, got {state!r}")
    where: list[str] = []
    args: list[Any] = []
    if batch_id is not None:
        args.append(batch_id)
        where.append(f"batch_id = ${len(args)}")
    if prefix:
        args.append(prefix.replace("\\", "").replace("%", "").replace("_", "\\_") + "%")
        where.append(f"prefix LIKE ${len(args)}")
    if state == "redeemed":
        where.append("redeemed_by IS NOT NULL")
    elif state == "unused":
        where.append("redeemed_by IS NULL AND (expires_at IS NULL OR expires_at > now())")
    elif state == "expired":
        where.append("redeemed_by IS NULL AND expires_at <= now()")
    args += [max(1, min(limit, 1000)), max(0, offset)]
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    rows = await conn.fetch(
        "SELECT prefix, amount_nano, batch_id, expires_at, redeemed_by, redeemed_at, created_at"
        f" FROM redemption_codes{clause} ORDER BY batch_id DESC, created_at DESC, prefix"
        f" LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args)
    return [dict(r) for r in rows]


async def audit_entries(
    conn: asyncpg.Connection,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """The audit log, newest first, one page: (rows, before_id of the next page or None)."""
    limit = max(1, min(limit, 1000))
    where, args = _filters(start, end, "at", actor=actor, action=action, target=target)
    clauses = [where[len(" WHERE "):]] if where else []
    if before_id is not None:
        args.append(before_id)
        clauses.append(f"id < ${len(args)}")
    args.append(limit + 1)
    clause = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = await conn.fetch(
        f"SELECT id, at, actor, action, target, detail::text AS detail, before::text AS before"
        f" FROM audit_log{clause}"
        f" ORDER BY id DESC LIMIT ${len(args)}", *args)
    out = []
    for r in rows:
        d = dict(r)
        d["detail"] = orjson.loads(d["detail"])
        d["before"] = None if d["before"] is None else orjson.loads(d["before"])
        out.append(d)
    more = len(out) > limit
    out = out[:limit]
    return out, (out[-1]["id"] if more else None)


async def top_spenders(conn: asyncpg.Connection, start: datetime, end: datetime, by: str,
                       limit: int = 10) -> list[dict[str, Any]]:
    """The `limit` users, keys or models with the most spend in [start, end), from the
    hourly aggregates without the model dimension where it is not asked for (the
    operator's overview: a few rows, whatever the traffic)."""
    if by == "model":
        sql = ("SELECT model, sum(requests)::bigint AS requests, sum(cost_nano)::bigint AS cost_nano"
               " FROM usage_hourly_models WHERE hour >= $1 AND hour < $2 GROUP BY model"
               " ORDER BY 3 DESC, 1 LIMIT $3")
    elif by == "user":
        sql = ("SELECT t.user_id, u.name AS user_name, t.requests, t.cost_nano FROM ("
               " SELECT user_id, sum(requests)::bigint AS requests, sum(cost_nano)::bigint AS cost_nano"
               " FROM usage_hourly_keys WHERE hour >= $1 AND hour < $2 GROUP BY user_id"
               " ORDER BY 3 DESC, 1 LIMIT $3) t LEFT JOIN users u ON u.id = t.user_id"
               " ORDER BY t.cost_nano DESC, t.user_id")
    elif by == "key":
        sql = ("SELECT t.key_id, k.name AS key_name, k.key_prefix, t.requests, t.cost_nano FROM ("
               " SELECT key_id, sum(requests)::bigint AS requests, sum(cost_nano)::bigint AS cost_nano"
               " FROM usage_hourly_keys WHERE hour >= $1 AND hour < $2 GROUP BY key_id"
               " ORDER BY 3 DESC, 1 LIMIT $3) t LEFT JOIN keys k ON k.id = t.key_id"
               " ORDER BY t.cost_nano DESC, t.key_id")
    else:
        raise ValueError(f"by: expected user, key or model, got {by!r}")
    return [dict(r) for r in await fetch_aggregate(conn, sql, start, end, limit)]

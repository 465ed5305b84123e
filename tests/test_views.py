"""The per-key aggregates (008_views.sql) and the views that read them, against a real
Postgres: the aggregates add up to the log, and health by user or key across everyone
(now read from them) gives what the per-model aggregates give."""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
from test_ledger import make_account, rec

from accounting import health, reports
from accounting.ledger import prepare, write_batch

_SUMS = ("requests", "errors", "cost_nano", "latency_ms_sum", "ttfb_ms_sum")


async def _rows(pg: asyncpg.Connection) -> tuple[str, list, tuple[int, int], tuple[int, int, int]]:  # type: ignore[type-arg]
    group = f"g-{uuid.uuid4().hex[:8]}"  # isolates this test's rows from the session's
    (u1, (k1, k2)), (u2, (k3,)) = await make_account(pg, keys=2), await make_account(pg)
    now = datetime.now(UTC).timestamp()
    times = [now - 3 * 86400 + i * 2011.0 for i in range(3 * 86400 // 2011)]
    rows = [dataclasses.replace(
        rec((u1, u1, u2)[i % 3], (k1, k2, k3)[i % 3], 1000 + i, ts=t,
            model=("m-a", "m-b", "m-c")[i % 5 % 3],
            status=(200, 200, 200, 429, 502)[i % 5] if i % 3 else (429 if i % 11 == 0 else 200)),
        group=group) for i, t in enumerate(times)]
    await prepare(pg)
    for lo in range(0, len(rows), 37):  # several batches, so upserts add to existing rows
        await write_batch(pg, rows[lo:lo + 37])
    return group, rows, (u1, u2), (k1, k2, k3)


async def test_key_aggregates_add_up_to_the_log(pg: asyncpg.Connection) -> None:
    group, rows, _, _ = await _rows(pg)
    for table, grain in (("usage_hourly_keys", "hour"), ("usage_daily_keys", "day")):
        got = await pg.fetch(
            f"SELECT {grain} AS t, user_id, key_id, {', '.join(_SUMS)} FROM {table}"
            " WHERE group_name = $1 ORDER BY 1, 2, 3", group)
        want = await pg.fetch(
            f"SELECT date_trunc('{grain}', ts, 'UTC') AS t, user_id, key_id, count(*) AS requests,"
            " count(*) FILTER (WHERE status >= 400 OR error_code <> '') AS errors,"
            " sum(cost_nano) AS cost_nano, sum(latency_ms) AS latency_ms_sum,"
            " sum(ttfb_ms) AS ttfb_ms_sum FROM usage_log WHERE group_name = $1"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", group)
        assert [tuple(r) for r in got] == [tuple(r) for r in want], table
        assert sum(r["requests"] for r in got) == len(rows)


async def test_health_by_key_and_user_equals_the_per_model_path(pg: asyncpg.Connection) -> None:
    group, rows, _, _ = await _rows(pg)
    now = datetime.now(UTC)
    # Hours only; partial days at both ends around whole ones; past two days, whole days.
    for start in (now - timedelta(hours=20), now - timedelta(hours=47),
                  now - timedelta(days=2, hours=5)):
        end = now + timedelta(hours=1)
        lo = (start.replace(hour=0) if end - start > health.WHOLE_DAYS_PAST else start).replace(
            minute=0, second=0, microsecond=0).timestamp()
        for by in ("key", "user"):
            new = await health.health(pg, start, end, by, group=group)
            assert {d[f"{by}_id"]: d["requests"] for d in new} == Counter(
                getattr(r, f"{by}_id") for r in rows if r.ts >= lo)
            # The model-narrowed view still reads usage_hourly / usage_daily: the per-key
            # figures are the sums of the per-model ones.
            old: dict[int, Counter[str]] = {}
            for m in ("m-a", "m-b", "m-c"):
                for d in await health.health(pg, start, end, by, group=group, model=m):
                    old.setdefault(d[f"{by}_id"], Counter()).update(
                        {k: d[k] for k in ("requests", "errors", "cost_nano", "input_tokens")})
            assert {d[f"{by}_id"]: Counter({k: d[k] for k in ("requests", "errors", "cost_nano",
                                                               "input_tokens")}) for d in new} == old


async def test_user_log_narrowed_to_a_status_matches_the_log(pg: asyncpg.Connection) -> None:
    _, rows, (u1, _), _ = await _rows(pg)
    want = sorted((r for r in rows if r.user_id == u1 and r.status == 429),
                  key=lambda r: (r.ts, r.request_id), reverse=True)
    got, cursor, pages = [], None, 0
    while True:
        page, cursor = await reports.request_log(pg, user_id=u1, status=429, limit=7,
                                                 before_cursor=cursor)
        got += page
        pages += 1
        if cursor is None:
            break
    assert [g["request_id"] for g in got] == [r.request_id for r in want] and pages > 1
    # The index that walk uses (which plan Postgres picks on a test-sized table depends on
    # what else the session wrote; bench/usage_scale.py times it on 10M rows).
    idx = await pg.fetchval(
        "SELECT pg_get_indexdef('usage_log_key_error_idx'::regclass)")
    assert "(key_id, status, ts)" in idx and "WHERE" in idx

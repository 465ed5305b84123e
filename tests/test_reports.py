"""Usage reports and the `codes` / `usage` CLI commands against a real Postgres."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import asyncpg
import orjson
import pytest
from test_ledger import make_account, rec

from accounting import health, reports
from accounting.ledger import prepare, write_batch
from accounting.pricing import PriceRow

# gpt-4o-mini style prices, nano-USD per 1M tokens
PRICE = PriceRow(version=1, model="gpt-4o-mini", input=150_000_000, output=600_000_000,
                 cache_read=75_000_000, cache_write=187_500_000)


async def test_usage_row_explain_series_and_paged_log(pg: asyncpg.Connection) -> None:
    uid, (kid, kid2) = await make_account(pg, keys=2)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    base = hour.timestamp() + 60
    rows = [rec(uid, kid if i % 3 else kid2, 1000 * (i + 1), ts=base + i,
                model="m-a" if i % 2 else "m-b", status=502 if i == 4 else 200) for i in range(10)]
    rows[0].client_request_id = f"client-{rows[0].request_id}"
    await prepare(pg)
    await write_batch(pg, rows)

    got = await reports.usage_row(pg, rows[3].request_id)
    assert got is not None and got["cost_nano"] == 4000 and got["group"] == "default"
    by_client = await reports.usage_row(pg, rows[0].client_request_id)
    assert by_client is not None and by_client["request_id"] == rows[0].request_id
    assert await reports.usage_row(pg, "no-such-request") is None

    # 100 in, 20 out, 5 cache read, 1 cache write at PRICE: 15000 + 12000 + 375 + 187.5
    # = 27562.5 nano, rounded half up once: 27563 (the row says 4000: a mismatch is shown).
    bill = reports.explain(got, PRICE)
    assert bill["cost_nano"] == 27563 and bill["matches_charged"] is False
    assert [c["tokens"] for c in bill["classes"]] == [100, 20, 5, 1]
    big = dict(got, input_tokens=10**6, output_tokens=10**6, cache_read_tokens=0,
               cache_write_tokens=0, cost_nano=750_000_000)
    bill = reports.explain(big, PRICE, Fraction(1))
    assert bill["cost_nano"] == 750_000_000 and bill["matches_charged"] is True
    assert reports.explain(big, PRICE, Fraction(1, 2))["cost_nano"] == 375_000_000

    series = await reports.spend_series(pg, hour, hour + timedelta(hours=1), "hour", user_id=uid)
    assert len(series) == 1 and series[0]["requests"] == 10 and series[0]["errors"] == 1
    assert series[0]["cost_nano"] == sum(r.cost_nano for r in rows)
    day = await reports.spend_series(pg, hour - timedelta(days=1), hour + timedelta(days=1), "day",
                                     key_id=kid2)
    assert sum(d["requests"] for d in day) == len([r for r in rows if r.key_id == kid2])
    models = await reports.per_model(pg, hour, hour + timedelta(hours=1), user_id=uid)
    assert {m["model"]: m["requests"] for m in models} == {"m-a": 5, "m-b": 5}
    with pytest.raises(ValueError):
        await reports.spend_series(pg, hour, hour, "week")

    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page, cursor = await reports.request_log(pg, user_id=uid, limit=4, before_cursor=cursor)
        seen += [r["request_id"] for r in page]
        if cursor is None:
            break
    assert seen == [r.request_id for r in reversed(rows)]  # newest first, no gaps, no repeats
    errs, _ = await reports.request_log(pg, user_id=uid, errors_only=True)
    assert [r["request_id"] for r in errs] == [rows[4].request_id]


def test_cli_codes_and_usage(pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\ndsn = "{pg_dsn}"\n')

    async def setup() -> tuple[int, str]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            uid, (kid,) = await make_account(conn, balance=0)
            r = rec(uid, kid, 1234)
            await prepare(conn)
            await write_batch(conn, [r])
            return uid, r.request_id
        finally:
            await conn.close()

    uid, rid = asyncio.run(setup())
    name = asyncio.run(_user_name(pg_dsn, uid))
    base = ["--config", str(cfg)]
    assert main([*base, "codes", "create", "--amount", "1.5", "--count", "2", "--json"]) == 0
    made = orjson.loads(capsys.readouterr().out)
    assert len(made["codes"]) == 2 and made["amount_nano"] == 1_500_000_000
    assert main([*base, "codes", "redeem", made["codes"][0], "--user", name]) == 0
    assert "1.5" in capsys.readouterr().out
    assert main([*base, "codes", "redeem", made["codes"][0], "--user", name]) == 2
    assert "already been used" in capsys.readouterr().err
    assert main([*base, "usage", "show", rid, "--json"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["request_id"] == rid and shown["cost_nano"] == 1234
    assert main([*base, "usage", "log", "--user", name, "--json"]) == 0
    assert [r["request_id"] for r in orjson.loads(capsys.readouterr().out)["rows"]] == [rid]
    assert main([*base, "usage", "show", "nope"]) == 2


async def _user_name(dsn: str, uid: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT name FROM users WHERE id = $1", uid))
    finally:
        await conn.close()


async def _write(pg: asyncpg.Connection, rows: list) -> None:  # type: ignore[type-arg]
    await prepare(pg)
    res = await write_batch(pg, rows)
    assert res.inserted == len(rows)


async def test_rollups_add_up_to_the_hourly_aggregate(pg: asyncpg.Connection) -> None:
    """usage_hourly_models and usage_daily (007) hold exactly what usage_hourly holds, and
    the views that read them give the figures a scan of the log gives."""
    import dataclasses
    import uuid

    group = f"g-{uuid.uuid4().hex[:8]}"  # isolates this test's rows from the session's
    (u1, (k1, k2)), (u2, (k3,)) = await make_account(pg, keys=2), await make_account(pg)
    now = datetime.now(UTC)
    # Three days back to now: partial first day, whole days, partial today.
    times = [now.timestamp() - 3 * 86400 + i * 3517.0 for i in range(3 * 86400 // 3517)]
    rows = [dataclasses.replace(
        rec((u1, u1, u2)[i % 3], (k1, k2, k3)[i % 3], 1000 + i, ts=t,
            model=("m-a", "m-b")[i % 2], status=502 if i % 7 == 0 else 200), group=group)
        for i, t in enumerate(times)]
    await _write(pg, rows[:40])
    await _write(pg, rows[40:])

    for table in ("usage_daily", "usage_hourly_models"):
        got = await pg.fetchrow(
            f"SELECT sum(requests) AS n, sum(errors) AS e, sum(cost_nano) AS c FROM {table}"
            " WHERE group_name = $1", group)
        assert (got["n"], got["e"], got["c"]) == (
            len(rows), sum(r.status >= 400 for r in rows), sum(r.cost_nano for r in rows)), table

    # Longer than two days: widened to whole UTC days (health.WHOLE_DAYS_PAST).
    start = now - timedelta(days=2, hours=5)
    inside = [r for r in rows if r.ts >= start.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()]
    by_key = await health.health(pg, start, now + timedelta(hours=1), "key", group=group)
    assert {d["key_id"]: d["requests"] for d in by_key} == {
        k: sum(r.key_id == k for r in inside) for k in (k1, k2, k3)}
    assert {d["key_id"]: d["cost_nano"] for d in by_key} == {
        k: sum(r.cost_nano for r in inside if r.key_id == k) for k in (k1, k2, k3)}
    by_user = await health.health(pg, start, now + timedelta(hours=1), "user", group=group)
    assert {d["user_id"]: d["errors"] for d in by_user} == {
        u: sum(r.user_id == u and r.status >= 400 for r in inside) for u in (u1, u2)}
    narrowed = await health.health(pg, start, now + timedelta(hours=1), "key", user_id=u1)
    assert {d["key_id"]: d["requests"] for d in narrowed} == {
        k: sum(r.key_id == k for r in inside) for k in (k1, k2)}
    by_model = await health.health(pg, start, now + timedelta(hours=1), "model", group=group)
    assert {d["model"]: d["requests"] for d in by_model} == {
        m: sum(r.model == m for r in inside) for m in ("m-a", "m-b")}

    lo = (now - timedelta(days=4)).replace(minute=0, second=0, microsecond=0)
    days = await reports.spend_series(pg, lo, now + timedelta(hours=1), "day", group=group)
    per_user = [await reports.spend_series(pg, lo, now + timedelta(hours=1), "day", user_id=u)
                for u in (u1, u2)]
    assert sum(d["cost_nano"] for d in days) == sum(r.cost_nano for r in rows)
    assert sum(d["cost_nano"] for s in per_user for d in s) >= sum(r.cost_nano for r in rows)
    models = await reports.per_model(pg, lo, now + timedelta(hours=1), group=group)
    assert {m["model"]: m["requests"] for m in models} == {
        m: sum(r.model == m for r in rows) for m in ("m-a", "m-b")}


async def test_user_request_log_walks_the_users_keys(pg: asyncpg.Connection) -> None:
    """A user's log (read key by key since 007) is the same newest-first sequence as
    one scan by user, across keys, pages and filters; also past the per-key walk limit."""
    for nkeys in (3, reports._USER_KEYS_WALK_MAX + 1):
        uid, kids = await make_account(pg, keys=nkeys)
        other, (okid,) = await make_account(pg)
        base = time.time() - 3600
        rows = [rec(uid, kids[(i * 7) % nkeys], 10 + i, ts=base + i * 0.5,
                    status=(429 if i % 5 == 0 else 200)) for i in range(90)]
        rows += [rec(other, okid, 1, ts=base + i) for i in range(10)]
        await _write(pg, rows)
        mine = sorted((r for r in rows if r.user_id == uid), key=lambda r: r.ts, reverse=True)
        seen: list[str] = []
        cursor = None
        while True:
            page, cursor = await reports.request_log(pg, user_id=uid, limit=17, before_cursor=cursor)
            assert all(r["user_id"] == uid for r in page)
            seen += [r["request_id"] for r in page]
            if cursor is None:
                break
        assert seen == [r.request_id for r in mine]
        limited, _ = await reports.request_log(pg, user_id=uid, status=429, limit=1000)
        assert [r["request_id"] for r in limited] == [r.request_id for r in mine if r.status == 429]
        one_key, _ = await reports.request_log(pg, user_id=uid, key_id=kids[0], limit=1000)
        assert [r["request_id"] for r in one_key] == [r.request_id for r in mine if r.key_id == kids[0]]
    none, cur = await reports.request_log(pg, user_id=10**12)
    assert none == [] and cur is None


async def test_error_status_filter_uses_the_error_index(pg: asyncpg.Connection) -> None:
    uid, (kid,) = await make_account(pg)
    base = time.time() - 600
    rows = [rec(uid, kid, 5, ts=base + i, status=(418 if i in (3, 9) else 200)) for i in range(20)]
    await _write(pg, rows)
    got, _ = await reports.request_log(pg, status=418, limit=10)
    assert [r["request_id"] for r in got] == [rows[9].request_id, rows[3].request_id]
    ok, _ = await reports.request_log(pg, key_id=kid, status=200, limit=100)
    assert len(ok) == 18
    async with pg.transaction():
        await pg.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await pg.fetch(
            "EXPLAIN SELECT * FROM usage_log WHERE status = 418"
            " AND (status >= 400 OR error_code <> '')"))
    assert "Index Cond: (status = 418)" in plan, plan

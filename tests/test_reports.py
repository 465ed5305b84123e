"""Usage reports and the `codes` / `usage` CLI commands against a real Postgres."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import asyncpg
import orjson
import pytest
from test_ledger import make_account, rec

from accounting import reports
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

"""Usage and health queries on a 10-million-row usage log: every admin and key-holder
query path must answer in under 200 ms.

    .venv/bin/python bench/usage_scale.py [--dsn postgresql://postgres@127.0.0.1:5432/test]
        [--rows 10000000] [--days 30] [--users 1000] [--keys 5000] [--models 20]
        [--groups 5] [--runs 5] [--keep] [--reuse] [--db tollway_scale]

Creates the database `tollway_scale` on the server named by --dsn (dropped at the end
unless --keep; --reuse times an existing one kept earlier without generating again),
applies the migrations, and generates the log server-side (INSERT ... SELECT over
generate_series, no rows cross the wire): one standalone table per UTC day, filled
and indexed on two connections in parallel, then attached as the day's partition
(Postgres adopts the matching indexes, and a CHECK constraint equal to the bound
spares the validation scan). usage_hourly is built from each day with the flusher's
own aggregation (accounting.ledger.rollup_sql), and with it the other aggregates
(usage_daily, usage_hourly_models, usage_hourly_keys, usage_daily_keys). Then VACUUM ANALYZE, and each
query path runs once to warm up and `--runs` times timed, through the same functions
the admin API and the key-holder API call.

The traffic is skewed the way a shared gateway's is: key popularity is Zipf-like
(key k draws ~1/k of the traffic: key 1 about 11 %, most keys a few requests an
hour), each key mostly uses its own two or three models out of --models, users own
their keys round-robin (key k belongs to user (k-1) % users + 1), and each user is in
one of --groups groups. About 2 % of requests fail (429, 502, 400, 499, rarer 504),
5 % carry a client request id.

Exit status 1 if any path's slowest run is 200 ms or more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accounting import health, migrate, reports
from accounting.ledger import rollup_sql

DB = "tollway_scale"
LIMIT_MS = 200.0
GROUPS = ("default", "pro", "team", "edu", "trial", "vip", "beta", "free")
MODEL_NAMES = (
    "gpt-4o-mini", "claude-sonnet-4", "gpt-5.5", "claude-haiku-4", "gpt-4.1", "o4-mini",
    "claude-opus-4", "gemini-2.5-pro", "gemini-2.5-flash", "deepseek-v3", "qwen3-235b",
    "gpt-4o", "llama-4-maverick", "mistral-large", "grok-4", "kimi-k2", "glm-4.6",
    "text-embedding-3-small", "gpt-image-1", "o3",
)


def day_sql(part: str, lo: float, n: int, span_s: float, a: argparse.Namespace, day_no: int) -> str:
    """INSERT of `n` rows with ts in [lo, lo + span_s) into the standalone table `part`."""
    models = "ARRAY[" + ", ".join(f"'{m}'" for m in _models(a.models)) + "]"
    groups = "ARRAY[" + ", ".join(f"'{g}'" for g in GROUPS[:a.groups]) + "]"
    # r: key draw, m: model draw, s: status draw, t: token draws. Key ids are 1..keys
    # (a fresh database), k = floor(exp(ln(keys + 1) * r)) is ~1/k distributed.
    return f"""
    INSERT INTO {part}
    SELECT
        'req_' || lpad(to_hex({day_no} * 16 + (i % 4)), 12, '0') || to_hex(i),
        to_timestamp({lo} + {span_s} * (i - 0.5) / {n}),
        (k - 1) % {a.users} + 1, k, ({groups})[((k - 1) % {a.users}) % {a.groups} + 1],
        md, md, 'ch-' || (length(md) % 5), CASE WHEN md LIKE 'claude%' THEN 'anthropic' ELSE 'openai' END,
        CASE WHEN md LIKE 'claude%' THEN 'messages' ELSE 'chat' END, s > 0.3,
        st, CASE st WHEN 200 THEN '' WHEN 429 THEN 'rate_limited' WHEN 499 THEN 'client_closed'
                    WHEN 400 THEN 'invalid_request' ELSE 'upstream_error' END,
        inp, outp, CASE WHEN t2 < 0.3 THEN inp / 2 ELSE 0 END, CASE WHEN t2 > 0.97 THEN inp / 4 ELSE 0 END,
        CASE WHEN md LIKE 'o%' THEN outp / 2 ELSE 0 END,
        CASE WHEN st = 200 THEN 'upstream' ELSE 'none' END,
        CASE WHEN st = 200 THEN inp * 150 + outp * 600 ELSE 0 END,
        (length(md) % 7) + 1, 80 + (outp * 12), 40 + (t2 * 900)::int,
        CASE WHEN st = 502 THEN 2 ELSE 1 END, 'ch-' || (length(md) % 5),
        CASE WHEN t2 BETWEEN 0.5 AND 0.55 THEN 'cli-' || to_hex(i) || '-' || {day_no} ELSE '' END,
        '10.' || (k % 250) || '.' || (k / 250) || '.7', 0, '1'
    FROM (
        SELECT i, k, ({models})[1 + CASE WHEN m < 0.85 THEN (k * 7 + floor(3 * m * m / 0.7225)::int) % {a.models}
                                      ELSE floor({a.models} * (m - 0.85) / 0.15)::int END] AS md,
               s, t2,
               CASE WHEN s < 0.010 THEN 429 WHEN s < 0.016 THEN 502 WHEN s < 0.019 THEN 400
                    WHEN s < 0.0205 THEN 499 WHEN s < 0.0207 THEN 504 ELSE 200 END AS st,
               floor(exp(ln(30000) * t1))::bigint AS inp, floor(t2 * 1500)::bigint AS outp
        FROM (
            SELECT i, least({a.keys}, floor(exp(ln({a.keys} + 1) * random())))::bigint AS k,
                   random() AS m, random() AS s, random() AS t1, random() AS t2
            FROM generate_series(1, {n}) AS i
        ) r
    ) q
    """


def _models(n: int) -> list[str]:
    return [MODEL_NAMES[i] if i < len(MODEL_NAMES) else f"model-{i}" for i in range(n)]


async def _index_ddl(conn: asyncpg.Connection) -> list[str]:
    """usage_log's index definitions (templates with {part}); the primary key as a constraint."""
    out = []
    for r in await conn.fetch(
            "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def,"
            " i.indisprimary FROM pg_index i WHERE i.indrelid = 'usage_log'::regclass"):
        if r["indisprimary"]:
            cols = r["def"].partition("(")[2].rpartition(")")[0]
            out.append(f"ALTER TABLE {{part}} ADD PRIMARY KEY ({cols})")
        else:
            head, _, tail = r["def"].partition(" USING ")
            unique = "UNIQUE " if head.startswith("CREATE UNIQUE") else ""
            out.append(f"CREATE {unique}INDEX {{part}}_{r['name']} ON {{part}} USING {tail}")
    return out


async def generate(dsn: str, a: argparse.Namespace) -> int:
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "INSERT INTO groups (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        list(GROUPS[:a.groups]))
    await conn.execute(
        "INSERT INTO users (id, name, balance_nano) SELECT g, 'user' || g, 10^15::bigint"
        " FROM generate_series(1, $1) g", a.users)
    await conn.execute(
        "INSERT INTO keys (id, user_id, name, key_hash, key_prefix, group_name)"
        " SELECT g, (g - 1) % $2 + 1, 'key' || g, sha256(g::text::bytea), 'sk-' || lpad(g::text, 5, '0'),"
        " ($3::text[])[((g - 1) % $2) % $4 + 1] FROM generate_series(1, $1) g",
        a.keys, a.users, list(GROUPS[:a.groups]), a.groups)
    await conn.execute("SELECT setval('users_id_seq', $1), setval('keys_id_seq', $2)", a.users, a.keys)
    ddl = await _index_ddl(conn)

    now = time.time()
    today = int(now // 86400) * 86400
    first = today - (a.days - 1) * 86400
    span = now - first
    per_s = a.rows / span
    days = []
    total = 0
    for d in range(a.days):
        lo = first + d * 86400
        hi = min(lo + 86400, now)
        n = round(per_s * (hi - lo)) if d < a.days - 1 else a.rows - total
        total += n
        part = "usage_log_p" + datetime.fromtimestamp(lo, UTC).strftime("%Y%m%d")
        days.append((d, part, lo, n, hi - lo))
        # A partition the migration made (today's) is empty: replace it by a filled one.
        await conn.execute(f"DROP TABLE IF EXISTS {part}")

    queue: asyncio.Queue[tuple[int, str, float, int, float]] = asyncio.Queue()
    for item in days:
        queue.put_nowait(item)
    attach_lock = asyncio.Lock()

    async def worker() -> None:
        c = await asyncpg.connect(dsn, command_timeout=3600)
        await c.execute("SET maintenance_work_mem = '512MB'; SET work_mem = '256MB';"
                        " SET synchronous_commit = off")
        try:
            while not queue.empty():
                d, part, lo, n, span_s = queue.get_nowait()
                lo_ts = datetime.fromtimestamp(lo, UTC)
                hi_ts = lo_ts + timedelta(days=1)
                await c.execute(f"CREATE TABLE {part} (LIKE usage_log INCLUDING DEFAULTS)")
                await c.execute(day_sql(part, lo, n, span_s, a, d))
                for stmt in ddl:
                    await c.execute(stmt.format(part=part))
                await c.execute(
                    f"ALTER TABLE {part} ADD CONSTRAINT {part}_bound"
                    f" CHECK (ts >= '{lo_ts.isoformat()}' AND ts < '{hi_ts.isoformat()}')")
                await c.execute(rollup_sql(part))
                async with attach_lock:
                    await c.execute(
                        f"ALTER TABLE usage_log ATTACH PARTITION {part}"
                        f" FOR VALUES FROM ('{lo_ts.isoformat()}') TO ('{hi_ts.isoformat()}')")
                await c.execute(f"ALTER TABLE {part} DROP CONSTRAINT {part}_bound")
                print(f"  day {d + 1}/{a.days}: {n:,} rows", flush=True)
        finally:
            await c.close()

    await asyncio.gather(*(worker() for _ in range(a.workers)))
    await conn.close()
    return total


async def vacuum(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, command_timeout=3600)
    parts = [r[0] for r in await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'usage_log'::regclass ORDER BY 1")]
    await conn.close()
    todo = [*parts, "usage_hourly", "usage_daily", "usage_hourly_models", "usage_hourly_keys",
            "usage_daily_keys", "users", "keys"]

    async def worker() -> None:
        c = await asyncpg.connect(dsn, command_timeout=3600)
        while todo:
            await c.execute(f"VACUUM (ANALYZE) {todo.pop()}")
        await c.close()

    await asyncio.gather(worker(), worker())
    c = await asyncpg.connect(dsn)
    await c.execute("ANALYZE usage_log")
    await c.close()


Path_ = tuple[str, Callable[[asyncpg.Connection], Awaitable[Any]]]


async def paths(conn: asyncpg.Connection, a: argparse.Namespace) -> list[Path_]:
    """Every query path the admin and key-holder APIs run, with realistic arguments:
    the busiest, a middling and a quiet key / user / model, a group, everything."""
    now = datetime.now(UTC)
    h = health.hour_floor
    d30, d7, d1 = now - timedelta(days=30), now - timedelta(days=7), now - timedelta(hours=24)
    busy = await conn.fetchrow(
        "SELECT key_id, user_id FROM usage_hourly GROUP BY 1, 2 ORDER BY sum(requests) DESC LIMIT 1")
    counts = await conn.fetch(
        "SELECT key_id, sum(requests) AS n FROM usage_hourly GROUP BY 1 ORDER BY 2 DESC")
    mid_key = counts[len(counts) // 2]["key_id"]
    quiet_key = counts[-1]["key_id"]
    ucounts = await conn.fetch(
        "SELECT user_id, sum(requests) AS n FROM usage_hourly GROUP BY 1 ORDER BY 2 DESC")
    busy_user, quiet_user = ucounts[0]["user_id"], ucounts[-1]["user_id"]
    mcounts = await conn.fetch(
        "SELECT model, sum(requests) AS n FROM usage_hourly GROUP BY 1 ORDER BY 2 DESC")
    top_model, rare_model = mcounts[0]["model"], mcounts[-1]["model"]
    group = GROUPS[1 % a.groups]
    rid = await conn.fetchval(
        "SELECT request_id FROM usage_log WHERE ts >= $1 AND ts < $2 LIMIT 1",
        now - timedelta(days=12), now - timedelta(days=11))
    crid = await conn.fetchval(
        "SELECT client_request_id FROM usage_log WHERE client_request_id <> '' AND ts >= $1"
        " AND ts < $2 LIMIT 1", now - timedelta(days=20), now - timedelta(days=19))
    deep = f"{(now - timedelta(days=20)).isoformat()}|"
    print(f"  busiest key {busy['key_id']} (user {busy['user_id']}), middling key {mid_key}"
          f" ({counts[len(counts) // 2]['n']:,} rows), quiet key {quiet_key}"
          f" ({counts[-1]['n']:,} rows); busiest user {busy_user}, quiet user {quiet_user}"
          f" ({ucounts[-1]['n']:,} rows); top model {top_model}, rarest {rare_model}"
          f" ({mcounts[-1]['n']:,} rows)")

    out: list[Path_] = []
    series = {"user busy": {"user_id": busy_user}, "user quiet": {"user_id": quiet_user},
              "key busy": {"key_id": busy["key_id"]}, "key middling": {"key_id": mid_key},
              "model top": {"model": top_model}, "model rare": {"model": rare_model},
              "group": {"group": group}, "all": {}}
    for name, f in series.items():
        out.append((f"spend_series hour 24h {name}",
                    lambda c, f=f: reports.spend_series(c, h(d1), now, "hour", **f)))
        out.append((f"spend_series day 30d {name}",
                    lambda c, f=f: reports.spend_series(c, h(d30), now, "day", **f)))
    for name, f in {"all": {}, "user busy": {"user_id": busy_user},
                    "key busy": {"key_id": busy["key_id"]}, "group": {"group": group}}.items():
        out.append((f"per_model 24h {name}", lambda c, f=f: reports.per_model(c, h(d1), now, **f)))
        out.append((f"per_model 30d {name}", lambda c, f=f: reports.per_model(c, h(d30), now, **f)))

    logs = {"all": {}, "key busy": {"key_id": busy["key_id"]}, "key middling": {"key_id": mid_key},
            "key quiet": {"key_id": quiet_key}, "user busy": {"user_id": busy_user},
            "user quiet": {"user_id": quiet_user}, "model top": {"model": top_model},
            "model rare": {"model": rare_model}, "group": {"group": group},
            "status 502": {"status": 502}, "status 504": {"status": 504},
            "errors only": {"errors_only": True},
            "user busy + status 429": {"user_id": busy_user, "status": 429}}
    for name, f in logs.items():
        out.append((f"request_log first page {name}",
                    lambda c, f=f: reports.request_log(c, limit=50, **f)))
        out.append((f"request_log deep page (20 d back) {name}",
                    lambda c, f=f: reports.request_log(c, limit=50, before_cursor=deep, **f)))
    out.append(("usage_row request id", lambda c: reports.usage_row(c, rid)))
    out.append(("usage_row client request id", lambda c: reports.usage_row(c, crid)))
    out.append(("usage_row unknown id", lambda c: reports.usage_row(c, "req_nosuchrequest")))

    for by in ("group", "user", "key", "model"):
        for wname, start in (("24h", d1), ("7d", d7)):
            out.append((f"health by {by} {wname}",
                        lambda c, by=by, start=start: health.health(c, start, now, by)))
    out.append(("health by key 7d user busy",
                lambda c: health.health(c, d7, now, "key", user_id=busy_user)))
    out.append(("health by user 7d group",
                lambda c: health.health(c, d7, now, "user", group=group)))

    # The key-holder API (relay/keyapi.py): /v1/usage (series + models + first page),
    # one request, the OpenAI-style billing usage over 100 days.
    for name, kid in (("busy", busy["key_id"]), ("quiet", quiet_key)):
        async def own_usage(c: asyncpg.Connection, kid: int = kid) -> Any:
            await reports.spend_series(c, h(d30), now, "day", key_id=kid)
            await reports.per_model(c, h(d30), now, key_id=kid)
            return await reports.request_log(c, start=d30, end=now, key_id=kid, limit=50)
        out.append((f"key-holder /v1/usage 30d key {name}", own_usage))
        out.append((f"key-holder usage_row key {name}",
                    lambda c, kid=kid: reports.usage_row(c, rid, key_id=kid)))
        out.append((f"key-holder billing usage 100d key {name}",
                    lambda c, kid=kid: reports.daily_model_costs(
                        c, now - timedelta(days=100), now, key_id=kid)))
    return out


async def measure(dsn: str, a: argparse.Namespace) -> list[tuple[str, float, float]]:
    conn = await asyncpg.connect(dsn)
    results = []
    try:
        for name, fn in await paths(conn, a):
            if a.only and a.only not in name:
                continue
            await fn(conn)  # warm-up: plan, caches
            times = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                await fn(conn)
                times.append((time.perf_counter() - t0) * 1000)
            p50, mx = statistics.median(times), max(times)
            results.append((name, p50, mx))
            flag = "  <-- OVER" if mx >= LIMIT_MS else ""
            print(f"  {name:<52} p50 {p50:7.1f} ms  max {mx:7.1f} ms{flag}", flush=True)
    finally:
        await conn.close()
    return results


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default=os.environ.get("TOLLWAY_TEST_DSN",
                                                    "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--keys", type=int, default=5000)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--groups", type=int, default=5, choices=range(1, len(GROUPS) + 1))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="connections generating days")
    ap.add_argument("--keep", action="store_true", help=f"keep the database {DB}")
    ap.add_argument("--reuse", action="store_true", help=f"time an existing {DB}, do not generate")
    ap.add_argument("--only", default="", help="time only the paths whose name contains this")
    ap.add_argument("--db", default=DB, help="the database's name (one per engineer on a shared server)")
    a = ap.parse_args()

    db = a.db
    if not db.replace("_", "").isalnum():
        ap.error("--db: letters, digits and _ only")
    dsn = a.dsn.rpartition("/")[0] + "/" + db
    admin = await asyncpg.connect(a.dsn)
    try:
        if not a.reuse:
            await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {db}")
            t0 = time.perf_counter()
            await migrate.apply_dsn(dsn)
            print(f"generating {a.rows:,} usage rows over {a.days} days, {a.users} users,"
                  f" {a.keys} keys, {a.models} models, {a.groups} groups", flush=True)
            total = await generate(dsn, a)
            t1 = time.perf_counter()
            await vacuum(dsn)
            t2 = time.perf_counter()
            print(f"generated {total:,} rows in {t1 - t0:.0f} s, VACUUM ANALYZE {t2 - t1:.0f} s")
        else:
            await migrate.apply_dsn(dsn)
        c = await asyncpg.connect(dsn)
        sizes = await c.fetchrow(
            "SELECT (SELECT count(*) FROM usage_log) AS log_rows,"
            " (SELECT count(*) FROM usage_hourly) AS hourly_rows,"
            " pg_size_pretty((SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
            "   WHERE inhparent = 'usage_log'::regclass)) AS log_size,"
            " pg_size_pretty(pg_total_relation_size('usage_hourly')) AS hourly_size")
        await c.close()
        print(f"usage_log {sizes['log_rows']:,} rows ({sizes['log_size']} with indexes),"
              f" usage_hourly {sizes['hourly_rows']:,} rows ({sizes['hourly_size']})")
        print(f"timing ({a.runs} runs after one warm-up, limit {LIMIT_MS:.0f} ms):")
        results = await measure(dsn, a)
    finally:
        if not a.keep and not a.reuse:
            await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await admin.close()
    over = [r for r in results if r[2] >= LIMIT_MS]
    if over:
        print(f"FAIL: {len(over)} of {len(results)} paths at or over {LIMIT_MS:.0f} ms:"
              + "".join(f"\n  {n}: max {mx:.1f} ms" for n, _, mx in over), file=sys.stderr)
        return 1
    print(f"OK: all {len(results)} paths under {LIMIT_MS:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Console pages on the 10-million-row usage log: each page a key holder opens, timed over
HTTP against a running gateway, for the heaviest user of the data set.

    .venv/bin/python bench/usage_scale.py --keep [--db NAME]   # builds the data set
    .venv/bin/python bench/console_scale.py [--db NAME] [--runs 20]

Uses the database `bench/usage_scale.py --keep` left (applying any newer migration),
gives the busiest user (the owner of the busiest key, ~11 % of all rows) a console
login, starts `python -m relay serve` (one worker) on it, signs in with a session
made directly in the database, and requests each page `--runs` times after one
warm-up, one at a time on one keep-alive connection. Prints p50, p95 and max per page
(for the CSV exports also the bytes and the time to the first byte) and exits 1 when a
page's p95 is over --limit-ms (100). Times are the client's: request sent to last byte.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from accounting import migrate, sessions  # noqa: E402
from bench.run import free_port  # noqa: E402


async def prepare(dsn: str) -> tuple[int, str, str, str]:
    """(user id, session token, a request id of the user's from 12 days ago, a deep cursor)."""
    await migrate.apply_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        uid = await conn.fetchval(
            "SELECT user_id FROM usage_hourly GROUP BY 1 ORDER BY sum(requests) DESC LIMIT 1")
        await conn.execute(
            "UPDATE users SET email = 'heavy@example.com', email_verified = true, tz = 'UTC'"
            " WHERE id = $1", uid)
        token, _, _ = await sessions.create(conn, uid, ip="127.0.0.1", user_agent="console_scale",
                                            max_devices=1000, absolute=timedelta(days=1))
        keys = [r[0] for r in await conn.fetch("SELECT id FROM keys WHERE user_id = $1", uid)]
        now = datetime.now(UTC)
        rid = await conn.fetchval(
            "SELECT request_id FROM usage_log WHERE key_id = ANY($1) AND ts >= $2 AND ts < $3"
            " LIMIT 1", keys, now - timedelta(days=12), now - timedelta(days=11))
        deep = now - timedelta(days=20)
    finally:
        await conn.close()
    return uid, token, rid, f"{deep.isoformat()}|"


def config(path: Path, port: int, dsn: str, data: Path) -> None:
    path.write_text(f"""# written by bench/console_scale.py
[server]
host = "127.0.0.1"
port = {port}
workers = 1
log_client_ip = true   # so the Devices page reads the log (the data set's rows hold no address)

[database]
dsn = "{dsn}"
data_dir = "{data}"

[accounts]
low_balance_check_s = 0
""")


async def wait_up(url: str, proc: subprocess.Popen[bytes], within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the gateway exited with {proc.returncode}")
            try:
                async with s.get(url + "/status") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the gateway did not answer within a minute")


async def measure(url: str, token: str, pages: list[tuple[str, str]], runs: int,
                  limit: float) -> list[tuple[str, float, float, float, int, float]]:
    out = []
    jar = aiohttp.CookieJar(unsafe=True)
    jar.update_cookies({"tw_session": token})
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(cookie_jar=jar, connector=conn) as s:
        for name, path in pages:
            times, first = [], []
            size = 0
            for i in range(runs + 1):
                t0 = time.perf_counter()
                async with s.get(url + path, allow_redirects=False) as r:
                    head = time.perf_counter()
                    body = await r.read()
                    t1 = time.perf_counter()
                if r.status != 200:
                    raise SystemExit(f"{name}: {path} answered {r.status}: {body[:300]!r}")
                if i:  # the first is the warm-up
                    times.append((t1 - t0) * 1000)
                    first.append((head - t0) * 1000)
                    size = len(body)
            times.sort()
            p95 = times[max(0, round(0.95 * len(times)) - 1)]
            row = (name, statistics.median(times), p95, times[-1], size, statistics.median(first))
            out.append(row)
            flag = "  <-- OVER" if p95 > limit else ""
            print(f"  {name:<40} p50 {row[1]:7.1f}  p95 {p95:7.1f}  max {row[3]:7.1f} ms"
                  f"  {size:>9,} B  first byte p50 {row[5]:6.1f} ms{flag}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default=os.environ.get("TOLLWAY_TEST_DSN",
                                                    "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--db", default="tollway_scale")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--limit-ms", type=float, default=100.0)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    dsn = a.dsn.rpartition("/")[0] + "/" + a.db
    token, pages = asyncio.run(setup(dsn, a.only))
    with tempfile.TemporaryDirectory(prefix="tollway-console-scale-") as tmp:
        port = free_port()
        cfg = Path(tmp) / "tollway.toml"
        config(cfg, port, dsn, Path(tmp) / "data")
        with open(Path(tmp) / "gateway.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "relay", "--config", str(cfg), "serve"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(wait_up(url, proc))
                print(f"timing {len(pages)} pages, {a.runs} runs each after one warm-up:")
                results = asyncio.run(measure(url, token, pages, a.runs, a.limit_ms))
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    over = [r for r in results if r[2] > a.limit_ms]
    if over:
        print(f"OVER {a.limit_ms:.0f} ms at p95: " + ", ".join(r[0] for r in over), file=sys.stderr)
        return 1
    print(f"OK: every page's p95 within {a.limit_ms:.0f} ms")
    return 0


async def setup(dsn: str, only: str) -> tuple[str, list[tuple[str, str]]]:
    uid, token, rid, deep = await prepare(dsn)
    conn = await asyncpg.connect(dsn)
    rows = await conn.fetchval("SELECT count(*) FROM usage_log WHERE key_id IN"
                               " (SELECT id FROM keys WHERE user_id = $1)", uid)
    total = await conn.fetchval("SELECT sum(requests) FROM usage_hourly")
    await conn.close()
    print(f"user {uid}: {rows:,} of {total:,} usage rows")
    from urllib.parse import quote

    now = datetime.now(UTC)
    month = (now - timedelta(days=29)).strftime("%Y-%m-%d")
    pages = [
        ("home", "/console"),
        ("usage (30 d, by day)", "/console/usage"),
        ("usage (7 d, by hour)", "/console/usage?bucket=hour&from="
         + (now - timedelta(days=6)).strftime("%Y-%m-%d")),
        ("usage CSV (30 d)", "/console/usage.csv"),
        ("logs, first page (7 d)", "/console/logs"),
        ("logs, first page (30 d)", f"/console/logs?from={month}"),
        ("logs, deep cursor (20 d back)", f"/console/logs?from={month}&cursor={quote(deep, safe='')}"),
        ("logs, errors only (30 d)", f"/console/logs?from={month}&errors=1"),
        ("log detail (bill)", f"/console/logs/{quote(rid, safe='')}"),
        ("logs CSV (today)", "/console/logs.csv?from=" + now.strftime("%Y-%m-%d")),
        ("logs CSV (7 d, up to 100k rows)", "/console/logs.csv"),
        ("keys", "/console/keys"),
        ("account", "/console/account"),
        ("devices", "/console/account/devices"),
        ("health (24 h)", "/console/health"),
        ("wallet", "/console/wallet"),
        ("plans", "/console/plans"),
        ("invite", "/console/invite"),
    ]
    return token, [p for p in pages if only in p[0]]


if __name__ == "__main__":
    sys.exit(main())

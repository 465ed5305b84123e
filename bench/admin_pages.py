"""The operator pages on the 10-million-row data set: each page's latency over HTTP, as an
owner's browser asks for it (session cookie, 2FA passed), p50/p95/max per page.

    .venv/bin/python bench/admin_pages.py --db tollway_scale_operator [--runs 20]

The database is one `bench/usage_scale.py --keep` built (or a copy of it: CREATE DATABASE
x TEMPLATE y); this script applies pending migrations to it, starts one worker on it
(no upstream channels: no model traffic), makes an owner with 2FA, signs in, and asks
every /admin page `--runs` times after one warm-up. Exit status 1 if a page's p95 is
200 ms or more.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import pyotp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accounting import accounts, store
from relay.config import parse
from relay.server import bind_socket, prepare
from relay.worker import Worker

LIMIT_MS = 200.0


async def _owner(dsn: str) -> tuple[str, str, str]:
    email = f"bench-owner-{secrets.token_hex(4)}@example.com"
    password = secrets.token_urlsafe(12)
    secret = pyotp.random_base32()
    hasher = accounts.Passwords(time_cost=1, memory_kib=1024, threads=1)
    try:
        hashed = await hasher.hash(password)
    finally:
        hasher.close()
    conn = await asyncpg.connect(dsn)
    try:
        uid = await store.create_user(conn, email)
        await conn.execute("UPDATE users SET email = $2, password_hash = $3, email_verified = true,"
                           " role = 'owner' WHERE id = $1", uid, email, hashed)
        await accounts.enable_totp(conn, uid, secret, pyotp.TOTP(secret).now())
    finally:
        await conn.close()
    return email, password, secret


async def _sign_in(s: aiohttp.ClientSession, url: str, email: str, password: str, secret: str) -> None:
    async def csrf(path: str) -> str:
        r = await s.get(url + path)
        m = re.search(r'name="csrf" value="([^"]*)"', await r.text())
        return m.group(1) if m else ""

    hdr = {"Origin": url}
    r = await s.post(url + "/console/login", headers=hdr, data={
        "email": email, "password": password, "csrf": await csrf("/console/login")})
    r = await s.post(url + "/console/login/2fa", headers=hdr, data={
        "code": pyotp.TOTP(secret).now(), "csrf": await csrf("/console/login/2fa")})
    assert r.status == 200 and r.url.path == "/console", r.url


async def _pages(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        uid = await conn.fetchval("SELECT user_id FROM usage_hourly_keys ORDER BY hour DESC, cost_nano DESC LIMIT 1")
        key = await conn.fetchval("SELECT id FROM keys WHERE user_id = $1 LIMIT 1", uid)
        model = "gpt-4o-mini"  # priced by this script's config
        rid = await conn.fetchval("SELECT request_id FROM usage_log WHERE ts > now() - interval '2 days'"
                                  " ORDER BY ts DESC LIMIT 1")
        name = await conn.fetchval("SELECT name FROM users WHERE id = $1", uid)
        channel = await conn.fetchval("SELECT channel FROM usage_log ORDER BY ts DESC LIMIT 1")
    finally:
        await conn.close()
    return ["/admin", "/admin?span=month", "/admin/users", f"/admin/users?q={name[:5]}",
            f"/admin/users/{uid}", "/admin/keys", "/admin/keys?prefix=sk-0001", f"/admin/keys/{key}",
            "/admin/groups", "/admin/invites", "/admin/channels", "/admin/prices",
            f"/admin/prices/{model}", "/admin/codes", "/admin/plans", "/admin/announcements",
            "/admin/tickets", "/admin/logs", f"/admin/logs?user={uid}", f"/admin/logs?key={key}",
            "/admin/logs?model=gpt-4o-mini", f"/admin/logs?channel={channel}", "/admin/logs?errors=1",
            f"/admin/logs/{rid}", "/admin/audit", "/admin/settings"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def main(a: argparse.Namespace) -> int:
    dsn = a.dsn.rsplit("/", 1)[0] + "/" + a.db
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse({"server": {"host": "127.0.0.1", "port": 0},
                     "database": {"dsn": dsn, "data_dir": tmp}, "demo": {"create_demo_user": False},
                     "prices": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
                     "accounts": {"argon2_memory_kib": 1024, "argon2_time_cost": 1,
                                  "attempts_per_ip": 100_000, "attempts_per_account": 100_000}}, "")
        await prepare(cfg, dsn)
        email, password, secret = await _owner(dsn)
        pages = await _pages(dsn)
        worker = Worker(cfg, dsn, 0, with_limits=False, with_ledger=False)
        await worker.start(bind_socket("127.0.0.1", 0, reuse_port=False))
        url = f"http://127.0.0.1:{worker.port}"
        worst = 0.0
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
                await _sign_in(s, url, email, password, secret)
                print(f"{'page':44} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
                for path in pages:
                    times = []
                    for i in range(a.runs + 1):
                        t0 = time.perf_counter()
                        r = await s.get(url + path)
                        await r.read()
                        ms = (time.perf_counter() - t0) * 1000
                        assert r.status == 200, (path, r.status)
                        if i:
                            times.append(ms)
                    p95 = _pct(times, 0.95)
                    worst = max(worst, p95)
                    print(f"{path[:44]:44} {statistics.median(times):8.1f} {p95:8.1f} {max(times):8.1f}"
                          f"{'  <-- over' if p95 >= LIMIT_MS else ''}", flush=True)
        finally:
            await worker.stop()
        print(f"worst p95: {worst:.1f} ms (limit {LIMIT_MS:.0f} ms)")
        return 0 if worst < LIMIT_MS else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--db", default="tollway_scale")
    ap.add_argument("--runs", type=int, default=20)
    raise SystemExit(asyncio.run(main(ap.parse_args())))

"""Hostile key holders against a real `tollway serve`: does any account end below zero?

Many small-balance users, capped keys and plan keys fire randomized hostile bodies at
once, on both protocols and through translation: bounds in the other protocol's
fields, bounds as strings, `n`, no bound at all, duplicate keys, an upstream that
ignores its bound (the mock's `overrun`), streams and replies; midway one worker is
killed with SIGKILL and restarted by the supervisor. After a SIGTERM drain the books
are checked in Postgres:

- every balance >= 0, every capped key's spend <= its cap, every plan's use <= its
  credit (plans without balance fallback);
- every request answered 200 in full has exactly one usage row, and no row exists
  for a request the gateway refused.

Bounded and loopback only: a fresh database, the bundled mock and the gateway on
127.0.0.1, every process stopped by its PID. Exit status 0 when every check holds.

    .venv/bin/python -m bench.hostile [--duration 20] [--users 40] [--concurrency 48]
                                      [--no-kill] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("TOLLWAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TOLLWAY_BENCH_REDIS", "redis://127.0.0.1:6379/0")
GPT, CLAUDE = "gpt-4o-mini", "claude-sonnet-4-6"
MSG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- hostile bodies: (path, raw body, extra headers) ------------------------------------


def _mock(rng: random.Random) -> dict[str, str]:
    h = {"x-mock-chunks": str(rng.choice([5, 50, 400, 3000])),
         "x-mock-chunk-size": str(rng.choice([6, 24, 200]))}
    if rng.random() < 0.25:
        h["x-mock-overrun"] = "true"  # ignores the bound it was sent
    if rng.random() < 0.15:
        h["x-mock-no-usage"] = "true"
    return h


def hostile(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    model = rng.choice([GPT, CLAUDE])
    stream = rng.random() < 0.5
    kind = rng.randrange(9)
    path = rng.choice(["/v1/chat/completions", "/v1/responses", "/v1/messages"])
    body: dict[str, Any] = {"model": model, "stream": stream}
    if path == "/v1/responses":
        body["input"] = MSG[0]["content"]
    else:
        body["messages"] = MSG
    if kind == 0:  # the other protocol's bound beside a small one
        body.update({"max_completion_tokens": 1, "max_output_tokens": 64000, "max_tokens": 1})
        if path == "/v1/messages":
            body.update({"max_tokens": 16000})
    elif kind == 1:  # a bound as a string
        body["max_tokens"] = "64000"
    elif kind == 2:  # many choices
        body.update({"n": rng.choice([2, 5, 16, 128]), "max_tokens": rng.choice([50, 500, 4000])})
    elif kind == 3:  # no bound at all
        body.pop("max_tokens", None)
    elif kind == 4:  # reasoning with no bound, through translation
        body["reasoning_effort"] = "xhigh"
        body["reasoning"] = {"effort": "high"}
    elif kind == 5:  # thinking budget without max_tokens
        body["thinking"] = {"type": "enabled", "budget_tokens": 60000}
    elif kind == 6:  # a huge bound
        body["max_tokens" if path != "/v1/responses" else "max_output_tokens"] = 16_000_000
    elif kind == 7:  # polite
        body["max_tokens" if path != "/v1/responses" else "max_output_tokens"] = rng.choice([16, 256])
    raw = orjson.dumps(body)
    if kind == 8:  # duplicate keys: an upstream that takes the first would serve these
        raw = b'{"model": "gpt-5.5", "max_tokens": 100000, ' + raw[1:]
    return path, raw, _mock(rng)


# --- the run ----------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.db = f"tollway_hostile_{secrets.token_hex(4)}"
        self.dsn = PG.rsplit("/", 1)[0] + "/" + self.db
        self.tmp = Path(tempfile.mkdtemp(prefix="tollway-hostile-"))
        self.port = _port()
        self.mock_port = _port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.serve: subprocess.Popen[bytes] | None = None
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.completed: set[str] = set()
        self.refused: set[str] = set()
        self.killed = 0

    async def setup(self) -> list[tuple[str, str]]:
        from accounting import migrate, plans, store

        admin = await asyncpg.connect(PG)
        try:
            await admin.execute(f'CREATE DATABASE "{self.db}"')
        finally:
            await admin.close()
        await migrate.apply_dsn(self.dsn)
        rng = random.Random(self.args.seed)
        keys: list[tuple[str, str]] = []  # (kind, secret)
        conn = await asyncpg.connect(self.dsn)
        try:
            plan = await plans.create_plan(conn, "hostile", 500_000_000, "month")
            now = datetime.now(UTC)
            for i in range(self.args.users):
                balance = rng.choice([10_000_000, 50_000_000, 200_000_000, 2_000_000_000])
                uid = await store.create_user(conn, f"h{i}", balance)
                _, secret = await store.create_key(conn, uid, "plain")
                keys.append(("balance", secret))
                _, secret = await store.create_key(conn, uid, "capped",
                                                   cap_nano=rng.choice([20_000_000, 100_000_000]))
                keys.append(("cap", secret))
                if i % 3 == 0:
                    _, _, secret = await plans.subscribe(conn, uid, plan.id, now,
                                                         balance_fallback=False)
                    keys.append(("plan", secret))
        finally:
            await conn.close()
        return keys

    def start(self) -> None:
        env = {**os.environ, "HOSTILE_UPSTREAM_KEY": "hostile"}
        cfg = self.tmp / "config.toml"
        cfg.write_text(f"""
[server]
host = "127.0.0.1"
port = {self.port}
workers = 2
drain_grace_s = 10

[database]
dsn = "{self.dsn}"
data_dir = "{self.tmp / 'data'}"

[demo]
create_demo_user = false

[limits]
redis_url = "{self.args.redis_url}"

[[channels]]
name = "mock-openai"
protocol = "openai"
base_url = "http://127.0.0.1:{self.mock_port}/v1"
api_key_env = "HOSTILE_UPSTREAM_KEY"
models = ["gpt-*"]
forward_headers = ["x-mock-*"]

[[channels]]
name = "mock-anthropic"
protocol = "anthropic"
base_url = "http://127.0.0.1:{self.mock_port}"
api_key_env = "HOSTILE_UPSTREAM_KEY"
models = ["claude-*"]
forward_headers = ["x-mock-*"]

[prices."{GPT}"]
input = "0.15"
output = "0.60"

[prices."gpt-5.5"]
input = "1.25"
output = "10"

[prices."{CLAUDE}"]
input = "3"
output = "15"
cache_read = "0.30"
cache_write = "3.75"
max_output_tokens = 64000
""")
        log = (self.tmp / "serve.log").open("ab")
        mock = subprocess.Popen([sys.executable, "-m", "bench.mock_upstream", "--port",
                                 str(self.mock_port)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(mock)
        self.serve = subprocess.Popen([sys.executable, "-m", "relay", "--config", str(cfg), "serve"],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.procs.append(self.serve)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.serve is not None
            if self.serve.poll() is not None:
                raise RuntimeError("serve exited: " + (self.tmp / "serve.log").read_text()[-2000:])
            try:
                async with aiohttp.ClientSession() as s, s.get(
                        f"http://127.0.0.1:{self.port}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("serve did not become ready")

    def workers(self) -> list[int]:
        assert self.serve is not None
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.serve.pid:
                out.append(int(d))
        return out

    async def fire(self, keys: list[tuple[str, str]], until: float, seed: int) -> None:
        rng = random.Random(seed)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            while time.monotonic() < until:
                _, secret = rng.choice(keys)
                path, raw, headers = hostile(rng)
                headers = {**headers, "authorization": f"Bearer {secret}",
                           "content-type": "application/json"}
                self.sent += 1
                try:
                    async with s.post(f"http://127.0.0.1:{self.port}{path}", data=raw,
                                      headers=headers) as r:
                        await r.read()
                        rid = r.headers.get("x-request-id", "")
                        self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                        if r.status == 200:
                            self.completed.add(rid)
                        elif r.status in (400, 401, 402, 403, 404, 413, 429):
                            self.refused.add(rid)
                except (TimeoutError, aiohttp.ClientError):
                    self.statuses[0] = self.statuses.get(0, 0) + 1  # cut by the kill

    async def chaos(self, at: float) -> None:
        await asyncio.sleep(at)
        victims = self.workers()
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            self.killed += 1

    async def check(self) -> dict[str, Any]:
        conn = await asyncpg.connect(self.dsn)
        try:
            neg = await conn.fetchval("SELECT count(*) FROM users WHERE balance_nano < 0")
            min_balance = await conn.fetchval("SELECT min(balance_nano) FROM users")
            over_cap = await conn.fetchval(
                "SELECT count(*) FROM keys WHERE cap_nano > 0 AND spent_nano > cap_nano")
            over_plan = await conn.fetchval(
                "SELECT count(*) FROM subscriptions WHERE used_nano > credit_nano")
            rows = await conn.fetch("SELECT request_id, status FROM usage_log")
        finally:
            await conn.close()
        ids = [r["request_id"] for r in rows]
        billed = {r["request_id"] for r in rows if r["status"] == 200}
        missing = self.completed - billed
        refused_billed = self.refused & billed
        return {
            "requests": self.sent, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "workers_killed": self.killed, "rows": len(ids),
            "users_below_zero": neg, "min_balance_nano": min_balance,
            "keys_over_cap": over_cap, "plans_over_credit": over_plan,
            "duplicate_rows": len(ids) - len(set(ids)),
            "completed_without_row": len(missing), "refused_with_row": len(refused_billed),
        }

    async def stop(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            for _ in range(300):
                if self.serve.poll() is not None:
                    break
                await asyncio.sleep(0.1)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    async def drop(self) -> None:
        admin = await asyncpg.connect(PG)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        finally:
            await admin.close()


async def main_async(args: argparse.Namespace) -> int:
    run = Run(args)
    try:
        keys = await run.setup()
        run.start()
        await run.wait_ready()
        until = time.monotonic() + args.duration
        tasks = [run.fire(keys, until, args.seed * 1000 + i) for i in range(args.concurrency)]
        if not args.no_kill:
            tasks.append(run.chaos(args.duration / 2))
        await asyncio.gather(*tasks)
        await run.stop()
        report = await run.check()
    finally:
        run.cleanup()
        with contextlib.suppress(Exception):
            await run.drop()
    ok = (report["users_below_zero"] == 0 and report["keys_over_cap"] == 0
          and report["plans_over_credit"] == 0 and report["duplicate_rows"] == 0
          and report["completed_without_row"] == 0 and report["refused_with_row"] == 0)
    report["ok"] = ok
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        for k, v in report.items():
            print(f"{k:24} {v}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (bounded)")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis-url", default=REDIS)
    ap.add_argument("--no-kill", action="store_true", help="skip the SIGKILL of a worker")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.duration = min(args.duration, 900.0)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

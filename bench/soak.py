"""Soak: a gateway under steady mixed load and periodic faults for N minutes, then a reconciliation.

The problem: leaks (memory, file descriptors, leases, ledger rows) and rare money bugs show
only after many thousands of requests through restarts and failures, which no unit test
runs. The naive answer (a long wrk run) sends one request shape and never breaks
anything. The chosen one: one open-loop client sends a fixed-rate mix (chat, streams,
messages, translated, invalid requests, client aborts) at a real `python -m relay serve`
(two workers, Redis limits, its own database `tollway_soak`), and every few minutes
injects one fault in turn: an upstream 500 burst, upstream stalls, a client disconnect
burst, kill -9 of one worker (the supervisor restarts it), SIGTERM + restart, kill -9 +
restart. Beside the open loop, closed-loop clients (`--loop-clients`, 40) send one small
stream after another on a key of their own (`--loop-concurrency`, 100): fewer clients
than the key's limit, so no answer of theirs may be a 429, through every fault. Every 10 s it samples what was served,
errors by cause, RSS and open fds of the gateway's process tree and the ledger backlog.
At the end it stops the gateway (SIGTERM: the ledger drains) and reconciles Postgres
against what the client saw: every request the client saw complete has exactly one usage
row, no request id has two, and every balance equals its top-ups minus its usage cost.

    .venv/bin/python -m bench.soak                 # 30 minutes
    .venv/bin/python -m bench.soak --minutes 3     # short run

Not part of CI. Everything binds to 127.0.0.1; every process it starts is stopped by PID.
Output: bench/out/soak-<timestamp>/ (samples.jsonl, summary.json, summary.md, logs).
Exit status 0 when the reconciliation holds and no unexpected error was seen, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from accounting import migrate, store
from accounting.money import parse_usd
from bench import procstat
from bench.run import (
    MOCK_MODULE,
    PG_ADMIN_DSN,
    PY,
    ROOT,
    UPSTREAM_KEY,
    Procs,
    _pg_exec,
    _with_db,
    free_port,
    wait_ready,
)

DB = "tollway_soak"
REDIS_URL = "redis://127.0.0.1:6379/12"  # its own Redis database: key ids never meet a test's
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-6"
USERS = 4
CAP_USD = "0.02"  # the capped key: runs into 402 early and must never exceed its cap
CLIENT_TIMEOUT_S = 60.0  # a request unanswered this long counts as a hang


# --- what the client saw ----------------------------------------------------------------


@dataclass(slots=True)
class Seen:
    counts: Counter[str] = field(default_factory=Counter)
    completed: set[str] = field(default_factory=set)  # client request ids answered 200 in full
    aborted: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)  # first few examples
    seq: int = 0
    restarting_until: float = 0.0  # connection failures before this are expected
    upstream_fault_until: float = 0.0  # 5xx for untagged requests before this: breaker aftermath
    inject: str = ""  # current upstream fault: "500" | "stall" | ""

    def bad(self, cause: str, detail: str) -> None:
        self.counts[cause] += 1
        if len(self.unexpected) < 40:
            self.unexpected.append(f"{cause}: {detail}"[:300])


def _error_shape_ok(body: bytes, anthropic: bool) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if anthropic:
        return doc.get("type") == "error" and isinstance(doc.get("error"), dict) and "type" in doc["error"]
    return isinstance(doc.get("error"), dict) and "code" in doc["error"]


class Load:
    """Open-loop mixed traffic against one gateway port."""

    def __init__(self, port: int, keys: list[str], capped_key: str, seen: Seen) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.keys = keys
        self.capped = capped_key
        self.seen = seen
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S),
        )

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    def spawn(self, kind: str) -> None:
        t = asyncio.create_task(self.bad_key() if kind == "bad_key" else self.one(kind))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def pick(self) -> str:
        r = random.random()
        for kind, w in (("chat", 0.22), ("chat_stream", 0.22), ("messages_stream", 0.14), ("messages", 0.06),
                        ("translated", 0.10), ("invalid", 0.08), ("abort", 0.08), ("capped", 0.05),
                        ("responses", 0.05)):
            if r < w:
                return kind
            r -= w
        return "chat"

    async def one(self, kind: str) -> None:
        s = self.seen
        s.seq += 1
        rid = f"soak-{s.seq}"
        key = self.capped if kind == "capped" else random.choice(self.keys)
        mock: dict[str, Any] = {"chunks": 20, "delay_ms": 2}
        injected = ""
        if s.inject and kind not in ("invalid",) and random.random() < 0.5:
            injected = s.inject
            if injected == "500":
                mock["status"] = 500
            else:
                mock.update(fail="stall", fail_after=2)
        anthropic = kind in ("messages", "messages_stream", "translated")
        stream = kind in ("chat_stream", "messages_stream", "translated", "abort", "responses")
        path, body_obj = "/v1/chat/completions", {}
        msgs = [{"role": "user", "content": f"soak request {s.seq}"}]
        if kind in ("chat", "chat_stream", "abort", "capped"):
            body_obj = {"model": OPENAI_MODEL, "messages": msgs, "stream": stream, "max_tokens": 64}
            if kind == "abort":
                mock.update(chunks=200, delay_ms=10)
        elif kind == "responses":
            path = "/v1/responses"
            body_obj = {"model": OPENAI_MODEL, "input": f"soak {s.seq}", "stream": True, "max_output_tokens": 64}
        elif anthropic:
            path = "/v1/messages"
            model = OPENAI_MODEL if kind == "translated" else ANTHROPIC_MODEL
            body_obj = {"model": model, "messages": msgs, "stream": stream, "max_tokens": 64}
        body_obj["mock"] = mock
        body = json.dumps(body_obj).encode()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json", "x-request-id": rid}
        expect_status = 200
        if kind == "invalid":
            variant = random.randrange(4)
            if variant == 0:
                body = b'{"model": "gpt-4o-mini", "messages": ['  # malformed JSON
                expect_status = 400
            elif variant == 1:
                body = json.dumps({"model": "no-such-model-x", "messages": msgs}).encode()
                expect_status = 404
            elif variant == 2:
                # A bound as a string: refused, never read as a default (a body that
                # names no bound at all is sent with the model's, so it answers 200).
                path, anthropic = "/v1/messages", True
                body = json.dumps({"model": ANTHROPIC_MODEL, "messages": msgs,
                                   "max_tokens": "64"}).encode()
                expect_status = 400
            else:
                body = b'["not", "an", "object"]'
                expect_status = 400
        t0 = time.monotonic()
        assert self.session is not None
        try:
            async with self.session.post(self.base + path, data=body, headers=headers) as resp:
                if resp.status != 200:
                    data = await resp.read()
                    self._classify_status(kind, resp.status, data, anthropic, expect_status, injected, t0)
                    return
                if expect_status != 200:
                    s.bad("unexpected_200", f"{kind} {rid}")
                    return
                if kind == "abort":
                    await resp.content.readany()
                    s.aborted.add(rid)
                    s.counts["aborted"] += 1
                    resp.close()  # the client goes away mid-stream
                    return
                data = await resp.read()
                self._classify_body(kind, rid, data, stream, injected, t0)
        except TimeoutError:
            s.bad("hang", f"{kind} {rid} no answer in {CLIENT_TIMEOUT_S:.0f} s")
        except (aiohttp.ClientError, OSError) as exc:
            if injected:  # a stalled non-stream body is cut by the gateway's idle timeout
                s.counts[f"injected_{injected}_cut"] += 1
            elif t0 < s.restarting_until or time.monotonic() < s.restarting_until:
                s.counts["conn_during_restart"] += 1
            else:
                s.bad("conn_error", f"{kind} {rid} {type(exc).__name__}: {exc}")

    def _classify_status(self, kind: str, status: int, data: bytes, anthropic: bool, expect: int,
                         injected: str, t0: float) -> None:
        s = self.seen
        if not _error_shape_ok(data, anthropic):
            s.bad("bad_error_shape", f"{kind} {status} {data[:120]!r}")
            return
        if status == expect:
            s.counts[f"expected_{status}"] += 1
        elif kind == "capped" and status == 402:
            s.counts["capped_402"] += 1
        elif status == 429 and b"Rate limit state unavailable" in data:
            s.bad("status_429_state_unavailable", f"{kind} {data[:160]!r}")
        elif status >= 500 and injected:
            s.counts[f"injected_{injected}_{status}"] += 1
        elif status >= 500 and max(t0, time.monotonic()) < s.upstream_fault_until:
            s.counts[f"breaker_{status}"] += 1
        elif status in (429, 502, 503) and t0 < s.restarting_until:
            # A fresh worker has no leased budget yet: "retry shortly" (limits/shared.py).
            s.counts[f"restart_{status}"] += 1
        else:
            s.bad(f"status_{status}", f"{kind} {data[:160]!r}")

    def _classify_body(self, kind: str, rid: str, data: bytes, stream: bool, injected: str, t0: float) -> None:
        s = self.seen
        if not stream:
            try:
                json.loads(data)
            except ValueError:
                s.bad("bad_body", f"{kind} {rid} {data[:120]!r}")
                return
            s.completed.add(rid)
            s.counts["ok"] += 1
            return
        tail = data[-4096:]  # a Responses API completion event carries the whole response
        done = (b"data: [DONE]" in tail or b"event: message_stop" in tail or b"response.completed" in tail)
        failed = b"event: error" in tail or b'data: {"error"' in tail or b"response.failed" in tail
        if done and not failed:
            s.completed.add(rid)
            s.counts["ok"] += 1
        elif injected:
            s.counts[f"injected_{injected}_stream_error"] += 1
        elif t0 < s.restarting_until:
            s.counts["stream_cut_restart"] += 1
        elif max(t0, time.monotonic()) < s.upstream_fault_until:
            s.counts["breaker_stream_error"] += 1
        else:
            s.bad("stream_incomplete", f"{kind} {rid} ...{tail[-160:]!r}")

    async def bad_key(self) -> None:
        """One bad-key request (kept rare: failed auth is limited per client IP)."""
        assert self.session is not None
        try:
            async with self.session.post(self.base + "/v1/chat/completions", data=b"{}", headers={
                    "authorization": "Bearer sk-not-a-real-key"}) as resp:
                data = await resp.read()
                if resp.status == 401 and _error_shape_ok(data, False):
                    self.seen.counts["expected_401"] += 1
                elif resp.status == 429 or (resp.status in (502, 503) and time.monotonic() < self.seen.restarting_until):
                    self.seen.counts[f"bad_key_{resp.status}"] += 1
                else:
                    self.seen.bad(f"bad_key_{resp.status}", repr(data[:120]))
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.seen.counts["conn_during_restart" if time.monotonic() < self.seen.restarting_until
                             else "bad_key_conn_error"] += 1


class Loopers:
    """Closed-loop clients on one key: each sends, reads the whole answer, sends again.

    The key's concurrency is above the number of clients, so a 429 is a limiter bug
    (issue 20: 63,503 x 429 "concurrency limit reached" against 5,415 x 200 with two
    workers, around a worker's kill -9). After a non-200 a client pauses 10 ms, which
    keeps a refused client from spinning the shared host.
    """

    BODY = json.dumps({"model": OPENAI_MODEL, "max_tokens": 16, "stream": True,
                       "messages": [{"role": "user", "content": "loop"}],
                       "mock": {"chunks": 5, "delay_ms": 20}}).encode()

    def __init__(self, port: int, key: str, seen: Seen) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self.seen = seen
        self.counts: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, session: aiohttp.ClientSession, n: int) -> None:
        self.tasks = [asyncio.create_task(self.client(session)) for _ in range(n)]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def client(self, session: aiohttp.ClientSession) -> None:
        c = self.counts
        while True:
            t0 = time.monotonic()
            try:
                async with session.post(self.url, data=self.BODY, headers=self.headers) as r:
                    data = await r.read()
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError):
                restart = t0 < self.seen.restarting_until or time.monotonic() < self.seen.restarting_until
                c["conn_error_restart" if restart else "conn_error"] += 1
                await asyncio.sleep(0.01)
                continue
            if status == 200 and b"data: [DONE]" in data[-256:]:
                c["ok"] += 1
                continue
            if status == 200:
                c["stream_incomplete"] += 1
            else:
                try:
                    message = json.loads(data)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = data[:60].decode(errors="replace")
                c[f"{status} {message}"] += 1
            await asyncio.sleep(0.01)


# --- the gateway process ------------------------------------------------------------------


class Gateway:
    def __init__(self, procs: Procs, work: Path, port: int, mock_port: int, workers: int) -> None:
        self.procs = procs
        self.work = work
        self.port = port
        self.mock_port = mock_port
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = work / "tollway-soak.toml"
        self.log = work / "gateway.log"
        self.starts = 0

    def write_config(self) -> None:
        mock = f"http://127.0.0.1:{self.mock_port}"
        self.config.write_text(f"""# written by bench/soak.py for one run
[server]
host = "127.0.0.1"
port = {self.port}
workers = {self.workers}
drain_grace_s = 10

[database]
dsn = "{_with_db(PG_ADMIN_DSN, DB)}"
data_dir = "{self.work / 'data'}"

[demo]
create_demo_user = false

[upstream]
first_byte_timeout_s = 5
idle_timeout_s = 5

[limits]
redis_url = "{REDIS_URL}"
key_concurrency = 2000

[[channels]]
name = "mock-openai"
protocol = "openai"
base_url = "{mock}/v1"
api_key_env = "BENCH_UPSTREAM_KEY"
forward_headers = ["x-mock-*"]
models = ["gpt-*"]

[[channels]]
name = "mock-anthropic"
protocol = "anthropic"
base_url = "{mock}"
api_key_env = "BENCH_UPSTREAM_KEY"
forward_headers = ["x-mock-*"]
models = ["claude-*"]

[prices."gpt-4o-mini"]
input = "0.15"
output = "0.60"

[prices."claude-sonnet-4-6"]
input = "3"
output = "15"
""")

    def start(self, key: str) -> None:
        env = dict(os.environ, BENCH_UPSTREAM_KEY=UPSTREAM_KEY)
        self.proc = self.procs.spawn([PY, "-m", "relay", "--config", str(self.config), "serve"], self.log, env=env)
        self.starts += 1
        err = wait_ready(self.proc, self.port, {"authorization": f"Bearer {key}"}, self.log, timeout=60)
        if err:
            raise RuntimeError(f"gateway did not start: {err}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # supervisor and workers: the group we created

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        # kill -9 of the group took the workers too; SIGTERM let them drain. Either way
        # nothing of that group may linger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 0)
            time.sleep(0.5)
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc in self.procs.live:
            self.procs.live.remove(self.proc)
        return rc

    def tree(self) -> list[int]:
        return procstat.tree(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []


def _fds(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{pid}/fd"))
    return n


async def _scrape(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            text = await r.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return out
    for line in text.splitlines():
        if line.startswith(("tollway_ledger_pending_rows", "tollway_ledger_spilled_rows",
                            "tollway_in_flight_requests", "tollway_ledger_flush_failures_total")):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


# --- the run --------------------------------------------------------------------------------


async def setup_db(dsn: str, loop_concurrency: int, cap_usd: str = CAP_USD,
                   loop_cap_usd: str = "0") -> tuple[list[int], list[str], str, str]:
    await _pg_exec(PG_ADMIN_DSN, f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    await _pg_exec(PG_ADMIN_DSN, f'CREATE DATABASE "{DB}"')
    await migrate.apply_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        users, keys = [], []
        for i in range(USERS):
            uid = await store.create_user(conn, f"soak{i}", parse_usd("1000"))
            _, secret = await store.create_key(conn, uid, name="soak")
            users.append(uid)
            keys.append(secret)
        cuid = await store.create_user(conn, "soak-capped", parse_usd("1000"))
        _, capped = await store.create_key(conn, cuid, name="capped", cap_nano=parse_usd(cap_usd))
        users.append(cuid)
        luid = await store.create_user(conn, "soak-loop", parse_usd("1000"))
        _, looped = await store.create_key(conn, luid, name="loop", concurrency=loop_concurrency,
                                           cap_nano=parse_usd(loop_cap_usd))
        users.append(luid)
    finally:
        await conn.close()
    import redis.asyncio as aioredis

    r = aioredis.from_url(REDIS_URL)
    try:
        await r.flushdb()  # database 12 is the soak's own: stale leases from a previous run go
    finally:
        await r.aclose()
    return users, keys, capped, looped


async def reconcile(dsn: str, seen: Seen) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT client_request_id AS rid, count(*) AS n, min(status) AS status, sum(cost_nano) AS cost"
            " FROM usage_log WHERE client_request_id LIKE 'soak-%' GROUP BY 1")
        by_rid = {r["rid"]: r for r in rows}
        dup_rids = await conn.fetchval(
            "SELECT count(*) FROM (SELECT request_id FROM usage_log GROUP BY 1 HAVING count(*) > 1) d")
        missing = sorted(seen.completed - by_rid.keys())
        doubled = sorted(r for r, row in by_rid.items() if row["n"] > 1)
        non200 = sorted(r for r in seen.completed if r in by_rid and by_rid[r]["status"] != 200)
        balances = await conn.fetch(
            "SELECT u.id, u.name, u.balance_nano,"
            " (SELECT coalesce(sum(amount_nano), 0) FROM topups t WHERE t.user_id = u.id) AS topups,"
            " (SELECT coalesce(sum(cost_nano), 0) FROM usage_log l WHERE l.user_id = u.id AND l.plan_id = 0) AS cost"
            " FROM users u ORDER BY u.id")
        spent = await conn.fetch(
            "SELECT k.id, k.cap_nano, k.spent_nano,"
            " (SELECT coalesce(sum(cost_nano), 0) FROM usage_log l WHERE l.key_id = k.id) AS cost"
            " FROM keys k ORDER BY k.id")
        total_rows = await conn.fetchval("SELECT count(*) FROM usage_log")
        total_cost = await conn.fetchval("SELECT coalesce(sum(cost_nano), 0) FROM usage_log")
        aborted_rows = sum(1 for r in seen.aborted if r in by_rid)
        aborted_charged = sum(1 for r in seen.aborted if r in by_rid and by_rid[r]["cost"] > 0)
    finally:
        await conn.close()
    bal_bad = [dict(b) for b in balances if b["balance_nano"] != b["topups"] - b["cost"]]
    key_bad = [dict(k) for k in spent if k["spent_nano"] != k["cost"]]
    cap_over = [dict(k) for k in spent if k["cap_nano"] and k["spent_nano"] > k["cap_nano"]]
    return {
        "completed": len(seen.completed), "usage_rows": total_rows, "total_cost_nano": total_cost,
        "missing_rows": len(missing), "missing_examples": missing[:10],
        "doubled_rows": len(doubled), "doubled_examples": doubled[:10], "duplicate_request_ids": dup_rids,
        "completed_with_non200_row": len(non200),
        "aborted": len(seen.aborted), "aborted_with_row": aborted_rows, "aborted_charged": aborted_charged,
        "balance_mismatches": bal_bad, "key_spend_mismatches": key_bad, "cap_exceeded": cap_over,
        "capped_key": [dict(k) for k in spent if k["cap_nano"]],
    }


async def run(args: argparse.Namespace, work: Path) -> int:
    procs = Procs()
    dsn = _with_db(PG_ADMIN_DSN, DB)
    seen = Seen()
    samples = (work / "samples.jsonl").open("a")
    gw: Gateway | None = None
    load: Load | None = None
    try:
        users, keys, capped, looped = await setup_db(dsn, args.loop_concurrency, args.cap_usd,
                                                     args.loop_cap_usd)
        mock_port = free_port()
        mock = procs.spawn([PY, "-m", MOCK_MODULE, "--host", "127.0.0.1", "--port", str(mock_port)], work / "mock.log")
        err = wait_ready(mock, mock_port, {"authorization": f"Bearer {UPSTREAM_KEY}"}, work / "mock.log")
        if err:
            raise RuntimeError(f"mock did not start: {err}")
        gw = Gateway(procs, work, free_port(), mock_port, args.workers)
        gw.write_config()
        await asyncio.to_thread(gw.start, keys[0])
        seen.restarting_until = time.monotonic() + 5
        load = Load(gw.port, keys, capped, seen)
        await load.open()
        assert load.session is not None
        loopers = Loopers(gw.port, looped, seen)
        loopers.start(load.session, args.loop_clients)
        last_loop: Counter[str] = Counter()

        total = args.minutes * 60.0
        faults = ["upstream_500", "stall", "disconnect_burst", "kill9_worker", "sigterm", "kill9"]
        every = min(180.0, total / (len(faults) + 1))
        t_start = time.monotonic()
        next_fault = t_start + every
        next_sample = t_start + 10
        next_topup = t_start + 60
        next_bad_key = t_start
        fault_i = 0
        events: list[dict[str, Any]] = []
        last_counts: Counter[str] = Counter()
        interval = 1.0 / args.rate
        tick = t_start
        fault_task: asyncio.Task[None] | None = None
        peak = {"rss_mib": 0.0, "fds": 0, "tasks": 0}

        async def fault(name: str) -> None:
            assert gw is not None and load is not None
            t = time.monotonic()
            ev: dict[str, Any] = {"t": round(t - t_start, 1), "fault": name}
            if name in ("upstream_500", "stall"):
                seen.inject = "500" if name == "upstream_500" else "stall"
                seen.upstream_fault_until = t + 20 + 30
                await asyncio.sleep(20)
                seen.inject = ""
            elif name == "disconnect_burst":
                for _ in range(200):
                    load.spawn("abort")
            elif name == "kill9_worker":
                # One worker dies; the supervisor starts another. Connections to the dead
                # one fail; its leases must come back to the live workers within a second.
                assert gw.proc is not None
                workers = procstat.children_map().get(gw.proc.pid, [])
                ev["workers"] = len(workers)
                if workers:
                    seen.restarting_until = t + 5
                    os.kill(workers[0], signal.SIGKILL)
                    ev["killed_pid"] = workers[0]
            else:
                seen.restarting_until = t + 3600  # until it answers again
                gw.signal(signal.SIGTERM if name == "sigterm" else signal.SIGKILL)
                rc = await asyncio.to_thread(gw.wait_exit, 30.0)
                ev["exit_s"] = round(time.monotonic() - t, 2)
                ev["rc"] = rc
                if rc is None:
                    ev["note"] = "did not exit within 30 s of SIGTERM; killed"
                    gw.signal(signal.SIGKILL)
                    await asyncio.to_thread(gw.wait_exit, 10.0)
                await asyncio.to_thread(gw.start, keys[0])
                ev["down_s"] = round(time.monotonic() - t, 2)
                seen.restarting_until = time.monotonic() + 5  # stale pooled connections surface
            events.append(ev)

        while (now := time.monotonic()) < t_start + total:
            if now >= tick:
                # Open loop: catch up on missed ticks, but never burst more than a second's worth.
                n = min(int((now - tick) / interval) + 1, args.rate)
                for _ in range(n):
                    load.spawn(load.pick())
                tick += n * interval
                if tick < now - 1:
                    tick = now
            if now >= next_bad_key:
                load.spawn("bad_key")
                next_bad_key = now + 4
            if now >= next_topup:
                conn = await asyncpg.connect(dsn)
                try:
                    await store.topup(conn, users[int(now) % len(users)], parse_usd("1"),
                                      external_id=f"soak-topup-{int(now)}", note="soak")
                finally:
                    await conn.close()
                next_topup = now + 60
            if now >= next_fault and (fault_task is None or fault_task.done()):
                fault_task = asyncio.create_task(fault(faults[fault_i % len(faults)]))
                fault_i += 1
                next_fault = now + every
            if now >= next_sample:
                pids = gw.tree()
                rss = procstat.tree_rss_bytes(pids[:1]) / 2**20 if pids else 0.0  # the root's tree
                fds = _fds(pids)
                m = await _scrape(load.session, gw.port)
                delta = seen.counts - last_counts
                last_counts = Counter(seen.counts)
                loop_delta = loopers.counts - last_loop
                last_loop = Counter(loopers.counts)
                sample = {"t": round(now - t_start), "served": delta.get("ok", 0), "by_cause": dict(delta),
                          "loop": dict(loop_delta),
                          "rss_mib": round(rss, 1), "fds": fds, "procs": len(pids),
                          "in_flight_client": len(load.tasks),
                          "ledger_pending": m.get("tollway_ledger_pending_rows"),
                          "ledger_spilled": m.get("tollway_ledger_spilled_rows"),
                          "flush_failures": m.get("tollway_ledger_flush_failures_total")}
                samples.write(json.dumps(sample) + "\n")
                samples.flush()
                peak["rss_mib"] = max(peak["rss_mib"], rss)
                peak["fds"] = max(peak["fds"], fds)
                peak["tasks"] = max(peak["tasks"], len(load.tasks))
                if args.verbose:
                    print(json.dumps(sample), flush=True)
                next_sample = now + 10
            await asyncio.sleep(min(interval, 0.01))
        if fault_task is not None:
            await fault_task
        # Let the last requests finish (stalls end within the gateway's 5 s timeouts).
        await loopers.stop()
        if load.tasks:
            await asyncio.wait(set(load.tasks), timeout=30)
        end_sample = {"rss_mib": procstat.tree_rss_bytes(gw.tree()[:1]) / 2**20, "fds": _fds(gw.tree())}
        gw.signal(signal.SIGTERM)
        rc = await asyncio.to_thread(gw.wait_exit, 60.0)
        await load.close()
        load = None
        result = await reconcile(dsn, seen)
        unexpected = {k: v for k, v in seen.counts.items()
                      if k.startswith(("hang", "conn_error", "status_", "bad_", "unexpected", "stream_incomplete"))
                      and not k.startswith("bad_key_4")}
        loop_bad = {k: v for k, v in loopers.counts.items()
                    if k not in ("ok", "conn_error_restart")
                    and not (args.loop_cap_usd != "0" and k.startswith("402 "))}
        ok = (not unexpected and not loop_bad and result["missing_rows"] == 0 and result["doubled_rows"] == 0
              and result["duplicate_request_ids"] == 0 and not result["balance_mismatches"]
              and not result["key_spend_mismatches"] and not result["cap_exceeded"])
        summary = {
            "command": " ".join(shlex.quote(a) for a in sys.argv), "minutes": args.minutes, "rate": args.rate,
            "workers": args.workers, "started": args.started, "events": events, "counts": dict(seen.counts),
            "unexpected": unexpected, "unexpected_examples": seen.unexpected, "final_exit_rc": rc,
            "loop_clients": args.loop_clients, "loop_concurrency": args.loop_concurrency,
            "loop": dict(loopers.counts), "loop_unexpected": loop_bad,
            "gateway_starts": gw.starts, "peak": peak, "end": end_sample, "reconcile": result, "pass": ok,
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps(summary, indent=2, default=str), flush=True)
        return 0 if ok else 1
    finally:
        samples.close()
        if load is not None:
            await load.close()
        procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=150, help="requests per second (open loop)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loop-clients", type=int, default=40, help="closed-loop clients on their own key")
    ap.add_argument("--loop-concurrency", type=int, default=100, help="that key's concurrency limit")
    ap.add_argument("--cap-usd", default=CAP_USD, help="the capped key's cap (smaller: it runs near its cap sooner)")
    ap.add_argument("--loop-cap-usd", default="0",
                    help="a spending cap on the loop clients' key (0: none); its 402s are expected")
    ap.add_argument("--out", default="", help="output directory (default bench/out/soak-<timestamp>)")
    ap.add_argument("--verbose", action="store_true", help="print every 10 s sample")
    args = ap.parse_args(argv)
    args.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    work = Path(args.out) if args.out else ROOT / "bench" / "out" / f"soak-{dt.datetime.now():%Y%m%d-%H%M%S}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run(args, work))


if __name__ == "__main__":
    sys.exit(main())

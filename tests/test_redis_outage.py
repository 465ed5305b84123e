"""Redis outage under load: the gateway's limiter falls back to safe mode and back.

A real worker (tests/gateway.py) reaches the real Redis through a FaultProxy. While a
steady load runs, the link is cut (FIN) or blackholed for several seconds. The
documented safe mode (limits/shared.py) must hold: every request is either served or
denied with 429/402 in its protocol's shape (never a 5xx, never a hang), a capped key
never spends past its cap, and after the link is restored the shared state rebuilds,
traffic flows again and no concurrency slot or in-flight count is left behind.

Redis database 14 keeps these scopes apart from other suites that use database 0 with
the same key ids (each test session has its own Postgres, so ids repeat).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from accounting.money import parse_usd
from tests.faultproxy import FaultProxy
from tests.gateway import Harness

REDIS_DB = 14
OUTAGE_S = 6.0
CLIENT_TIMEOUT_S = 8.0  # an admission that waits on a dead Redis past this is a hang
CAP = parse_usd("0.30")
# claude-sonnet-4-6 at 15 USD per 1M output tokens: max_tokens 1000 reserves 0.015 USD,
# the mock answers 5 chunks x 100 tokens (0.0075 USD), so the cap admits about 40.
MSG = {"model": "claude-sonnet-4-6", "max_tokens": 1000,
       "messages": [{"role": "user", "content": "outage"}],
       "mock": {"chunks": 5, "tokens_per_chunk": 100, "delay_ms": 5}}
CHAT = {"model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": "outage"}], "mock": {"chunks": 5, "delay_ms": 5}}


def _shape_ok(status: int, body: bytes, anthropic: bool) -> bool:
    doc = orjson.loads(body)
    if anthropic:
        want = {402: "billing_error", 429: "rate_limit_error"}[status]
        return bool(doc.get("type") == "error" and doc["error"]["type"] == want)
    want = {402: "insufficient_quota", 429: "rate_limit_exceeded"}[status]
    return bool(doc["error"]["code"] == want)


class Load:
    """A few clients in closed loops, recording what each request got."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[dict[str, Any]] = []
        self.stop = asyncio.Event()

    async def client(self, session: aiohttp.ClientSession, path: str, body: dict[str, Any],
                     secret: str, anthropic: bool) -> None:
        headers = {"x-api-key": secret} if anthropic else {"authorization": f"Bearer {secret}"}
        data = orjson.dumps(body)
        while not self.stop.is_set():
            t0 = time.monotonic()
            rec: dict[str, Any] = {"t": t0, "path": path, "anthropic": anthropic, "secret": secret}
            try:
                async with session.post(self.url + path, data=data, headers=headers) as r:
                    rec["status"] = r.status
                    rec["retry_after"] = r.headers.get("retry-after")
                    rec["body"] = await r.read()
            except TimeoutError:
                rec["status"] = "hang"
            except aiohttp.ClientError as exc:
                rec["status"] = f"conn:{type(exc).__name__}"
            rec["s"] = time.monotonic() - t0
            self.results.append(rec)
            if rec["status"] != 200:
                await asyncio.sleep(0.05)  # a denied client backs off briefly, as SDKs do


async def _scope_fields(r: aioredis.Redis, names: list[str]) -> dict[str, dict[Any, Any]]:
    return {n: await r.hgetall(n) for n in names}


@pytest.mark.timeout(50)
@pytest.mark.parametrize("fault", ["blackhole", "cut"])
async def test_redis_outage_under_load_is_safe_and_recovers(pg_dsn: str, fault: str) -> None:
    proxy = await FaultProxy(6379).start()
    real = aioredis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
    h = await Harness().start(pg_dsn, limits={"redis_url": f"redis://127.0.0.1:{proxy.port}/{REDIS_DB}",
                                              "lease_block": 4})
    load: Load | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        cap_uid, cap_kid, capped = await h.user_and_key(balance="100", cap_nano=CAP)
        free_uid, free_kid, free = await h.user_and_key(balance="100")
        lim = h.worker.gw.limiter  # type: ignore[union-attr]
        assert lim is not None and lim.shared is not None
        pre = lim.shared.prefix  # this deployment's: another session's scopes are not ours
        names = [f"{pre}s:k{cap_kid}", f"{pre}s:u{cap_uid}", f"{pre}s:k{free_kid}", f"{pre}s:u{free_uid}"]

        load = Load(h.url)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S))
        tasks = [asyncio.create_task(load.client(session, "/v1/messages", MSG, capped, True)) for _ in range(3)]
        tasks += [asyncio.create_task(load.client(session, "/v1/chat/completions", CHAT, free, False))
                  for _ in range(3)]

        await asyncio.sleep(1.5)
        assert not lim.degraded
        assert any(r["status"] == 200 for r in load.results), "no traffic before the outage"
        t_down = time.monotonic()
        getattr(proxy, fault)()
        saw_degraded = False
        while time.monotonic() - t_down < OUTAGE_S:
            saw_degraded = saw_degraded or lim.degraded
            await asyncio.sleep(0.05)
        t_up = time.monotonic()
        proxy.restore()
        recovered_at = None
        while time.monotonic() - t_up < 8.0:
            if not lim.degraded and recovered_at is None:
                recovered_at = time.monotonic()
            if recovered_at is not None and time.monotonic() - recovered_at > 2.0:
                break
            await asyncio.sleep(0.05)
        load.stop.set()
        await asyncio.gather(*tasks)
        await session.close()

        # The fault took effect, and the limiter came back from it.
        assert saw_degraded, "the limiter never noticed the outage"
        assert recovered_at is not None, "safe mode did not end within 8 s of restoring Redis"

        # Served within limits or denied in protocol shape; never a 5xx, never a hang.
        statuses = Counter(r["status"] for r in load.results)
        assert set(statuses) <= {200, 402, 429}, statuses
        assert statuses[402] > 0, "the capped key never reached its cap: the test proves nothing about it"
        for r in load.results:
            assert r["s"] < CLIENT_TIMEOUT_S
            if r["status"] != 200:
                assert _shape_ok(r["status"], r["body"], r["anthropic"]), r["body"]
            if r["status"] == 429:
                assert r["retry_after"] is not None and int(r["retry_after"]) >= 1
        during = [r for r in load.results if t_down + 1.0 < r["t"] < t_up]
        assert during, "no request was made during the outage"
        # Traffic flows again once shared mode is back: the uncapped key is served.
        after = [r for r in load.results if recovered_at is not None and r["t"] > recovered_at + 0.5
                 and r["secret"] == free]
        assert after and all(r["status"] == 200 for r in after), Counter(r["status"] for r in after)

        # No unlimited spending: the capped key is within its cap, in Postgres.
        await h.flush()
        conn = await asyncpg.connect(pg_dsn)
        try:
            spent = await conn.fetchval("SELECT spent_nano FROM keys WHERE id = $1", cap_kid)
            rows = await conn.fetchval("SELECT count(*) FROM usage_log WHERE key_id = $1 AND status = 200",
                                       cap_kid)
            bal = await conn.fetch(
                "SELECT u.balance_nano, (SELECT sum(amount_nano) FROM topups t WHERE t.user_id = u.id) AS topups,"
                " (SELECT coalesce(sum(cost_nano), 0) FROM usage_log l WHERE l.user_id = u.id) AS cost"
                " FROM users u WHERE u.id = ANY($1::bigint[])", [cap_uid, free_uid])
        finally:
            await conn.close()
        served_capped = sum(1 for r in load.results if r["secret"] == capped and r["status"] == 200)
        assert 0 < spent <= CAP, (spent, CAP)
        assert rows == served_capped
        for b in bal:
            assert b["balance_nano"] == b["topups"] - b["cost"]

        # No leaked leases: nothing in flight, and slots held locally are what Redis records.
        assert lim.inflight == 0
        for s in (*lim.keys.values(), *lim.users.values()):
            assert s.inflight == 0
            assert s.reserved == 0
        fields = await _scope_fields(real, names)
        me = lim.shared.worker.encode()
        for name, scope in ((names[0], lim.keys[cap_kid]), (names[2], lim.keys[free_kid])):
            held = int(fields[name].get(b"c:" + me, b"0"))
            assert held == scope.conc_held, (name, fields[name], scope.conc_held)
            others = [k for k in fields[name] if k.startswith(b"c:") and k != b"c:" + me]
            assert not others, fields[name]
    finally:
        load_stop = load.stop if load is not None else None
        if load_stop is not None:
            load_stop.set()
        for t in tasks:
            t.cancel()
        await h.stop()
        # The stopping worker hands its slots back: Redis holds no concurrency for it.
        try:
            left = await _scope_fields(real, names) if "names" in locals() else {}
            for name, f in left.items():
                assert sum(int(v) for k, v in f.items() if k.startswith(b"c:")) == 0, (name, f)
            if left:
                await real.delete(*left)
        finally:
            await real.aclose()
            await proxy.close()


async def test_first_request_of_a_new_capped_key_is_served(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, limits={"redis_url": f"redis://127.0.0.1:6379/{REDIS_DB}"})
    try:
        _, _, secret = await h.user_and_key(balance="100", cap_nano=parse_usd("0.003"))
        body = orjson.dumps({"model": "claude-sonnet-4-6", "max_tokens": 64,
                             "messages": [{"role": "user", "content": "first"}]})
        async with aiohttp.ClientSession() as s, s.post(
                h.url + "/v1/chat/completions", data=body, headers={"authorization": f"Bearer {secret}"}) as r:
            status, text = r.status, await r.read()
        assert status == 200, text
    finally:
        await h.stop()

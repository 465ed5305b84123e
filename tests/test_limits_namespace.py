"""Two deployments on one Redis never share limit state (issue 20, item 7).

Each deployment's Redis keys carry an id made once, when its database is first migrated,
so key 1 of one deployment is not key 1 of another, and a database re-created under the
same Redis starts with clean limit state. Real Postgres databases, the real Redis, real
workers (tests/gateway.py).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting import migrate
from limits.namespace import redis_prefix
from tests.gateway import Harness

URL = "redis://127.0.0.1:6379/0"
MakeDb = Callable[[], Awaitable[str]]


def _with_db(dsn: str, db: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + db


@pytest.fixture
async def fresh_db(pg_server_dsn: str) -> AsyncIterator[MakeDb]:
    made: list[str] = []

    async def make() -> str:
        name = f"tollway_ns_{secrets.token_hex(4)}"
        conn = await asyncpg.connect(pg_server_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        made.append(name)
        dsn = _with_db(pg_server_dsn, name)
        await migrate.apply_dsn(dsn)
        return dsn

    yield make
    conn = await asyncpg.connect(pg_server_dsn)
    try:
        for name in made:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _prefix(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await redis_prefix(conn)
    finally:
        await conn.close()


async def test_each_database_has_its_own_stable_prefix(fresh_db: MakeDb, pg_dsn: str) -> None:
    one = await fresh_db()
    p1, p2 = await _prefix(one), await _prefix(pg_dsn)
    assert re.fullmatch(r"tollway:[0-9a-f]{32}:", p1), p1
    assert p1 != p2
    assert await _prefix(one) == p1  # read again (another worker, a restart): the same
    await migrate.apply_dsn(one)  # migrating again changes nothing
    assert await _prefix(one) == p1


@pytest.mark.timeout(60)
async def test_key_1_of_one_deployment_is_not_key_1_of_another(fresh_db: MakeDb) -> None:
    dsns = [await fresh_db(), await fresh_db()]
    gates = []
    try:
        for dsn in dsns:
            h = Harness()
            gates.append(h)  # stopped in finally even if the next start fails
            await h.start(dsn, limits={"redis_url": URL})
        keys = []
        for h in gates:
            _, key_id, secret = await h.user_and_key(balance="10", concurrency=1)
            keys.append((key_id, secret))
        assert keys[0][0] == keys[1][0]  # fresh databases: the same key id in both
        lims = [h.worker.gw.limiter for h in gates]  # type: ignore[union-attr]
        assert all(lim is not None and lim.shared is not None for lim in lims)
        assert lims[0].shared.prefix != lims[1].shared.prefix  # type: ignore[union-attr]

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            async def chat(h: Harness, secret: str, delay_ms: int) -> int:
                body = {"model": "gpt-4o-mini", "max_tokens": 20, "stream": True,
                        "messages": [{"role": "user", "content": "ns"}],
                        "mock": {"chunks": 10, "delay_ms": delay_ms}}
                async with http.post(h.url + "/v1/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {secret}"}) as r:
                    await r.read()
                    return r.status

            # Deployment 0's key 1 uses its one slot for about a second...
            slow = asyncio.create_task(chat(gates[0], keys[0][1], 100))
            lim0 = lims[0]
            assert lim0 is not None
            for _ in range(200):
                if lim0.inflight:
                    break
                await asyncio.sleep(0.01)
            assert lim0.inflight == 1
            # ...which deployment 1's key 1 knows nothing of.
            assert await chat(gates[1], keys[1][1], 1) == 200
            assert await slow == 200
    finally:
        for h in gates:
            await h.stop()
        r = aioredis.from_url(URL)
        for h in gates:
            lim = h.worker.gw.limiter if h.worker and h.worker.gw else None
            if lim is not None and lim.shared is not None:
                names = [n async for n in r.scan_iter(match=lim.shared.prefix + "*")]
                if names:
                    await r.delete(*names)
        await r.aclose()

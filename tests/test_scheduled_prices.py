"""A price version written ahead of its time: the book switches to it at its instant on
its own clock (no poll needed at that moment), a newer immediate version wins, and the
admin API takes `effective_at`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from accounting.pricing import PriceBook, PriceRow


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def test_the_book_switches_at_the_instant() -> None:
    clock = Clock()
    book = PriceBook([PriceRow(1, "m", 10, 20, 10, 10)], clock=clock)
    book.apply([PriceRow(2, "m", 30, 60, 30, 30, effective_at=1_060.0)])
    assert book.lookup("m").version == 1
    assert [r.version for r in book.scheduled()] == [2]
    clock.t = 1_059.999
    assert book.lookup("m").version == 1
    clock.t = 1_060.0
    assert book.lookup("m").version == 2
    assert book.scheduled() == []
    assert book.by_version(1) is not None  # an old request stays explainable


def test_a_newer_immediate_version_wins_over_an_older_scheduled_one() -> None:
    clock = Clock()
    book = PriceBook([PriceRow(1, "m", 10, 20, 10, 10)], clock=clock)
    book.apply([PriceRow(2, "m", 30, 60, 30, 30, effective_at=1_060.0),
                PriceRow(3, "m", 5, 5, 5, 5)])
    assert book.lookup("m").version == 3
    clock.t = 2_000.0
    assert book.lookup("m").version == 3


@pytest.fixture
async def h(pg_dsn: str):
    from tests.gateway import Harness

    h = await Harness().start(pg_dsn, admin={"token": "t" * 40})
    yield h
    await h.stop()


async def test_the_admin_api_schedules_a_price(h) -> None:
    at = datetime.now(UTC) + timedelta(hours=1)
    hdr = {"Authorization": "Bearer " + "t" * 40}
    async with aiohttp.ClientSession() as s:
        r = await s.post(h.url + "/admin/v1/prices", headers=hdr,
                         json={"model": "sched-model", "input": "1", "output": "2",
                               "effective_at": at.isoformat()})
        assert r.status == 201, await r.text()
        made = await r.json()
        assert made["effective_at"] is not None
        r = await s.get(h.url + "/admin/v1/prices?model=sched-model", headers=hdr)
        assert (await r.json())["data"] == []  # not in effect yet
        r = await s.post(h.url + "/admin/v1/prices", headers=hdr,
                         json={"model": "sched-model", "input": "1", "output": "2",
                               "effective_at": "2001-01-01T00:00:00Z"})
        assert r.status == 400


async def test_a_stream_started_before_the_instant_keeps_the_old_price(h) -> None:
    import asyncio

    import asyncpg

    from accounting import pricing

    hdr = {"Authorization": "Bearer " + "t" * 40}
    _, _, secret = await h.user_and_key(balance="50")
    book = h.worker.gw.pricebook
    async with aiohttp.ClientSession() as s:
        # A model of this test's own: the run's other tests keep their prices.
        r = await s.post(h.url + "/admin/v1/prices", headers=hdr,
                         json={"model": "gpt-sched", "input": "0.15", "output": "0.60"})
        old = (await r.json())["version"]
        for _ in range(100):
            if book.lookup("gpt-sched").version == old:
                break
            await asyncio.sleep(0.05)
        at = datetime.now(UTC) + timedelta(seconds=2)
        r = await s.post(h.url + "/admin/v1/prices", headers=hdr,
                         json={"model": "gpt-sched", "input": "0.30", "output": "1.20",
                               "effective_at": at.isoformat()})
        assert r.status == 201, await r.text()
        new = (await r.json())["version"]
        # The worker loads the version at its next poll (about a second), long before `at`.
        for _ in range(100):
            if any(v.version == new for v in book.scheduled()):
                break
            await asyncio.sleep(0.05)
        assert book.lookup("gpt-sched").version == old
        # A second worker's book, loaded from Postgres, switches at the same instant.
        conn = await asyncpg.connect(h.dsn)
        try:
            other = pricing.PriceBook(await pricing.load_since(conn, 0))
        finally:
            await conn.close()
        assert other.lookup("gpt-sched").version == old
        auth = {"Authorization": f"Bearer {secret}"}
        stream = await s.post(h.url + "/v1/chat/completions", headers=auth, json={
            "model": "gpt-sched", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "mock": {"chunks": 20, "delay_ms": 150}})
        assert stream.status == 200
        started_rid = stream.headers["x-request-id"]
        await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 0.05)
        assert book.lookup("gpt-sched").version == new
        assert other.lookup("gpt-sched").version == new
        await stream.read()  # the stream ends after the instant
        r = await s.post(h.url + "/v1/chat/completions", headers=auth, json={
            "model": "gpt-sched", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status == 200
        after_rid = r.headers["x-request-id"]
    await h.flush()
    conn = await asyncpg.connect(h.dsn)
    try:
        rows = {r["request_id"]: r["price_version"] for r in await conn.fetch(
            "SELECT request_id, price_version FROM usage_log WHERE request_id = ANY($1::text[])",
            [started_rid, after_rid])}
    finally:
        await conn.close()
    assert rows == {started_rid: old, after_rid: new}

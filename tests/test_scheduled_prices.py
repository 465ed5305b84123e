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

"""The circuit breaker and the router's use of it, with a fake clock; then one gateway
whose channel fails ~100% of the time: its breaker opens, traffic goes to the healthy
channel, and after the cooldown a probe closes it again. Active health checks close an
open breaker as soon as the channel answers."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson
import pytest

from relay.config import ChannelConfig
from relay.healthcheck import HealthChecker
from relay.routing import Breaker, Router, channel_state
from tests.gateway import Harness, read_request

CLOSED, OPEN, HALF = Breaker.CLOSED, Breaker.OPEN, Breaker.HALF_OPEN


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def feed(b: Breaker, outcomes: str, t: float) -> None:
    """'.' success, 'x' failure, all at time t."""
    for ch in outcomes:
        b.record(ch == ".", t)


# --- the state machine ---------------------------------------------------------------


def test_one_error_does_not_open() -> None:
    b = Breaker(min_requests=5, threshold=0.5)
    feed(b, "x", 1.0)
    assert b.state == CLOSED and b.available(1.0)


def test_min_requests_before_any_decision() -> None:
    b = Breaker(min_requests=5, threshold=0.5)
    feed(b, "xxxx", 1.0)
    assert b.state == CLOSED  # 100% errors, but only 4 samples
    feed(b, "x", 1.0)
    assert b.state == OPEN
    assert b.opens == 1


def test_threshold_is_a_rate() -> None:
    b = Breaker(min_requests=4, threshold=0.5, max_samples=100)
    feed(b, ".x..x.x", 1.0)  # never at 0.5 after the fourth: 1/4, 2/5, 2/6, 3/7
    assert b.state == CLOSED
    feed(b, "x", 1.0)  # 4/8 = 0.5
    assert b.state == OPEN


def test_window_slides_by_count() -> None:
    b = Breaker(min_requests=10, threshold=0.5, max_samples=10)
    feed(b, "xxxx......", 1.0)  # 4/10
    assert b.state == CLOSED and b.errors == 4
    feed(b, "....", 1.0)  # the four errors fall out of the newest ten
    assert b.errors == 0 and len(b.outcomes) == 10
    feed(b, "xxxx", 1.0)  # 4/10
    assert b.state == CLOSED
    feed(b, "x", 1.0)  # 5/10
    assert b.state == OPEN


def test_window_slides_by_time() -> None:
    b = Breaker(window_s=30.0, min_requests=5, threshold=0.5)
    feed(b, "xxxx", 0.0)
    # Thirty-one seconds later those errors are history: four more do not open it.
    feed(b, "xxxx", 31.0)
    assert b.state == CLOSED
    assert b.error_rate(31.0) == 1.0 and len(b.outcomes) == 4
    assert b.error_rate(62.0) == 0.0 and b.errors == 0


def test_open_rejects_until_cooldown_then_one_probe() -> None:
    b = Breaker(min_requests=2, threshold=0.5, cooldown=10.0)
    feed(b, "xx", 100.0)
    assert b.state == OPEN
    assert not b.available(105.0)
    assert not b.available(109.99)
    assert b.available(110.0)  # the probe
    assert b.state == HALF
    assert not b.available(110.1)  # only one probe at a time
    assert not b.available(115.0)


def test_half_open_success_closes_and_forgets() -> None:
    b = Breaker(min_requests=2, threshold=0.5, cooldown=10.0)
    feed(b, "xx", 100.0)
    assert b.available(110.0)
    b.record(True, 110.5)
    assert b.state == CLOSED
    assert b.errors == 0 and not b.outcomes
    assert b.available(110.6) and b.available(110.7)
    # A fresh window: one error after recovery does not reopen it.
    feed(b, "x", 111.0)
    assert b.state == CLOSED


def test_half_open_failure_reopens_with_a_new_cooldown() -> None:
    b = Breaker(min_requests=2, threshold=0.5, cooldown=10.0)
    feed(b, "xx", 100.0)
    assert b.available(110.0)
    b.record(False, 111.0)
    assert b.state == OPEN and b.opens == 2
    assert not b.available(120.0)  # cooldown counts from the failed probe
    assert b.available(121.0)


def test_unreported_probe_slot_is_offered_again() -> None:
    # The router hands out the probe slot when it lists the channel, but an earlier
    # candidate may answer and this channel is never tried: the slot must not leak.
    b = Breaker(min_requests=2, threshold=0.5, cooldown=10.0, probe_timeout=5.0)
    feed(b, "xx", 100.0)
    assert b.available(110.0)
    assert not b.available(114.9)
    assert b.available(115.0)
    assert b.state == HALF


def test_outcomes_while_open_are_ignored() -> None:
    b = Breaker(min_requests=2, threshold=0.5, cooldown=10.0)
    feed(b, "xx", 100.0)
    feed(b, "....", 101.0)  # attempts that started before it opened
    assert b.state == OPEN and not b.available(102.0)


def test_reset_closes() -> None:
    b = Breaker(min_requests=2, threshold=0.5, cooldown=10.0)
    feed(b, "xx", 100.0)
    b.reset(101.0)
    assert b.state == CLOSED and b.available(101.0)


def test_snapshot_reports_state() -> None:
    b = Breaker(min_requests=2, threshold=0.6, cooldown=10.0)
    feed(b, ".x", 100.0)
    snap = b.snapshot(100.0)
    assert snap["state"] == "closed" and snap["window_requests"] == 2 and snap["error_rate"] == 0.5
    feed(b, "x", 101.0)
    snap = b.snapshot(104.0)
    assert snap["state"] == "open" and snap["opens"] == 1 and snap["probe_in_seconds"] == 7.0


# --- the router ----------------------------------------------------------------------


def chan(name: str, **kw: Any) -> ChannelConfig:
    return ChannelConfig(name=name, protocol="openai", base_url=f"http://127.0.0.1:9/{name}",
                         models=("m",), **kw)


def test_router_priority_tiers_then_weights() -> None:
    random.seed(7)
    r = Router([chan("low", priority=0), chan("hi-a", priority=10, weight=3),
                chan("hi-b", priority=10, weight=1)])
    firsts = {"hi-a": 0, "hi-b": 0}
    for _ in range(2000):
        order = [c.name for c in r.candidates("m")]
        assert order[-1] == "low"
        firsts[order[0]] += 1
    # weight 3:1 inside the top tier: ~75% first
    assert 0.70 < firsts["hi-a"] / 2000 < 0.80


def test_router_skips_open_and_full_channels() -> None:
    clock = Clock()
    r = Router([chan("a", priority=1), chan("b", max_concurrency=2)],
               breaker=lambda: Breaker(min_requests=2, cooldown=10.0), clock=clock)
    a, b = r.channels
    feed(a.breaker, "xx", clock.t)
    assert [c.name for c in r.candidates("m")] == ["b"]
    b.in_flight = 2
    # Nothing usable: the last resort is the best channel; without it, nothing.
    assert [c.name for c in r.candidates("m")] == ["a"]
    assert r.candidates("m", last_resort=False) == []
    assert r.known_model("m") and not r.known_model("other")
    b.in_flight = 1
    clock.t += 10.0
    # a is half-open: its single probe is offered once, b stays listed.
    assert [c.name for c in r.candidates("m")] == ["a", "b"]
    assert [c.name for c in r.candidates("m")] == ["b"]
    a.breaker.record(True, clock.t)
    assert [c.name for c in r.candidates("m")] == ["a", "b"]


def test_router_full_channel_does_not_take_the_probe() -> None:
    clock = Clock()
    r = Router([chan("a", max_concurrency=1), chan("b")],
               breaker=lambda: Breaker(min_requests=2, cooldown=10.0), clock=clock)
    a, _ = r.channels
    feed(a.breaker, "xx", clock.t)
    clock.t += 10.0
    a.in_flight = 1
    assert [c.name for c in r.candidates("m")] == ["b"]
    a.in_flight = 0
    assert "a" in [c.name for c in r.candidates("m")]
    assert a.breaker.probe_at == clock.t


def test_router_single_channel_and_status() -> None:
    clock = Clock()
    r = Router([chan("only", max_concurrency=1)], clock=clock)
    (only,) = r.channels
    only.in_flight = 1
    assert r.candidates("m") == [only]  # last resort keeps the old single-channel answer
    assert r.candidates("m", last_resort=False) == []
    st = r.status()["only"]
    assert st["state"] == "closed" and st["in_flight"] == 1 and st["max_concurrency"] == 1


def test_channel_state_metrics() -> None:
    clock = Clock()
    r = Router([chan("a"), chan("b")], breaker=lambda: Breaker(min_requests=2), clock=clock)
    feed(r.channels[0].breaker, "xx", clock.t)
    r.channels[1].in_flight = 3
    got = {}
    for fam, (_kind, _doc, label, _merge, values) in channel_state(r).items():
        assert label == "channel"
        for name, value in values.items():
            got[(fam, name)] = value
    assert got[("tollway_channel_state", "a")] == 1
    assert got[("tollway_channel_state", "b")] == 0
    assert got[("tollway_channel_error_rate", "a")] == 1.0
    assert got[("tollway_channel_breaker_opens", "a")] == 1
    assert got[("tollway_channel_in_flight", "b")] == 3


# --- integration: a failing channel opens, traffic moves, the channel recovers -----------


class FlakyUpstream:
    """Answers every request with `status` (an OpenAI-shaped error) until `healthy`."""

    def __init__(self, status: int = 500) -> None:
        self.status = status
        self.healthy = False
        self.requests = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> FlakyUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                self.requests += 1
                if self.healthy:
                    body = b'{"object":"list","data":[]}'
                    status = b"200 OK"
                else:
                    body = b'{"error":{"message":"flaky","type":"server_error"}}'
                    status = b"%d Error" % self.status
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def flaky() -> Any:
    f = await FlakyUpstream().start()
    yield f
    await f.close()


@pytest.fixture
async def gw2(pg_dsn: str, flaky: FlakyUpstream) -> Any:
    h = await Harness().start(pg_dsn, channels=[
        {"name": "bk-flaky", "protocol": "openai", "base_url": f"http://127.0.0.1:{flaky.port}/v1",
         "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["gpt-*"], "priority": 10},
        {"name": "bk-good", "protocol": "openai", "base_url": "http://127.0.0.1:{port}/v1",
         "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["gpt-*"]},
    ])
    yield h
    await h.stop()


def _breakers(h: Harness, cooldown: float) -> None:
    """Shorter cooldown for the test; the breaker survives router rebuilds (same config)."""
    assert h.worker is not None and h.worker.gw is not None
    for c in h.worker.gw.router.channels:
        c.breaker.cooldown = cooldown
        c.breaker.probe_timeout = cooldown


async def test_failing_channel_opens_and_recovers(gw2: Harness, flaky: FlakyUpstream) -> None:
    _breakers(gw2, 0.6)
    gw = gw2.worker.gw  # type: ignore[union-attr]
    _, _, secret = await gw2.user_and_key()
    hdr = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession() as http:
        async def one() -> int:
            async with http.post(gw2.url + "/v1/chat/completions", json=CHAT, headers=hdr) as r:
                await r.read()
                return r.status

        # Every request succeeds: the preferred (priority 10) channel fails, the retry goes
        # to the good one. After five failures in the window the breaker opens.
        for _ in range(12):
            assert await one() == 200
        flaky_ch = gw.router.channel("bk-flaky")
        assert flaky_ch is not None and flaky_ch.breaker.state == OPEN
        assert flaky.requests == 5  # not one more once it opened
        assert gw.router.status()["bk-flaky"]["state"] == "open"

        # /metrics exports the worker's channel state.
        async with http.get(gw2.url + "/metrics") as r:
            text = await r.text()
        assert 'tollway_channel_up{channel="bk-flaky"} 0.0' in text
        assert 'tollway_channel_up{channel="bk-good"} 1.0' in text

        # Still failing at the half-open probe: one request reaches it, it opens again.
        await asyncio.sleep(0.7)
        assert await one() == 200
        assert flaky.requests == 6 and flaky_ch.breaker.state == OPEN
        assert await one() == 200 and flaky.requests == 6

        # It heals; after the cooldown the probe succeeds and traffic returns to it.
        flaky.healthy = True
        await asyncio.sleep(0.7)
        good_before = gw2.mock.stats.requests_total
        for _ in range(5):
            assert await one() == 200
        assert flaky_ch.breaker.state == CLOSED
        assert flaky.requests == 11
        assert gw2.mock.stats.requests_total == good_before


async def test_active_health_check_closes_open_breaker(gw2: Harness, flaky: FlakyUpstream) -> None:
    gw = gw2.worker.gw  # type: ignore[union-attr]
    ch = gw.router.channel("bk-flaky")
    good = gw.router.channel("bk-good")
    assert ch is not None and good is not None
    feed(ch.breaker, "xxxxx", gw.router.clock())
    assert ch.breaker.state == OPEN
    checker = HealthChecker(lambda: gw.router, interval_s=0.05, timeout_s=1.0)
    # Still failing: probed, stays open. The closed channel is not probed.
    assert await checker.run_once() == {"bk-flaky": False}
    assert flaky.requests == 1 and ch.breaker.state == OPEN
    flaky.healthy = True
    checker.start()
    try:
        for _ in range(40):
            if ch.breaker.state == CLOSED:
                break
            await asyncio.sleep(0.05)
    finally:
        await checker.stop()
    assert ch.breaker.state == CLOSED and checker.recovered == 1
    # Probes are GET /v1/models with the channel's credential, on connections of their own.
    assert checker.pool.idle_count() == 0
    assert await checker.probe(good)  # the mock answers /v1/models
    assert gw2.mock.stats.last_route == "/v1/models"
    assert gw2.mock.stats.last_headers["authorization"] == "Bearer upstream-secret-credential"


async def test_health_check_anthropic_channel_and_refused() -> None:
    from bench import mock_upstream

    mock = await mock_upstream.start("127.0.0.1", 0)
    try:
        r = Router([
            ChannelConfig(name="a", protocol="anthropic", base_url=mock.url, models=("*",)),
            ChannelConfig(name="dead", protocol="openai", base_url="http://127.0.0.1:9/v1", models=("*",)),
        ])
        checker = HealthChecker(lambda: r, interval_s=1.0, timeout_s=1.0)
        # Without a credential the mock answers 401: unhealthy.
        assert not await checker.probe(r.channels[0])
        assert mock.stats.last_route == "/v1/models"
        assert mock.stats.last_headers["anthropic-version"] == "2023-06-01"
        assert not await checker.probe(r.channels[1])
        assert orjson.dumps(await checker.run_once()) == b"{}"  # nothing open: nothing probed
    finally:
        await mock.close()

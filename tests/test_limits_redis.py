"""Shared mode against the real Redis at 127.0.0.1:6379: two limiters act as two workers."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from limits.admission import Denial, Lease, Limiter
from limits.keys import KeyState
from relay.config import LimitsConfig

URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[1]


def key(**kw: object) -> KeyState:
    base: dict[str, object] = dict(
        id=1, user_id=7, name="k", enabled=True, user_enabled=True, expires_at=0.0,
        models=None, group="default", cap_nano=0, concurrency=0, rpm=0, tpm=0,
    )
    base.update(kw)
    return KeyState(**base)  # type: ignore[arg-type]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = f"tollway-test-{secrets.token_hex(4)}:"
    yield p
    r = aioredis.from_url(URL)
    names = [n async for n in r.scan_iter(match=p + "*")]
    if names:
        await r.delete(*names)
    await r.aclose()


Factory = Callable[..., Limiter]


@pytest.fixture
async def workers(prefix: str) -> AsyncIterator[Factory]:
    made: list[Limiter] = []

    def make(url: str = URL, balance: int = 10**15, ttl: float = 10.0, n: int = 2, **cfg: object) -> Limiter:
        async def loader(user_id: int, key_id: int) -> tuple[int, int]:
            return balance, 0

        lim = Limiter(
            LimitsConfig(redis_url=url, **cfg),  # type: ignore[arg-type]
            workers=n, loader=loader, redis_prefix=prefix, lease_ttl_s=ttl,
        )
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.close()


async def admit(lim: Limiter, k: KeyState, reserve: int = 0) -> Lease | Denial:
    for _ in range(5):
        r = lim.admit(k, "m", 10, reserve, "10.0.0.1", True, lim.clock())
        if r is not None:
            return r
        await lim.refill(k)
    raise AssertionError("admit kept asking for a refill")


async def drain(lim: Limiter, k: KeyState, reserve: int = 0) -> list[Lease]:
    out = []
    while isinstance(lease := await admit(lim, k, reserve), Lease):
        out.append(lease)
    return out


async def test_rpm_held_across_two_workers_within_one_block(workers: Factory) -> None:
    a, b = workers(lease_block=10), workers(lease_block=10)
    await a.start()
    await b.start()
    k = key(rpm=60, concurrency=10_000)
    got_a: list[Lease] = []
    got_b: list[Lease] = []
    # Interleave so both hold blocks at once.
    while True:
        ra, rb = await admit(a, k), await admit(b, k)
        if isinstance(ra, Lease):
            got_a.append(ra)
        if isinstance(rb, Lease):
            got_b.append(rb)
        if isinstance(ra, Denial) and isinstance(rb, Denial):
            break
    total = len(got_a) + len(got_b)
    assert got_a and got_b
    assert 60 <= total <= 60 + 10, total
    assert isinstance(ra, Denial) and ra.status == 429 and ra.reason == "rpm"


async def test_concurrency_shared_handed_back_on_demand_and_after_idle(workers: Factory) -> None:
    a, b = workers(lease_block=4), workers(lease_block=4)
    await a.start()
    await b.start()
    k = key(concurrency=10)
    held_a = await drain(a, k)
    held_b = await drain(b, k)
    # a refilled again and again while draining: its block grew, never past the limit.
    assert len(held_a) == 10 and held_b == []
    assert a.keys[1].blk > 1
    for lease in held_a:
        lease.release(0, 0)
    # a keeps its free slots while it may get busy again, but hands them back as soon as
    # b has admissions waiting: a key under its limit is never denied.
    more = await drain(b, k)
    assert len(more) == 10
    for lease in more:
        lease.release(0, 0)
    assert a.keys[1].conc_held == 0
    await asyncio.sleep(1.3)  # idle: b hands back everything and starts over at one block
    assert b.keys[1].conc_held == 0 and b.keys[1].blk == 1


async def test_dead_worker_slots_expire(workers: Factory) -> None:
    a, b = workers(ttl=0.5, lease_block=5), workers(ttl=0.5, lease_block=5)
    await a.start()
    await b.start()
    k = key(concurrency=5)
    held = await drain(a, k)
    assert len(held) == 5
    assert await drain(b, k) == []
    assert a.shared is not None and a.shared._task is not None
    a.shared._closing = True  # the worker dies: no renewals, no returns
    a.shared._task.cancel()
    await asyncio.sleep(0.8)
    assert a.shared._task.done()
    assert len(await drain(b, k)) == 5


async def test_budget_shared_never_overdrawn(workers: Factory) -> None:
    a = workers(balance=1000, lease_block=10)
    b = workers(balance=1000, lease_block=10)
    await a.start()
    await b.start()
    k = key(concurrency=10_000)
    got: list[Lease] = []
    while True:
        ra, rb = await admit(a, k, 30), await admit(b, k, 30)
        got += [r for r in (ra, rb) if isinstance(r, Lease)]
        if not isinstance(ra, Lease) and not isinstance(rb, Lease):
            break
    # 1000 / 30 = 33; each worker may strand less than one reservation in its slice.
    assert 31 <= len(got) <= 33
    assert isinstance(ra, Denial) and ra.status == 402
    for lease in got:
        lease.release(30, 0)
    assert a.users[7].unflushed + b.users[7].unflushed == 30 * len(got) <= 1000


async def test_settled_money_stays_claimed_until_a_snapshot_covers_it(
    workers: Factory, prefix: str
) -> None:
    a = workers(balance=1000, lease_block=1)
    b = workers(balance=1000, lease_block=1)
    await a.start()
    await b.start()
    k = key(concurrency=100)
    lease = await admit(a, k, 600)
    assert isinstance(lease, Lease)
    lease.release(600, 0)
    await asyncio.sleep(0.1)
    # a flushes 600 to Postgres; until a newer snapshot lands, b must not see it as free.
    a.on_flushed({7: 600}, {}, committed_at=time.time())
    await asyncio.sleep(0.1)
    r = await admit(b, k, 600)
    assert isinstance(r, Denial) and r.status == 402
    b.apply_user_snapshot(7, 400, as_of=time.time() + 3)  # read after the commit
    # a drops the covered claim on its next sync and, idle for a second, hands back the
    # slice it had leased ahead of need; b's cached 402 lapses after 0.5 s.
    await asyncio.sleep(1.3)
    r = await admit(b, k, 400)
    assert isinstance(r, Lease)
    assert isinstance(await admit(b, k, 1), Denial)


async def test_redis_flush_rebuilds_from_snapshot(workers: Factory, prefix: str) -> None:
    a = workers(balance=500, lease_block=1)
    await a.start()
    k = key(concurrency=100)
    first = await admit(a, k, 200)
    assert isinstance(first, Lease)
    first.release(200, 0)
    r = aioredis.from_url(URL)
    await r.delete(*[n async for n in r.scan_iter(match=prefix + "*")])
    await r.aclose()
    await asyncio.sleep(0.2)
    # The loader (Postgres: 500, nothing flushed yet) seeds Redis again and the worker's
    # unflushed 200 is claimed again: 300 left, not 500.
    got = await drain(a, k, 100)
    assert len(got) == 3


async def test_unreachable_redis_from_start_never_spends(workers: Factory) -> None:
    lim = workers(url="redis://127.0.0.1:1/0", n=2)
    await lim.start()
    assert lim.degraded
    k = key()
    for reserve in (0, 10):
        r = lim.admit(k, "m", 1, reserve, "10.0.0.1", True, lim.clock())
        assert isinstance(r, Denial) and r.reason == "quota_degraded" and r.status == 429
    await lim.refill(k)  # refilling cannot help while Redis is away
    r = lim.admit(k, "m", 1, 10, "10.0.0.1", True, lim.clock())
    assert isinstance(r, Denial) and r.reason == "quota_degraded"
    assert lim.stats()["degraded"] is True


async def test_redis_lost_midway_safe_mode(workers: Factory) -> None:
    lim = workers(n=2, key_rpm=20, lease_block=10)
    await lim.start()
    k = key(concurrency=6)
    first = await admit(lim, k, 100)  # leases a slice of 100 x 10 and a block of RPM tokens
    assert isinstance(first, Lease)
    first.release(100, 0)
    assert lim.shared is not None
    old = lim.shared.redis
    lim.shared.redis = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    lim.shared._sync = lim.shared.redis.register_script(lim.shared._sync.script)
    await old.aclose()
    await lim.refill(k)
    assert lim.degraded
    leases = []
    while isinstance(x := lim.admit(k, "m", 1, 100, "10.0.0.1", True, lim.clock()), Lease):
        leases.append(x)
    # Concurrency 6 over 2 workers: 3 at a time.
    assert len(leases) == 3 and isinstance(x, Denial) and x.reason == "concurrency"
    spent = 100
    n = 0
    while True:
        for lease in leases:
            lease.release(100, 0)
            spent += 100
        leases = []
        x = lim.admit(k, "m", 1, 100, "10.0.0.1", True, lim.clock())
        if not isinstance(x, Lease):
            break
        leases.append(x)
        n += 1
    # Money: only the slice leased before the outage (1000) is ever spent.
    assert spent <= 1000
    assert isinstance(x, Denial) and x.reason in ("quota_degraded", "rpm")


async def test_steady_traffic_almost_never_waits_on_redis(workers: Factory) -> None:
    a, b = workers(), workers()
    await a.start()
    await b.start()
    k = key(concurrency=100_000)
    assert a.shared is not None and b.shared is not None
    n = 4000
    for i in range(n):
        lim = a if i % 2 else b
        lease = await admit(lim, k, 8_000_000)
        assert isinstance(lease, Lease)
        await asyncio.sleep(0)
        lease.release(50_000, 30)
    waits = a.shared.waits + b.shared.waits
    rounds = a.shared.rounds + b.shared.rounds
    # The first admissions wait (nothing leased yet); then prefetch and growing blocks
    # keep ahead of the traffic: no wait, and a round trip for a small share of requests.
    assert waits <= 8, waits
    assert rounds <= n // 20, rounds
    assert a.users[7].blk > 1  # money is what this traffic consumes: its block grew


async def test_concurrent_refills_share_one_round(workers: Factory) -> None:
    a = workers()
    await a.start()
    assert a.shared is not None
    k = key(concurrency=1000)
    await asyncio.sleep(0.1)  # the first periodic round has run (nothing to do yet)
    before = a.shared.rounds
    got = await asyncio.gather(*(admit(a, k, 1000) for _ in range(64)))
    assert all(isinstance(x, Lease) for x in got)
    # 64 waiters: one pipeline finds the user unknown to Redis, one snapshot seeds it,
    # one more pipeline leases; the block grows so the rest need at most a few more.
    assert a.shared.rounds - before <= 6, a.shared.rounds - before
    assert a.shared.waits >= 64


async def test_prefetch_leaves_other_workers_their_share(workers: Factory) -> None:
    a = workers(balance=10_000, lease_block=10)
    b = workers(balance=10_000, lease_block=10)
    await a.start()
    await b.start()
    k = key(concurrency=1000)
    # A busy worker: 30 requests in flight, its money block grows with each wait.
    held = [await admit(a, k, 100) for _ in range(30)]
    assert all(isinstance(x, Lease) for x in held)
    await asyncio.sleep(0.1)  # prefetch rounds have run
    # unbounded, 3,000 reserved + a free slice of 100 x 10 x 4 would leave b under 4,000
    assert a.users[7].blk >= 4
    # however large its block, a's claim stays within half of the balance (+ one need)
    assert a.users[7].held <= 5_000 + 100
    r = await admit(b, k, 4_000)
    assert isinstance(r, Lease)


async def test_cancelled_waiter_does_not_cancel_the_round(workers: Factory) -> None:
    a = workers()
    await a.start()
    k = key()
    assert a.admit(k, "m", 1, 10, "10.0.0.1", True, a.clock()) is None
    first = asyncio.create_task(a.refill(k))
    second = asyncio.create_task(a.refill(k))
    await asyncio.sleep(0)
    first.cancel()  # its client went away
    await second
    assert first.cancelled()
    assert isinstance(a.admit(k, "m", 1, 10, "10.0.0.1", True, a.clock()), Lease)


async def test_flushed_spend_of_an_uncapped_key_is_forgotten_once_snapshotted(
    workers: Factory,
) -> None:
    a = workers()
    await a.start()
    k = key()
    lease = await admit(a, k, 100)
    assert isinstance(lease, Lease)
    lease.release(100, 0)
    a.on_flushed({7: 100}, {1: 100}, committed_at=time.time())
    assert a.keys[1].flushed and a.keys[1].unflushed == 0
    a.apply_key_snapshot(1, 100, as_of=time.time() + 3)
    a.apply_user_snapshot(7, 10**15 - 100, as_of=time.time() + 3)
    await asyncio.sleep(0.2)
    assert a.keys[1].flushed == [] and a.users[7].flushed == []


async def test_scripts_lost_by_redis_are_loaded_again(workers: Factory) -> None:
    a = workers()
    await a.start()
    k = key(rpm=100_000)
    assert isinstance(await admit(a, k, 10), Lease)
    r = aioredis.from_url(URL)
    await r.script_flush()
    await r.aclose()
    assert a.shared is not None
    errors = a.shared.errors
    a.keys[1].rt = 0  # out of RPM tokens: the next admission needs a round
    assert isinstance(await admit(a, k, 10), Lease)
    assert a.shared.errors == errors and not a.degraded


async def test_one_refill_learns_everything_the_first_request_needs(workers: Factory) -> None:
    # A new capped key: concurrency, the key's cap and the user's balance all unleased.
    # relay admits at most three times, so the first refill must lease all three.
    a = workers(balance=10**12, key_rpm=600)
    await a.start()
    k = key(cap_nano=3_000_000)
    assert a.admit(k, "m", 10, 250_000, "10.0.0.1", True, a.clock()) is None
    await a.refill(k)
    assert isinstance(a.admit(k, "m", 10, 250_000, "10.0.0.1", True, a.clock()), Lease)


# --- two busy workers, a dead one, waiters near a cap (issue 20, item 7) -----------------


async def relay_admit(lim: Limiter, k: KeyState, reserve: int = 0) -> Lease | Denial | str:
    """What relay's `_admit` does: at most three admissions, a refill after each None."""
    for _ in range(3):
        r = lim.admit(k, "m", 10, reserve, "10.0.0.1", True, lim.clock())
        if r is not None:
            return r
        await lim.refill(k)
    return "unavailable"  # relay: 429 "Rate limit state unavailable, retry shortly"


async def test_a_busy_worker_never_starves_another_under_the_limit(workers: Factory) -> None:
    # Worker a ramps to 90 requests in flight (each wait doubles its lease block), then
    # most of them finish while it stays busy. Worker b then gets 50 concurrent requests:
    # 10 + 50 in flight is under the key's 100, so none of them may be denied.
    a, b = workers(), workers()
    await a.start()
    await b.start()
    k = key(concurrency=100)
    ramp = await asyncio.gather(*(relay_admit(a, k, 1000) for _ in range(90)))
    assert all(isinstance(x, Lease) for x in ramp)
    held: list[Lease] = [x for x in ramp if isinstance(x, Lease)]
    for lease in held[10:]:
        lease.release(500, 10)
    held = held[:10]
    got = await asyncio.gather(*(relay_admit(b, k, 1000) for _ in range(50)))
    denied = [x for x in got if not isinstance(x, Lease)]
    assert denied == [], f"{len(denied)} of 50 denied under the limit: {denied[:3]}"
    for x in [*held, *got]:
        assert isinstance(x, Lease)
        x.release(500, 10)


async def test_looping_clients_on_two_workers_under_the_limit_are_never_denied(
    workers: Factory,
) -> None:
    # The load in miniature: 40 clients looping on one key of concurrency 100; all
    # start on worker a (worker b restarting), then half move to b.
    a, b = workers(), workers()
    await a.start()
    await b.start()
    k = key(concurrency=100)
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    t_move = loop.time() + 0.6
    t_end = loop.time() + 2.0

    async def client(i: int) -> None:
        while (now := loop.time()) < t_end:
            lim = b if i % 2 and now > t_move else a
            r = await relay_admit(lim, k, 1000)
            if isinstance(r, Lease):
                outcomes["ok"] += 1
                await asyncio.sleep(0.002 + (i % 7) * 0.002)
                r.release(500, 10)
            else:
                outcomes[r if isinstance(r, str) else f"{r.status} {r.message}"] += 1
                await asyncio.sleep(0.005)

    await asyncio.gather(*(client(i) for i in range(40)))
    assert set(outcomes) == {"ok"}, outcomes


async def test_near_the_cap_a_request_gets_a_lease_or_402_never_unavailable(
    workers: Factory,
) -> None:
    a, b = workers(), workers()
    await a.start()
    await b.start()
    reserve = 1000
    k = key(concurrency=1000, cap_nano=60 * reserve)
    outcomes: Counter[str] = Counter()
    leases = 0

    async def client(i: int) -> None:
        nonlocal leases
        lim = a if i % 2 else b
        for _ in range(40):
            r = await relay_admit(lim, k, reserve)
            if isinstance(r, Lease):
                leases += 1
                await asyncio.sleep(0.005)
                r.release(reserve // 2, 10)
                outcomes["ok"] += 1
            else:
                outcomes[r if isinstance(r, str) else f"{r.status}"] += 1
                await asyncio.sleep(0.002)

    await asyncio.gather(*(client(i) for i in range(20)))
    assert outcomes["unavailable"] == 0, outcomes
    assert set(outcomes) <= {"ok", "402"}, outcomes
    # The cap covers 120 requests at half their reservation. A worker whose waiters the
    # budget cannot cover answers 402 for half a second without asking again, so a few
    # may be refused while the other worker's last slice comes back.
    assert 110 <= leases <= 120, outcomes
    assert a.keys[1].unflushed + b.keys[1].unflushed <= 60 * reserve


async def test_money_another_worker_holds_unused_serves_a_request_the_cap_covers(
    workers: Factory,
) -> None:
    a, b = workers(lease_block=10), workers(lease_block=10)
    await a.start()
    await b.start()
    k = key(concurrency=100, cap_nano=10_000)
    first = await relay_admit(a, k, 100)
    assert isinstance(first, Lease)
    first.release(100, 0)
    assert a.keys[1].held > 0  # a's slice, leased ahead of need, is still a's
    # 9,900 of the cap is left: the key covers this request, so it is served.
    r = await relay_admit(b, k, 9_900)
    assert isinstance(r, Lease), r
    r2 = await relay_admit(a, k, 1)
    assert isinstance(r2, Denial) and r2.status == 402


CHILD = r"""
import asyncio, sys
from limits.admission import Lease, Limiter
from limits.keys import KeyState
from relay.config import LimitsConfig

async def main() -> None:
    async def loader(user_id, key_id):
        return 10**15, 0
    # Constructed as relay/worker.py does: every lease setting at its default.
    lim = Limiter(LimitsConfig(redis_url=sys.argv[1]), workers=2, loader=loader,
                  redis_prefix=sys.argv[2])
    await lim.start()
    k = KeyState(id=1, user_id=7, name="k", enabled=True, user_enabled=True, expires_at=0.0,
                 models=None, group="default", cap_nano=0, concurrency=100, rpm=0, tpm=0)
    held = []
    while len(held) < 60:
        r = lim.admit(k, "m", 10, 1000, "10.0.0.1", True, lim.clock())
        if r is None:
            await lim.refill(k)
            continue
        assert isinstance(r, Lease), r
        held.append(r)
    print("held", lim.keys[1].conc_held, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _spawn_worker(prefix: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CHILD, URL, prefix], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.timeout(60)
async def test_a_killed_workers_slots_are_reclaimed_within_a_second(
    workers: Factory, prefix: str
) -> None:
    proc = await asyncio.to_thread(_spawn_worker, prefix)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.startswith(b"held"), (line, proc.stderr.read() if proc.poll() is not None else b"")
        b = workers()
        await b.start()
        k = key(concurrency=100)
        mine = await drain(b, k, 1000)
        assert len(mine) == 40  # the other 60 are the child's, in flight
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        while len(mine) < 100 and time.monotonic() - t_kill < 10:
            r = await relay_admit(b, k, 1000)
            if isinstance(r, Lease):
                mine.append(r)
            else:
                await asyncio.sleep(0.01)
        reclaimed = time.monotonic() - t_kill
        assert len(mine) == 100
        assert reclaimed <= 1.5, f"the dead worker's slots came back after {reclaimed:.1f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait, 10)

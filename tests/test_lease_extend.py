"""`Lease.extend`: a stream's reservation grown mid-flight, synchronously, on the scopes
its admission drew on (key cap, balance or plan), by admission's own fit rule."""

from __future__ import annotations

import asyncio
import random

from limits.admission import Denial, Lease
from tests.test_limits import USD, admit, key, limiter
from tests.test_limits_redis import Factory, prefix, workers  # noqa: F401 (fixtures)
from tests.test_limits_redis import admit as shared_admit


def test_extend_grows_the_reservation_and_release_replaces_it() -> None:
    lim = limiter(balance=1000)
    lease = admit(lim, key(), reserve=300)
    assert isinstance(lease, Lease) and lease.reserve == -300  # uncapped key: negative
    assert lease.extend(200)
    assert lease.reserve == -500  # the sign says which scopes it holds against
    assert lim.users[7].reserved == 500 and lim.keys[1].reserved == 0
    assert not lease.extend(501)  # 1000 - 500 reserved: refused, nothing changes
    assert lease.reserve == -500 and lim.users[7].reserved == 500
    assert lease.extend(500)  # exactly what is left fits
    assert not lease.extend(1)
    lease.release(900, 0)
    assert lim.users[7].reserved == 0 and lim.users[7].unflushed == 900


def test_a_released_lease_refuses() -> None:
    lim = limiter(balance=1000)
    lease = admit(lim, key(), reserve=10)
    assert isinstance(lease, Lease)
    lease.release(10, 0)
    assert not lease.extend(1)
    assert lim.users[7].reserved == 0 and lease.reserve == -10


def test_key_cap_blocks_an_extension_the_balance_allows() -> None:
    lim = limiter(balance=10 * USD)
    lim.apply_key_snapshot(1, 0)
    lease = admit(lim, key(cap_nano=1000), reserve=600)
    assert isinstance(lease, Lease) and lease.reserve == 600
    assert not lease.extend(401)  # the cap, not the balance
    assert lim.keys[1].reserved == 600 and lim.users[7].reserved == 600
    assert lease.extend(400)
    assert lease.reserve == 1000 and lim.keys[1].reserved == 1000 and lim.users[7].reserved == 1000
    assert isinstance(admit(lim, key(cap_nano=1000), reserve=1), Denial)
    lease.release(700, 0)
    assert lim.keys[1].reserved == 0 and lim.users[7].reserved == 0
    assert lim.keys[1].unflushed == 700


def test_a_zero_reservation_keeps_its_scopes() -> None:
    # A free model reserves 0: the lease's sign cannot say whether the key cap was
    # reserved against; the key's cap decides (what the next release will undo).
    lim = limiter(balance=1000)
    lim.apply_key_snapshot(1, 0)
    free = admit(lim, key(), reserve=0)
    assert isinstance(free, Lease) and free.reserve == 0
    assert free.extend(100) and free.reserve == -100
    assert lim.keys[1].reserved == 0 and lim.users[7].reserved == 100
    free.release(100, 0)
    capped = admit(lim, key(cap_nano=500), reserve=0)
    assert isinstance(capped, Lease)
    assert not capped.extend(401)  # the key spent 100 of its 500 above
    assert capped.extend(400) and capped.reserve == 400 and lim.keys[1].reserved == 400
    capped.release(0, 0)
    assert lim.keys[1].reserved == 0 and lim.users[7].reserved == 0


def test_plan_bound_lease_extends_on_the_plan_only() -> None:
    lim = limiter(balance=10 * USD)
    lim.apply_plan_snapshot(5, 1000)
    k = key(plan_id=5, plan_fallback=True)
    lease = admit(lim, k, reserve=800)
    assert isinstance(lease, Lease) and lease.plan_id == 5
    # The plan cannot cover it: refused, though the balance (the fallback) could. One
    # lease draws on one money scope; its row says which.
    assert not lease.extend(201)
    assert lease.extend(200) and lim.plans[5].reserved == 1000 and lim.users[7].reserved == 0
    lease.release(1000, 0)
    assert lim.plans[5].unflushed == 1000 and lim.users[7].unflushed == 0


def test_an_unknown_balance_refuses_an_extension() -> None:
    # The same fit rule as admission: no snapshot, no money (and never a wait for one).
    lim = limiter(balance=1000)
    lease = admit(lim, key(), reserve=100)
    assert isinstance(lease, Lease)
    lim.users[7].db = None  # as after a loader-less restart of the scope
    assert not lease.extend(1)
    assert lease.reserve == -100


async def test_extensions_and_admissions_never_reserve_past_the_balance() -> None:
    balance = 50_000
    lim = limiter(balance=balance, key_concurrency=10_000)
    k = key(concurrency=10_000)
    rng = random.Random(19)
    peak = 0
    spent = 0

    def check() -> None:
        nonlocal peak
        u = lim.users[7]
        assert u.reserved + u.unflushed <= balance
        peak = max(peak, u.reserved)

    async def stream(i: int) -> None:
        nonlocal spent
        lease = admit(lim, k, reserve=rng.randint(50, 400))
        if not isinstance(lease, Lease):
            assert isinstance(lease, Denial) and lease.status == 402
            return
        check()
        try:
            for _ in range(rng.randint(0, 6)):
                await asyncio.sleep(0.0005 * rng.randint(0, 3))
                before = lease.reserve
                if not lease.extend(rng.randint(1, 300)):
                    assert lease.reserve == before
                check()
        finally:
            cost = rng.randint(0, abs(lease.reserve))  # settlement never exceeds it
            spent += cost
            lease.release(cost, 1)
            check()

    for _ in range(3):
        await asyncio.gather(*(stream(i) for i in range(400)))
    u = lim.users[7]
    assert u.reserved == 0 and lim.inflight == 0
    assert u.unflushed == spent <= balance
    assert peak > balance // 2  # the test did press against the balance


# --- shared mode: only what this worker holds ------------------------------------------------


async def test_shared_extension_uses_only_the_held_slice(workers: Factory) -> None:  # noqa: F811
    a = workers(balance=10_000, lease_block=2)
    await a.start()
    k = key(concurrency=100)
    lease = await shared_admit(a, k, 1000)
    assert isinstance(lease, Lease)
    u = a.users[7]
    free = u.held - u.reserved
    assert 0 < free < 10_000 - 1000  # a slice, not the whole balance
    assert not lease.extend(free + 1)  # Redis has more, but a stream never waits for it
    assert lease.reserve == -1000 and u.reserved == 1000
    assert lease.extend(free)
    assert lease.reserve == -(1000 + free) and u.reserved == u.held
    # The slice is below its low-water mark now: the background task tops it up, sized
    # for the refused request, so the stream's next try finds it here.
    for _ in range(100):
        await asyncio.sleep(0.01)
        if u.held - u.reserved > free + 1:
            break
    assert u.held - u.reserved > free + 1
    assert lease.extend(free + 1)
    lease.release(abs(lease.reserve), 0)
    assert u.reserved == 0


async def test_shared_extensions_never_overdraw_across_two_workers(workers: Factory) -> None:  # noqa: F811
    a = workers(balance=20_000, lease_block=4)
    b = workers(balance=20_000, lease_block=4)
    await a.start()
    await b.start()
    k = key(concurrency=10_000)
    leases: list[Lease] = []
    for lim in (a, b) * 20:
        r = await shared_admit(lim, k, 300)
        if isinstance(r, Lease):
            leases.append(r)
    for _ in range(50):
        for lease in leases:
            lease.extend(97)
        await asyncio.sleep(0.01)  # the background task refills and hands back meanwhile
    total = sum(abs(x.reserve) for x in leases)
    assert 10_000 < total <= 20_000  # pressed against the balance, never past it
    for lease in leases:
        lease.release(abs(lease.reserve), 0)
    assert a.users[7].unflushed + b.users[7].unflushed == total

"""In-process admission: order of checks, concurrency, RPM/TPM math, quota, leases."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from limits.admission import NEAR, Denial, Lease, Limiter, anthropic_headers, check_workers
from limits.keys import KeyState
from relay.config import LimitsConfig

USD = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def key(**kw: object) -> KeyState:
    base: dict[str, object] = dict(
        id=1, user_id=7, name="k", enabled=True, user_enabled=True, expires_at=0.0,
        models=None, group="default", cap_nano=0, concurrency=0, rpm=0, tpm=0,
    )
    base.update(kw)
    return KeyState(**base)  # type: ignore[arg-type]


def limiter(balance: int = 100 * USD, clock: Clock | None = None, **cfg: object) -> Limiter:
    lim = Limiter(LimitsConfig(**cfg), clock or Clock())  # type: ignore[arg-type]
    lim.apply_user_snapshot(7, balance)
    return lim


def admit(lim: Limiter, k: KeyState, reserve: int = 0, ip: str = "10.0.0.1",
          allowed: bool = True, now: float | None = None) -> Lease | Denial | None:
    return lim.admit(k, "gpt-4o-mini", 100, reserve, ip, allowed,
                     lim.clock() if now is None else now)


def test_check_order_and_codes() -> None:
    lim = limiter()
    d = admit(lim, key(enabled=False, user_enabled=False))
    assert isinstance(d, Denial) and (d.status, d.code, d.message) == (401, "invalid_api_key", "key disabled")
    d = admit(lim, key(user_enabled=False))
    assert isinstance(d, Denial) and d.status == 401 and d.message == "user disabled"
    d = admit(lim, key(expires_at=time.time() - 1))
    assert isinstance(d, Denial) and d.message == "key expired"
    d = admit(lim, key(plan_id=3, plan_expires_at=time.time() - 1))
    assert isinstance(d, Denial) and d.message == "plan expired"
    d = admit(lim, key(expires_at=time.time() - 1), allowed=False)
    assert isinstance(d, Denial) and d.message == "key expired"  # expiry is checked before scope
    d = admit(lim, key(), allowed=False)
    assert isinstance(d, Denial) and (d.status, d.code) == (403, "model_not_allowed")
    ok = admit(lim, key(expires_at=time.time() + 60))
    assert isinstance(ok, Lease)
    ok.release(0, 0)
    assert lim.stats()["denials"] == {
        "key_disabled": 1, "user_disabled": 1, "key_expired": 2, "plan_expired": 1,
        "model_not_allowed": 1,
    }
    assert lim.stats()["inflight"] == 0


def test_ip_allowlist_and_device_cap() -> None:
    lim = limiter(user_max_ips=2, user_ip_window_s=300)
    k = key(allowed_cidrs=("10.0.0.0/8", "2001:db8::/32"))
    for ip, ok in [("10.1.2.3", True), ("2001:db8::1", True), ("11.0.0.1", False), ("junk", False)]:
        r = admit(lim, k, ip=ip)
        assert isinstance(r, Lease) is ok, ip
        if isinstance(r, Lease):
            r.release(0, 0)
        else:
            assert r is not None and (r.status, r.code) == (403, "ip_not_allowed")
    # Two distinct IPs already seen: a third is refused until the window slides.
    r = admit(lim, k, ip="10.9.9.9")
    assert isinstance(r, Denial) and r.status == 403 and "device/IP limit" in r.message
    assert 299 <= r.retry_after <= 300
    lease = admit(lim, k, ip="10.1.2.3")  # a known IP still works
    assert isinstance(lease, Lease)
    lease.release(0, 0)
    r = admit(lim, k, ip="10.9.9.9", now=lim.clock() + 301)
    assert isinstance(r, Lease)


async def test_concurrency_peak_exactly_100_without_retry() -> None:
    lim = limiter()
    k = key()  # default key_concurrency 100
    live = peak = admitted = 0

    async def one() -> None:
        nonlocal live, peak, admitted
        lease = admit(lim, k)
        if not isinstance(lease, Lease):
            assert isinstance(lease, Denial) and lease.status == 429
            return
        admitted += 1
        live += 1
        peak = max(peak, live)
        try:
            await asyncio.sleep(0.01)
        finally:
            live -= 1
            lease.release(0, 0)

    await asyncio.gather(*(one() for _ in range(1000)))
    assert (admitted, peak) == (100, 100)
    assert lim.inflight == 0 and lim.keys[1].inflight == 0


async def test_concurrency_all_served_with_retry() -> None:
    lim = limiter()
    k = key()
    live = peak = served = 0

    async def one() -> None:
        nonlocal live, peak, served
        while True:
            lease = admit(lim, k)
            if isinstance(lease, Lease):
                break
            assert isinstance(lease, Denial) and lease.retry_after > 0
            await asyncio.sleep(0.002)
        live += 1
        peak = max(peak, live)
        try:
            await asyncio.sleep(0.005)
        finally:
            live -= 1
            lease.release(0, 0)
        served += 1

    await asyncio.gather(*(one() for _ in range(1000)))
    assert (served, peak) == (1000, 100)
    assert lim.inflight == 0


def test_rpm_bucket_math_and_headers() -> None:
    clock = Clock()
    lim = limiter(clock=clock)
    k = key(rpm=60, concurrency=1000)
    leases = [admit(lim, k) for _ in range(60)]
    assert all(isinstance(x, Lease) for x in leases)
    first = leases[0]
    assert isinstance(first, Lease)
    hs = dict(first.headers)
    assert hs[b"x-ratelimit-limit-requests"] == b"60"
    assert hs[b"x-ratelimit-remaining-requests"] == b"59"
    last = leases[-1]
    assert isinstance(last, Lease) and dict(last.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    assert dict(last.headers)[b"x-ratelimit-reset-requests"] == b"1m0s"
    d = admit(lim, k)
    assert isinstance(d, Denial) and (d.status, d.code) == (429, "rate_limit_exceeded")
    assert d.retry_after == pytest.approx(1.0)
    assert (b"retry-after", b"1") in d.headers
    assert dict(d.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    clock.t += 1.0  # one token per second at 60 RPM
    assert isinstance(admit(lim, k), Lease)
    assert isinstance(admit(lim, k), Denial)
    clock.t += 120  # a full bucket, never more than its capacity
    n = 0
    while isinstance(admit(lim, k), Lease):
        n += 1
    assert n == 60


def test_user_rpm_applies_across_keys() -> None:
    lim = limiter(user_rpm=3)
    got = [admit(lim, key(id=i)) for i in (1, 2, 3, 4)]
    assert [isinstance(x, Lease) for x in got] == [True, True, True, False]
    d = got[3]
    assert isinstance(d, Denial) and "account" in d.message


def test_tpm_counts_settled_tokens() -> None:
    clock = Clock()
    lim = limiter(clock=clock)
    k = key(tpm=6000)  # 100 tokens per second
    a = admit(lim, k)
    b = admit(lim, k)  # admission does not pre-charge: both fit
    assert isinstance(a, Lease) and isinstance(b, Lease)
    assert dict(a.headers)[b"x-ratelimit-remaining-tokens"] == b"6000"
    a.release(0, 5000)
    c = admit(lim, k)
    assert isinstance(c, Lease) and dict(c.headers)[b"x-ratelimit-remaining-tokens"] == b"1000"
    b.release(0, 3000)  # the bucket is now 2000 below zero
    c.release(0, 0)
    d = admit(lim, k)
    assert isinstance(d, Denial) and d.reason == "tpm"
    assert d.retry_after == pytest.approx(20.01, abs=0.02)
    clock.t += 20.0
    assert isinstance(admit(lim, k), Denial)  # exactly zero is still empty
    clock.t += 0.5
    assert isinstance(admit(lim, k), Lease)


def test_anthropic_header_names() -> None:
    lim = limiter()
    lease = admit(lim, key(rpm=10, tpm=1000))
    assert isinstance(lease, Lease)
    hs = dict(anthropic_headers(lease.headers, wall_now=0.0))
    assert hs[b"anthropic-ratelimit-requests-limit"] == b"10"
    assert hs[b"anthropic-ratelimit-requests-remaining"] == b"9"
    assert hs[b"anthropic-ratelimit-requests-reset"] == b"1970-01-01T00:00:06Z"
    assert hs[b"anthropic-ratelimit-tokens-limit"] == b"1000"
    assert b"x-ratelimit-limit-requests" not in hs


def test_quota_reserve_settle_and_snapshots() -> None:
    lim = limiter(balance=1000)
    k = key(cap_nano=600)
    assert isinstance(admit(lim, k, reserve=1), Denial)  # a capped key needs its spent snapshot
    lim.apply_key_snapshot(1, 0)
    a = admit(lim, k, reserve=400)
    assert isinstance(a, Lease)
    d = admit(lim, k, reserve=300)  # key cap: 600 - 400 reserved < 300
    assert isinstance(d, Denial) and (d.status, d.code, d.reason) == (402, "insufficient_quota", "key_cap")
    a.release(250, 10)  # actual cost replaces the reservation
    b = admit(lim, k, reserve=300)
    assert isinstance(b, Lease)
    b.release(300, 0)
    assert lim.keys[1].unflushed == 550 and lim.users[7].unflushed == 550
    d = admit(lim, k, reserve=60)
    assert isinstance(d, Denial) and d.reason == "key_cap"
    # The flusher commits; the next snapshot carries it. Available stays exact throughout.
    lim.on_flushed({7: 550}, {1: 550})
    lim.apply_user_snapshot(7, 450)
    lim.apply_key_snapshot(1, 550)
    assert isinstance(admit(lim, k, reserve=50), Lease)
    other = key(id=2)  # no cap: only the balance (450 - 50 reserved) counts
    assert isinstance(admit(lim, other, reserve=400), Lease)
    d = admit(lim, other, reserve=1)
    assert isinstance(d, Denial) and d.reason == "balance"


def test_uncapped_key_spend_stays_counted_when_a_cap_arrives() -> None:
    lim = limiter(balance=1000)
    lim.apply_key_snapshot(1, 0)
    lease = admit(lim, key(), reserve=100)
    assert isinstance(lease, Lease)
    lease.release(100, 0)
    lim.on_flushed({7: 100}, {1: 100})  # the ledger reports every key's spend
    assert lim.keys[1].unflushed == 0
    lim.apply_key_snapshot(1, 100)
    capped = key(cap_nano=150)  # the operator sets a cap: 50 left
    assert isinstance(admit(lim, capped, reserve=51), Denial)
    assert isinstance(admit(lim, capped, reserve=50), Lease)


def test_unknown_balance_needs_loader_or_denies() -> None:
    lim = Limiter(LimitsConfig())
    d = lim.admit(key(), "m", 1, 1, "1.1.1.1", True, 0.0)
    assert isinstance(d, Denial) and d.status == 402

    async def loader(user_id: int, key_id: int) -> tuple[int, int]:
        return 10, 0

    lim = Limiter(LimitsConfig(), loader=loader)
    assert lim.admit(key(), "m", 1, 1, "1.1.1.1", True, 0.0) is None
    asyncio.run(lim.refill(key()))
    assert isinstance(lim.admit(key(), "m", 1, 1, "1.1.1.1", True, 0.0), Lease)


async def test_cap_never_overdrawn_under_500_concurrent_reservations() -> None:
    lim = limiter(balance=10 * USD)
    k = key(cap_nano=1_000_000, concurrency=1000)
    lim.apply_key_snapshot(1, 0)
    spent = 0

    async def one(i: int) -> None:
        nonlocal spent
        lease = admit(lim, k, reserve=7_000 + i)
        if not isinstance(lease, Lease):
            assert isinstance(lease, Denial) and lease.status == 402
            return
        try:
            await asyncio.sleep(0.001 * (i % 5))
        finally:
            cost = (7_000 + i) * (i % 3) // 2  # at or under the reservation
            spent += cost
            lease.release(cost, 1)

    for _ in range(3):
        await asyncio.gather(*(one(i) for i in range(500)))
        assert spent <= 1_000_000
        assert lim.keys[1].reserved == 0 and lim.inflight == 0
    assert lim.keys[1].unflushed == spent


async def test_overrun_bounded_by_in_flight_excess() -> None:
    lim = limiter(balance=1000)
    k = key()
    leases = [admit(lim, k, reserve=100) for _ in range(12)]
    admitted = [x for x in leases if isinstance(x, Lease)]
    assert len(admitted) == 10
    for x in admitted:
        x.release(110, 0)  # each overran its reservation by 10
    assert lim.users[7].unflushed == 1100  # overdraw == the sum of overruns, no more
    assert isinstance(admit(lim, k, reserve=0), Denial)


async def test_cancelled_leases_release_exactly_once() -> None:
    lim = limiter(balance=10**15)
    k = key(concurrency=20_000, cap_nano=10**12)
    lim.apply_key_snapshot(1, 0)

    async def one() -> None:
        lease = admit(lim, k, reserve=1000)
        assert isinstance(lease, Lease)
        try:
            await asyncio.sleep(10)
        finally:
            lease.release(10, 1)
            lease.release(10, 1)  # a second call is a no-op

    tasks = [asyncio.create_task(one()) for _ in range(10_000)]
    await asyncio.sleep(0)
    assert lim.inflight == 10_000
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert lim.inflight == 0 and lim.keys[1].inflight == 0 and lim.users[7].inflight == 0
    assert lim.keys[1].reserved == 0 and lim.users[7].reserved == 0
    assert lim.users[7].unflushed == 10 * 10_000


def test_check_workers() -> None:
    assert check_workers(LimitsConfig(), 1) is None
    msg = check_workers(LimitsConfig(), 4)
    assert msg is not None and "redis_url" in msg
    assert check_workers(dataclasses.replace(LimitsConfig(), redis_url="redis://x"), 4) is None


def test_flushed_spend_still_counts_until_the_next_snapshot() -> None:
    """The worker skips a snapshot read that overlaps a flush; until the next one, what the
    ledger committed must still count against the cap and the balance (it left
    `unflushed`, so it has to land in the local copy of the snapshot)."""
    lim = limiter(balance=50)
    k = key(cap_nano=100)
    lim.apply_key_snapshot(k.id, 0)
    spent = 0
    for _ in range(20):  # sequential requests, each flushed before the next, no snapshot
        lease = admit(lim, k, reserve=10)
        if not isinstance(lease, Lease):
            assert isinstance(lease, Denial) and lease.status == 402
            break
        lease.release(10, 1)
        spent += 10
        lim.on_flushed({k.user_id: 10}, {k.id: 10})
    assert spent == 50  # the balance (50) binds before the cap (100); never more
    # A later snapshot agreeing with Postgres changes nothing.
    lim.apply_user_snapshot(k.user_id, 0)
    lim.apply_key_snapshot(k.id, 50)
    assert isinstance(admit(lim, k, reserve=10), Denial)


def test_near_exhaustion_is_answered_before_anything_is_reserved() -> None:
    # A reservation that fits but would take more than 1/near of what is left is not
    # admitted: relay counts the input exactly and admits again (near=0).
    lim = limiter(balance=80)
    k = key()
    d = lim.admit(k, "gpt-4o-mini", 100, 11, "10.0.0.1", True, lim.clock(), 8)
    assert d is NEAR
    assert lim.users[7].reserved == 0 and lim.users[7].inflight == 0 and lim.inflight == 0
    d = lim.admit(k, "gpt-4o-mini", 100, 10, "10.0.0.1", True, lim.clock(), 8)  # 10*8 <= 80
    assert isinstance(d, Lease)
    d.release(0, 0)
    d = lim.admit(k, "gpt-4o-mini", 100, 11, "10.0.0.1", True, lim.clock(), 0)
    assert isinstance(d, Lease)
    d.release(0, 0)
    # What does not fit at all is still a 402, near or not.
    d = lim.admit(k, "gpt-4o-mini", 100, 81, "10.0.0.1", True, lim.clock(), 8)
    assert isinstance(d, Denial) and d.status == 402


def test_near_exhaustion_of_a_key_cap() -> None:
    lim = limiter(balance=100 * USD)
    lim.apply_key_snapshot(1, 0)
    k = key(cap_nano=800)
    assert lim.admit(k, "gpt-4o-mini", 100, 101, "10.0.0.1", True, lim.clock(), 8) is NEAR
    d = lim.admit(k, "gpt-4o-mini", 100, 100, "10.0.0.1", True, lim.clock(), 8)
    assert isinstance(d, Lease)
    d.release(0, 0)

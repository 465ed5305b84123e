"""Micro-benchmarks of admission: the in-memory path, and request traffic on shared limits.

Run: .venv/bin/python -m bench.micro_limits            # admit+release in memory (goal: < 5 µs)
     .venv/bin/python -m bench.micro_limits --traffic  # limits off / in-process / Redis-shared

`--traffic` drives what relay does per request, without the gateway: two Limiters (two
workers) on one event loop, each request `admit` (on None: `await refill(key)` and admit
again, at most 3 times, then a 429 like relay's), optionally burn `--work-us` of CPU (the
gateway's own work per request), sleep 0.1 ms (uvloop's timers have 1 ms resolution: in
effect one loop iteration), `release`. It
runs c=1 (one sequential loop) and c=64 (64 tasks, alternating workers) against limits off
(no limiter), in-process limiters, and two limiters sharing the real Redis at
127.0.0.1:6379 (a fresh key prefix, deleted afterwards). It reports throughput, CPU per
request, admit latency (p50/p99/max, refills included), how often admit answered None,
how long refills took, 429s, and Redis round trips per request (every command or
pipeline the Redis client sends is one).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from typing import Any

from limits.admission import Lease, Limiter
from limits.keys import KeyState
from relay.config import LimitsConfig

URL = "redis://127.0.0.1:6379/0"
USD = 1_000_000_000
RESERVE = 8_192_120  # what relay reserves for a short chat at $1/$2 per 1M and 4096 max out
COST = 52_000  # a settled short answer
TOKENS = 34


def run(n: int = 200_000, **limits: int) -> float:
    lim = Limiter(LimitsConfig(**limits))
    lim.apply_user_snapshot(7, 10**18)
    lim.apply_key_snapshot(1, 0)
    key = KeyState(
        id=1, user_id=7, name="k", enabled=True, user_enabled=True, expires_at=0.0,
        models=None, group="default", cap_nano=10**17, concurrency=0, rpm=0, tpm=0,
    )
    admit = lim.admit
    clock = lim.clock  # admit's `now` must come from the limiter's clock
    t0 = time.perf_counter()
    for _ in range(n):
        lease = admit(key, "gpt-4o-mini", 100, 5000, "10.0.0.1", True, clock())
        assert isinstance(lease, Lease)
        lease.release(4000, 150)
    return (time.perf_counter() - t0) / n * 1e6


# --- request traffic ----------------------------------------------------------------------


class RoundTrips:
    """Counts what the Redis client sends: one per command or pipeline."""

    n = 0

    @classmethod
    def install(cls) -> None:
        from redis.asyncio.connection import AbstractConnection

        orig = AbstractConnection.send_packed_command
        if getattr(orig, "_counted", False):
            return

        async def counted(self: Any, command: Any, check_health: bool = True) -> None:
            cls.n += 1
            await orig(self, command, check_health)

        counted._counted = True  # type: ignore[attr-defined]
        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


class Stats:
    __slots__ = ("admit_ns", "denied", "nones", "refill_ns", "requests")

    def __init__(self) -> None:
        self.admit_ns: list[int] = []
        self.refill_ns: list[int] = []
        self.nones = 0
        self.denied = 0
        self.requests = 0


def _pct(xs: list[int], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] / 1e6


async def _request(lim: Limiter | None, key: KeyState, st: Stats, hold: float, work_ns: int) -> None:
    pc = time.perf_counter_ns
    t0 = pc()
    lease = None
    if lim is not None:
        for _ in range(3):
            # relay passes wall time as `now`
            r = lim.admit(key, "gpt-4o-mini", 1030, RESERVE, "10.0.0.1", True, time.time())
            if r is None:
                st.nones += 1
                t1 = pc()
                await lim.refill(key)
                st.refill_ns.append(pc() - t1)
                continue
            if isinstance(r, Lease):
                lease = r
            break
        if lease is None:
            st.denied += 1
    st.admit_ns.append(pc() - t0)
    if work_ns:  # the gateway's own CPU per request (parse, route, proxy)
        end = pc() + work_ns
        while pc() < end:
            pass
    await asyncio.sleep(hold)
    if lease is not None:
        lease.release(COST, TOKENS)
    st.requests += 1


async def traffic(mode: str, conc: int, seconds: float, hold: float = 0.0001,
                  work_us: float = 0.0, **cfg: Any) -> dict[str, Any]:
    """One run: mode "off" | "local" | "redis"; `conc` concurrent request loops."""
    prefix = f"tollway-bench-{secrets.token_hex(4)}:"
    key = KeyState(
        id=1, user_id=7, name="k", enabled=True, user_enabled=True, expires_at=0.0,
        models=None, group="default", cap_nano=0, concurrency=0, rpm=0, tpm=0,
    )

    async def loader(user_id: int, key_id: int) -> tuple[int, int]:
        return 100_000 * USD, 0

    lims: list[Limiter | None] = [None]
    if mode != "off":
        config = LimitsConfig(redis_url=URL if mode == "redis" else "",
                              key_concurrency=100_000, **cfg)
        lims = [Limiter(config, workers=2, loader=loader, redis_prefix=prefix) for _ in range(2)]
        for lim in lims:
            assert lim is not None
            await lim.start()
            if mode == "local":
                lim.apply_user_snapshot(7, 100_000 * USD)
    st = Stats()
    stop = False

    async def loop(i: int) -> None:
        lim = lims[i % len(lims)]
        while not stop:
            await _request(lim, key, st, hold, int(work_us * 1000))

    async def phase(dur: float) -> tuple[Stats, float, float, int]:
        nonlocal st, stop
        st = Stats()
        stop = False
        rt0 = RoundTrips.n
        c0, w0 = time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(loop(i)) for i in range(conc)]
        await asyncio.sleep(dur)
        stop = True
        await asyncio.gather(*tasks)
        return st, time.process_time() - c0, time.perf_counter() - w0, RoundTrips.n - rt0

    await phase(0.5)  # warm up: first leases, snapshot seeding
    s, cpu, wall, rts = await phase(seconds)
    for lim in lims:
        if lim is not None:
            await lim.close()
    if mode == "redis":
        import redis.asyncio as aioredis

        r = aioredis.from_url(URL)
        names = [n async for n in r.scan_iter(match=prefix + "*")]
        if names:
            await r.delete(*names)
        await r.aclose()
    n = max(1, s.requests)
    return {
        "mode": mode, "c": conc, "rps": s.requests / wall, "cpu_us": cpu / n * 1e6,
        "p50": _pct(s.admit_ns, 0.5), "p99": _pct(s.admit_ns, 0.99),
        "max": max(s.admit_ns, default=0) / 1e6, "none_pct": 100 * s.nones / n,
        "refills": len(s.refill_ns), "refill_p50": _pct(s.refill_ns, 0.5),
        "refill_max": max(s.refill_ns, default=0) / 1e6, "denied": s.denied, "rt_per_req": rts / n,
    }


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['mode']:5s} c={r['c']:<3d} {r['rps']:8.0f} req/s {r['cpu_us']:6.1f} µs CPU/req  "
        f"admit p50 {r['p50']:.3f} p99 {r['p99']:.3f} max {r['max']:.1f} ms  "
        f"None {r['none_pct']:.2f}% refill p50 {r['refill_p50']:.2f} max {r['refill_max']:.1f} ms  "
        f"429 {r['denied']}  Redis RT/req {r['rt_per_req']:.4f}"
    )


async def traffic_main(seconds: float, modes: list[str], concs: list[int], work_us: float) -> None:
    RoundTrips.install()
    for c in concs:
        for mode in modes:
            print(_row(await traffic(mode, c, seconds, work_us=work_us)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traffic", action="store_true", help="request traffic on shared limits")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--modes", default="off,local,redis")
    ap.add_argument("--conc", default="1,64")
    ap.add_argument("--work-us", type=float, default=0.0,
                    help="busy CPU per request besides admission (the gateway's own: ~130)")
    a = ap.parse_args()
    if a.traffic:
        try:
            import uvloop
        except ImportError:
            runner = asyncio.run
        else:
            runner = uvloop.run
        concs = [int(c) for c in a.conc.split(",")]
        runner(traffic_main(a.seconds, a.modes.split(","), concs, a.work_us))
        return
    cases = {
        "concurrency + quota (defaults)": {},
        "+ key/user RPM and TPM": dict(key_rpm=10**9, key_tpm=10**12, user_rpm=10**9, user_tpm=10**12),
        "+ device cap": dict(key_rpm=10**9, key_tpm=10**12, user_max_ips=5),
    }
    for name, limits in cases.items():
        best = min(run(**limits) for _ in range(3))
        print(f"{name:34s} {best:6.2f} µs per admit+release")


if __name__ == "__main__":
    main()

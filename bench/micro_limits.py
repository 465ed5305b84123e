"""Micro-benchmark: one admit + release on the in-memory path (goal: < 5 µs).

Run: .venv/bin/python -m bench.micro_limits
"""

from __future__ import annotations

import time

from limits.admission import Lease, Limiter
from limits.keys import KeyState
from relay.config import LimitsConfig


def run(n: int = 200_000, **limits: int) -> float:
    lim = Limiter(LimitsConfig(**limits))
    lim.apply_user_snapshot(7, 10**18)
    lim.apply_key_snapshot(1, 0)
    key = KeyState(
        id=1, user_id=7, name="k", enabled=True, user_enabled=True, expires_at=0.0,
        models=None, group="default", cap_nano=10**17, concurrency=0, rpm=0, tpm=0,
    )
    admit = lim.admit
    clock = time.monotonic
    t0 = time.perf_counter()
    for _ in range(n):
        lease = admit(key, "gpt-4o-mini", 100, 5000, "10.0.0.1", True, clock())
        assert isinstance(lease, Lease)
        lease.release(4000, 150)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
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

"""Attempt counters for login, sign-up, reset and verification: per address and per account.

A fixed window per (action, address) and per (action, account): past the limit the
request gets 429 with Retry-After and a generic message that says nothing about whether
the account exists. With `limits.redis_url` set the counters live in Redis (shared by
every worker and host, under the deployment's prefix); else in this process.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

log = logging.getLogger("tollway.console")


class Throttle:
    def __init__(self, per_ip: int, per_account: int, window_s: int, redis_url: str = "",
                 prefix: str = "tollway:") -> None:
        self.per_ip = per_ip
        self.per_account = per_account
        self.window = max(1, window_s)
        self.prefix = prefix
        self.redis: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.local: dict[str, tuple[int, int]] = {}

    async def hit(self, action: str, ip: str, account: str = "") -> int:
        """Count one attempt; 0 when allowed, else the seconds until the window ends."""
        checks = [(f"ip:{action}:{ip}", self.per_ip)]
        if account:
            digest = hashlib.sha256(account.strip().lower().encode()).hexdigest()[:24]
            checks.append((f"acct:{action}:{digest}", self.per_account))
        wait = 0
        for name, limit in checks:
            if limit <= 0:
                continue
            count, left = await self._incr(name)
            if count > limit:
                wait = max(wait, left)
        return wait

    async def _incr(self, name: str) -> tuple[int, int]:
        now = int(time.time())
        start = now - now % self.window
        left = start + self.window - now
        if self.redis is not None:
            key = f"{self.prefix}console:{name}:{start}"
            try:
                pipe = self.redis.pipeline()
                pipe.incr(key)
                pipe.expire(key, self.window + 5)
                count, _ = await pipe.execute()
                return int(count), left
            except Exception as exc:  # Redis down: count here rather than not at all
                log.warning("console throttle: Redis unavailable (%s); counting in-process", exc)
        prior = self.local.get(name)
        count = (prior[1] + 1) if prior is not None and prior[0] == start else 1
        self.local[name] = (start, count)
        if len(self.local) > 100_000:
            self.local = {k: v for k, v in self.local.items() if v[0] == start}
        return count, left

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

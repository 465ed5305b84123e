"""Authentication of an API key or admin token, with failed-attempt throttling that a
valid credential never meets.

The naive throttle (N failures from an address lock the address out) lets anyone lock
everyone out: behind a reverse proxy all clients share one address, and 40 bad keys
from one client refused every valid key for a minute. Here the credential is checked
first, and only failing attempts are throttled: a valid key or admin token is always
admitted, whatever others sent from the same address. Once an address has failed more
than `per_minute` times in its current minute, its further failures answer 429 with
Retry-After instead of 401 (clients back off; operators see it in metrics). Every
route that takes a credential counts here: model routes, /v1/models, the key holder's
views (/v1/me, /v1/usage, /v1/redeem...) and the admin API.

Keys are 128+ random bits, so throttling is not what stops guessing; it bounds the
work a misbehaving client causes and tells it to stop. The address is the one
relay.clientaddr resolved (a trusted proxy's X-Forwarded-For, else the peer).
Memory is bounded; state is per worker.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

from relay import errors as E
from relay.httpserver import Request
from relay.proxy import extract_secret

MISSING = "Missing API key: send Authorization: Bearer sk-... or x-api-key"
WINDOW_S = 60.0
MAX_ADDRESSES = 100_000


class AuthGuard:
    __slots__ = ("_failures", "clock", "per_minute")

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._failures: dict[str, list[float]] = {}  # address -> [window start, count]

    @staticmethod
    def known_key(keys: Any, req: Request) -> Any:
        """The KeyState of a key already in the cache, else None (then `key`): the
        common case without a coroutine."""
        secret = extract_secret(req)
        return keys.lookup(secret) if secret else None

    async def key(self, keys: Any, req: Request) -> Any:
        """The KeyState of the request's API key; InvalidKey or (failing too often) RateLimited."""
        secret = extract_secret(req)
        if secret:
            key = keys.lookup(secret)
            if key is None:
                key = await keys.lookup_slow(secret)
            if key is not None:
                return key
        raise self.failure(req.client_ip, "Invalid API key" if secret else MISSING)

    def admin(self, token: str, req: Request) -> None:
        """Check the admin bearer token; failures count like bad API keys."""
        given = extract_secret(req)
        if given and hmac.compare_digest(given, token.encode()):
            return
        raise self.failure(req.client_ip,
                           "Missing or invalid admin token: send Authorization: Bearer <admin token>")

    def failure(self, ip: str, message: str) -> E.GatewayError:
        """Count one failed attempt from `ip`; the error the client should see."""
        limit = self.per_minute
        if limit:
            now = self.clock()
            entry = self._failures.get(ip)
            if entry is None or now - entry[0] >= WINDOW_S:
                if entry is None and len(self._failures) >= MAX_ADDRESSES:
                    self._failures.clear()  # bounded memory under a spray of addresses
                entry = self._failures[ip] = [now, 0]
            entry[1] += 1
            if entry[1] > limit:
                return E.RateLimited(
                    f"{message}; too many failed authentication attempts from this address",
                    retry_after=max(1.0, entry[0] + WINDOW_S - now))
        return E.InvalidKey(message)

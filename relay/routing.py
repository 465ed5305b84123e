"""Channels and the choice among them: which upstreams serve a model, in what order.

A channel is immutable once built (credential headers and origin precomputed); the
router maps a requested model to its candidate channels, cached per model name, in
priority tiers with weighted random order inside a tier. Channels whose breaker is
open are skipped (until a half-open probe is due). No I/O here.
"""

from __future__ import annotations

import fnmatch
import random
import time
from collections import deque
from collections.abc import Iterable

from relay.config import ChannelConfig
from relay.upstream import Origin


class Breaker:
    """Opens on error *rate* over a sliding window of recent outcomes, not on one error.

    closed ─(≥ min_requests in window and error rate ≥ threshold)─▶ open
    open ─(cooldown elapsed)─▶ half-open: one probe request at a time
    half-open ─success─▶ closed      half-open ─failure─▶ open (cooldown again)
    """

    __slots__ = ("cooldown", "min_requests", "opened_at", "outcomes", "probing", "state", "threshold")

    CLOSED, OPEN, HALF_OPEN = 0, 1, 2

    def __init__(self, window: int = 20, min_requests: int = 5, threshold: float = 0.5,
                 cooldown: float = 10.0) -> None:
        self.outcomes: deque[bool] = deque(maxlen=window)
        self.min_requests = min_requests
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = self.CLOSED
        self.opened_at = 0.0
        self.probing = False

    def available(self, now: float) -> bool:
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and now - self.opened_at >= self.cooldown:
            self.state = self.HALF_OPEN
            self.probing = False
        if self.state == self.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def record(self, ok: bool, now: float) -> None:
        if self.state == self.HALF_OPEN:
            self.probing = False
            if ok:
                self.state = self.CLOSED
                self.outcomes.clear()
            else:
                self.state = self.OPEN
                self.opened_at = now
            return
        self.outcomes.append(ok)
        n = len(self.outcomes)
        if n >= self.min_requests and self.state == self.CLOSED:
            errors = n - sum(self.outcomes)
            if errors / n >= self.threshold:
                self.state = self.OPEN
                self.opened_at = now


class Channel:
    __slots__ = (
        "auth_headers", "breaker", "cfg", "chat_only", "extra_headers", "in_flight", "model_map", "name",
        "origin", "patterns", "protocol", "protocol_id",
    )

    def __init__(self, cfg: ChannelConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.protocol = cfg.protocol
        self.protocol_id = 1 if cfg.protocol == "anthropic" else 0
        self.origin = Origin(cfg.base_url)
        key = cfg.api_key.encode()
        if cfg.protocol == "anthropic":
            self.auth_headers: tuple[tuple[bytes, bytes], ...] = ((b"x-api-key", key),) if key else ()
        else:
            self.auth_headers = ((b"authorization", b"Bearer " + key),) if key else ()
        self.extra_headers = tuple((k.lower().encode(), v.encode()) for k, v in cfg.headers)
        self.model_map = dict(cfg.model_map)
        self.patterns = cfg.models
        self.breaker = Breaker()
        self.in_flight = 0
        self.chat_only = not cfg.responses_api

    def serves(self, model: str) -> bool:
        for p in self.patterns:
            if p == model or p == "*" or fnmatch.fnmatchcase(model, p):
                return True
        return False

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def listed_models(self) -> list[str]:
        """Concrete model names this channel advertises (patterns are not listable)."""
        names = [p for p in self.patterns if not any(c in p for c in "*?[")]
        names.extend(self.model_map)
        return names


class Router:
    def __init__(self, channels: Iterable[ChannelConfig]) -> None:
        self.channels = [Channel(c) for c in channels]
        self._cache: dict[str, list[Channel]] = {}

    def candidates(self, model: str) -> list[Channel]:
        """Channels serving `model`, best tier first, weighted random within a tier."""
        base = self._cache.get(model)
        if base is None:
            base = [c for c in self.channels if c.serves(model)]
            if len(self._cache) < 10_000:
                self._cache[model] = base
        if len(base) <= 1:
            return base
        now = time.monotonic()
        tiers: dict[int, list[Channel]] = {}
        for c in base:
            tiers.setdefault(-c.cfg.priority, []).append(c)
        ordered: list[Channel] = []
        for prio in sorted(tiers):
            tier = tiers[prio]
            weights = [max(c.cfg.weight, 1) for c in tier]
            while tier:
                pick = random.choices(range(len(tier)), weights)[0]
                ordered.append(tier.pop(pick))
                weights.pop(pick)
        usable = [c for c in ordered if c.breaker.available(now)
                  and (c.cfg.max_concurrency == 0 or c.in_flight < c.cfg.max_concurrency)]
        return usable or ordered[:1]

    def known_model(self, model: str) -> bool:
        return bool(self._cache.get(model)) or any(c.serves(model) for c in self.channels)

    def listed_models(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for c in self.channels:
            for m in c.listed_models():
                seen.setdefault(m, c.protocol)
        return sorted(seen.items())

"""Channels and the choice among them: which upstreams serve a model, in what order.

A channel is immutable once built (credential headers and origin precomputed); the
router maps a requested model to its candidate channels, cached per model name, in
priority tiers with weighted random order inside a tier; inside a tier, channels that
speak the client's protocol come before those that need translation (translation drops
provider features), unless the operator mixes them (`upstream.prefer_native = false`).
Channels whose breaker is
open, or that are at their concurrency cap, are skipped (a half-open breaker lets one
probe through). No I/O here; the gateway decides what to retry, this module only
remembers how each channel has been doing.
"""

from __future__ import annotations

import fnmatch
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from relay.config import ChannelConfig
from relay.headers import HeaderPolicy
from relay.upstream import Origin


class Breaker:
    """Opens on error *rate* over a sliding window of recent outcomes, not on one error.

    closed ─(≥ min_requests in the window and error rate ≥ threshold)─▶ open
    open ─(cooldown elapsed)─▶ half-open: one probe request at a time
    half-open ─success─▶ closed      half-open ─failure─▶ open (cooldown again)

    The window is both timed and bounded: outcomes older than `window_s` or beyond the
    newest `max_samples` no longer count, so a burst of errors an hour ago does not keep
    a channel on the edge of opening. A half-open probe slot is taken by `available()`
    but its outcome may never come (the router offered the channel, an earlier candidate
    answered): after `probe_timeout` the slot is offered again, so a channel can never
    be stuck half-open. Time is passed in by the caller (a monotonic clock), which keeps
    the state machine testable with a fake clock and free of I/O.
    """

    __slots__ = ("cooldown", "errors", "last_change", "last_error", "max_samples", "min_requests",
                 "opened_at", "opens", "outcomes", "probe_at", "probe_timeout", "state", "threshold",
                 "window_s")

    CLOSED, OPEN, HALF_OPEN = 0, 1, 2
    NAMES = ("closed", "open", "half_open")

    def __init__(self, window_s: float = 60.0, min_requests: int = 5, threshold: float = 0.5,
                 cooldown: float = 10.0, max_samples: int = 100,
                 probe_timeout: float | None = None) -> None:
        self.window_s = window_s
        self.max_samples = max(1, max_samples)
        self.min_requests = max(1, min_requests)
        self.threshold = threshold
        self.cooldown = cooldown
        self.probe_timeout = cooldown if probe_timeout is None else probe_timeout
        self.outcomes: deque[tuple[float, bool]] = deque()
        self.errors = 0  # failures among `outcomes`, kept in step with it
        self.state = self.CLOSED
        self.opened_at = 0.0
        self.probe_at = 0.0  # when the half-open probe slot was handed out; 0: free
        self.opens = 0  # times this breaker opened (exported as a gauge)
        self.last_change = 0.0
        self.last_error = 0.0

    # --- the state machine ------------------------------------------------------------

    def available(self, now: float) -> bool:
        """May a request go to this channel now? In half-open, True hands out the probe slot."""
        state = self.state
        if state == self.CLOSED:
            return True
        if state == self.OPEN:
            if now - self.opened_at < self.cooldown:
                return False
            self.state = self.HALF_OPEN
            self.last_change = now
            self.probe_at = 0.0
        if self.probe_at == 0.0 or now - self.probe_at >= self.probe_timeout:
            self.probe_at = now or 1e-9  # 0.0 means free
            return True
        return False

    def record(self, ok: bool, now: float) -> None:
        """One finished attempt: ok unless it failed in a way that is the channel's fault."""
        if not ok:
            self.last_error = now
        state = self.state
        if state == self.HALF_OPEN:
            if ok:
                self._close(now)
            else:
                self._open(now)
            return
        if state == self.OPEN:
            return  # an attempt that started before the breaker opened tells nothing new
        out = self.outcomes
        out.append((now, ok))
        if not ok:
            self.errors += 1
        self._prune(now)
        n = len(out)
        if n >= self.min_requests and self.errors >= self.threshold * n:
            self._open(now)

    def reset(self, now: float) -> None:
        """Close by hand (an operator, or an active health check that saw the channel answer)."""
        self._close(now)

    # --- views ------------------------------------------------------------------------

    def error_rate(self, now: float) -> float:
        self._prune(now)
        n = len(self.outcomes)
        return self.errors / n if n else 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        rate = self.error_rate(now)
        retry_in = 0.0
        if self.state == self.OPEN:
            retry_in = max(0.0, self.opened_at + self.cooldown - now)
        return {
            "state": self.NAMES[self.state],
            "window_requests": len(self.outcomes),
            "window_errors": self.errors,
            "error_rate": round(rate, 4),
            "opens": self.opens,
            "seconds_in_state": round(max(0.0, now - self.last_change), 3) if self.last_change else None,
            "probe_in_seconds": round(retry_in, 3),
        }

    # --- internals --------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        out = self.outcomes
        horizon = now - self.window_s
        while out and (len(out) > self.max_samples or out[0][0] < horizon):
            if not out.popleft()[1]:
                self.errors -= 1

    def _open(self, now: float) -> None:
        self.state = self.OPEN
        self.opened_at = now
        self.last_change = now
        self.probe_at = 0.0
        self.opens += 1

    def _close(self, now: float) -> None:
        self.state = self.CLOSED
        self.last_change = now
        self.probe_at = 0.0
        self.outcomes.clear()
        self.errors = 0


class Channel:
    __slots__ = (
        "auth_headers", "breaker", "cfg", "chat_only", "extra_headers", "header_policy", "in_flight",
        "model_map", "name", "origin", "patterns", "protocol", "protocol_id",
    )

    def __init__(self, cfg: ChannelConfig, breaker: Breaker | None = None) -> None:
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
        self.header_policy = HeaderPolicy(cfg.protocol, cfg.anthropic_beta, cfg.forward_headers)
        self.model_map = dict(cfg.model_map)
        self.patterns = cfg.models
        self.breaker = breaker if breaker is not None else Breaker()
        self.in_flight = 0
        self.chat_only = not cfg.responses_api

    def serves(self, model: str) -> bool:
        for p in self.patterns:
            if p == model or p == "*" or fnmatch.fnmatchcase(model, p):
                return True
        return False

    def at_capacity(self) -> bool:
        cap = self.cfg.max_concurrency
        return cap > 0 and self.in_flight >= cap

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def listed_models(self) -> list[str]:
        """Concrete model names this channel advertises (patterns are not listable)."""
        names = [p for p in self.patterns if not any(c in p for c in "*?[")]
        names.extend(self.model_map)
        return names


class Router:
    """Channels by model: priority tiers (higher first), weighted random order in a tier.

    `breaker` builds each channel's Breaker (its settings come from the caller's config);
    `clock` is the monotonic clock breakers are read with; `prefer_native` puts, inside a
    tier, the channels needing no translation first.
    """

    def __init__(self, channels: Iterable[ChannelConfig], *,
                 breaker: Callable[[], Breaker] = Breaker,
                 clock: Callable[[], float] = time.monotonic,
                 prefer_native: bool = True) -> None:
        self.channels = [Channel(c, breaker()) for c in channels]
        self.clock = clock
        self.prefer_native = prefer_native
        self._cache: dict[str, list[Channel]] = {}

    def candidates(self, model: str, last_resort: bool = True, protocol: int = -1,
                   responses: bool = False) -> list[Channel]:
        """Channels serving `model` that may take a request now, best tier first, weighted
        random within a tier, native before translated inside a tier when the client's
        `protocol` (0 OpenAI, 1 Anthropic) is given (`responses`: the client is on
        /v1/responses, which a chat-only OpenAI channel serves by translation); open
        breakers and channels at their concurrency cap are left out. When that leaves none and `last_resort` is set, the best channel is returned
        anyway (a caller that cannot tell "no channel now" from "unknown model" keeps
        working); with `last_resort=False` the answer is empty, and `known_model` tells
        the caller to answer 503 rather than 404."""
        base = self._cache.get(model)
        if base is None:
            base = [c for c in self.channels if c.serves(model)]
            if len(self._cache) < 10_000:
                self._cache[model] = base
        if not base:
            return base
        now = self.clock()
        if len(base) == 1:
            c = base[0]
            if not c.at_capacity() and c.breaker.available(now):
                return base
            return base if last_resort else []
        tiers: dict[int, list[Channel]] = {}
        for c in base:
            tiers.setdefault(-c.cfg.priority, []).append(c)
        ordered: list[Channel] = []
        split = protocol >= 0 and self.prefer_native
        for prio in sorted(tiers):
            if split:
                native: list[Channel] = []
                foreign: list[Channel] = []
                for c in tiers[prio]:
                    ok = c.protocol_id == protocol and not (responses and c.chat_only)
                    (native if ok else foreign).append(c)
                if native and foreign:
                    _weighted(native, ordered)
                    _weighted(foreign, ordered)
                    continue
            _weighted(list(tiers[prio]), ordered)
        # Capacity first: a channel at its cap must not take the half-open probe slot.
        usable = [c for c in ordered if not c.at_capacity() and c.breaker.available(now)]
        if usable or not last_resort:
            return usable
        return ordered[:1]

    def known_model(self, model: str) -> bool:
        return bool(self._cache.get(model)) or any(c.serves(model) for c in self.channels)

    def channel(self, name: str) -> Channel | None:
        for c in self.channels:
            if c.name == name:
                return c
        return None

    def listed_models(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for c in self.channels:
            for m in c.listed_models():
                seen.setdefault(m, c.protocol)
        return sorted(seen.items())

    def status(self) -> dict[str, dict[str, Any]]:
        """Each channel's health for the admin API: breaker state, window, load."""
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for c in self.channels:
            snap = c.breaker.snapshot(now)
            snap["in_flight"] = c.in_flight
            snap["max_concurrency"] = c.cfg.max_concurrency
            snap["priority"] = c.cfg.priority
            snap["weight"] = c.cfg.weight
            snap["protocol"] = c.protocol
            out[c.name] = snap
        return out


def _weighted(tier: list[Channel], out: list[Channel]) -> None:
    """Append `tier` to `out` in weighted random order (consumes `tier`)."""
    weights = [max(c.cfg.weight, 1) for c in tier]
    while tier:
        pick = random.choices(range(len(tier)), weights)[0] if len(tier) > 1 else 0
        out.append(tier.pop(pick))
        weights.pop(pick)


def channel_state(router: Router) -> dict[str, tuple[str, str, str, str, dict[str, float]]]:
    """Each channel's breaker and load as metric families for `Metrics.state` (merged
    across workers: the worst state and error rate, summed opens and in-flight)."""
    now = router.clock()
    state: dict[str, float] = {}
    rate: dict[str, float] = {}
    opens: dict[str, float] = {}
    inflight: dict[str, float] = {}
    for c in router.channels:
        b = c.breaker
        state[c.name] = b.state
        rate[c.name] = b.error_rate(now)
        opens[c.name] = b.opens
        inflight[c.name] = c.in_flight
    return {
        "tollway_channel_state": ("gauge", "Channel breaker state: 0 closed, 1 open, 2 half-open",
                                  "channel", "max", state),
        "tollway_channel_error_rate": ("gauge", "Failed attempts / attempts in the breaker's window",
                                       "channel", "max", rate),
        "tollway_channel_breaker_opens": ("counter", "Times the channel's breaker opened",
                                          "channel", "sum", opens),
        "tollway_channel_in_flight": ("gauge", "Attempts in flight on the channel", "channel",
                                      "sum", inflight),
    }

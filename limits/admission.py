"""Admission: decide, synchronously and without I/O, whether one request may start.

`Limiter.admit` runs on every request. It checks, in order: key enabled, user enabled,
key expiry, plan expiry, model scope, IP allowlist, distinct-IP (device) cap per user,
concurrency, RPM and TPM (per key and per user), then reserves the request's estimated
cost against the key cap and the user balance, or, for a key bound to a subscription
(`KeyState.plan_id`), against the plan's credit: plan first, then (with the
subscription's balance fallback on) the user's balance once the plan cannot cover the
reservation. The lease says which one it drew on (`Lease.plan_id`, 0: the balance);
relay records that on the usage row, so the ledger charges what admission reserved. It answers with a `Lease` (the caller
must `release` it exactly once, on every path) or a `Denial` that relay renders. It never
awaits, never touches Postgres and never raises for a limit. A stream whose upstream
overruns its bound may grow its lease (`Lease.extend`, relay.credit): the same scopes,
the same fit rule, synchronously; a refusal changes nothing and the stream is ended.

Budgets. For a user: available = db_balance - unflushed - reserved; for a key:
cap - db_spent - unflushed - reserved; for a plan (subscription): db_remaining -
unflushed - reserved, where db_remaining is the plan credit left at the snapshot
(`apply_plan_snapshot`; accounting.plans.budgets: the total left, bounded by the
current cycle's periodic credit). `db_*` is the last Postgres snapshot
(`apply_user_snapshot`, `apply_key_snapshot`), `unflushed` is settled here but not yet
committed (`on_flushed` moves it into the snapshot's domain), `reserved` is in flight.
A release replaces the reservation by the actual cost, so spend exceeds a cap or balance
only by what in-flight requests exceed their reservations (never, when the reservation
covers max_tokens).

Rates. RPM is a token bucket (capacity rpm, refill rpm/60 per second, one token per
request). TPM charges SETTLED tokens: a release subtracts its tokens from the bucket,
which may go negative; admission denies only while the bucket is empty or below zero.

Without `redis_url` everything above is exact and in-process; several workers then each
hold the full limits, so `check_workers` refuses that setup. With `redis_url` the same
code runs on capacity leased in blocks from Redis (see `limits.shared` for the scheme,
its over-admission bound and its safe mode). `admit` then returns None when a scope has
no leased capacity yet: the caller awaits `limiter.refill(key)` and admits again.
"""

from __future__ import annotations

import contextvars
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from accounting.money import format_usd
from limits.keys import KeyState

if TYPE_CHECKING:
    from limits.shared import Shared
    from relay.config import LimitsConfig  # config is a plain value object; no runtime import

Headers = tuple[tuple[bytes, bytes], ...]
# A loader returns (user balance, key spent) in nano-USD from the system of record.
Loader = Callable[[int, int], Awaitable[tuple[int, int]]]
# A plan loader returns a subscription's remaining plan credit in nano-USD.
PlanLoader = Callable[[int], Awaitable[int]]

_INF = math.inf
_CONC_RETRY_S = 1.0  # no natural clock for a slot to free; a short, honest hint
# Outcomes of Limiter._fits.
_FITS, _SHORT, _REFILL, _DEGRADED, _UNKNOWN, _NEAR = 1, 0, -1, -2, -3, 2
# What `Limiter.admit(..., near=)` answers when a reservation would take a large share
# of what is left: count the input exactly, then admit again.
NEAR = object()
# Set by `refill` in the awaiting request's context, read (and cleared) by its next
# `admit`: a request that waited for a sync may take the slots and money that sync got
# for the waiters; a request arriving meanwhile may not (it would take them and send the
# waiter to another round, again and again while capacity is tight).
_WAITED: contextvars.ContextVar[bool] = contextvars.ContextVar("tollway_limits_waited", default=False)


def check_workers(cfg: LimitsConfig, workers: int) -> str | None:
    """The error message that must stop the gateway, or None when the setup is sound."""
    if workers > 1 and not cfg.redis_url:
        return (
            f"server.workers = {workers} needs limits.redis_url: without shared limit state "
            "every worker would enforce the full limits and balances on its own"
        )
    return None


# --- decisions ------------------------------------------------------------------------


def _duration(seconds: float) -> bytes:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return b"%dms" % max(0, round(seconds * 1000))
    if seconds < 60:
        return (b"%.3f" % seconds).rstrip(b"0").rstrip(b".") + b"s"
    m, s = divmod(int(seconds + 0.5), 60)
    return b"%dm%ds" % (m, s)


def _parse_duration(v: bytes) -> float:
    if v.endswith(b"ms"):
        return float(v[:-2]) / 1000
    m, _, s = v.partition(b"m")
    if not _:
        return float(v.rstrip(b"s"))
    return int(m) * 60 + float(s.rstrip(b"s") or 0)


def _rate_headers(
    lim_r: int, rem_r: int, reset_r: float, lim_t: int, rem_t: int, reset_t: float
) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if lim_r:
        out += [
            (b"x-ratelimit-limit-requests", b"%d" % lim_r),
            (b"x-ratelimit-remaining-requests", b"%d" % rem_r),
            (b"x-ratelimit-reset-requests", _duration(reset_r)),
        ]
    if lim_t:
        out += [
            (b"x-ratelimit-limit-tokens", b"%d" % lim_t),
            (b"x-ratelimit-remaining-tokens", b"%d" % rem_t),
            (b"x-ratelimit-reset-tokens", _duration(reset_t)),
        ]
    return out


_ANTHROPIC_NAMES = {
    b"x-ratelimit-limit-requests": b"anthropic-ratelimit-requests-limit",
    b"x-ratelimit-remaining-requests": b"anthropic-ratelimit-requests-remaining",
    b"x-ratelimit-reset-requests": b"anthropic-ratelimit-requests-reset",
    b"x-ratelimit-limit-tokens": b"anthropic-ratelimit-tokens-limit",
    b"x-ratelimit-remaining-tokens": b"anthropic-ratelimit-tokens-remaining",
    b"x-ratelimit-reset-tokens": b"anthropic-ratelimit-tokens-reset",
}


def anthropic_headers(headers: Headers, wall_now: float | None = None) -> Headers:
    """The same rate-limit headers in Anthropic naming; resets become RFC 3339 instants."""
    now = time.time() if wall_now is None else wall_now
    out = []
    for name, value in headers:
        new = _ANTHROPIC_NAMES.get(name)
        if new is None:
            out.append((name, value))  # retry-after and friends are shared by both
        elif new.endswith(b"-reset"):
            at = datetime.fromtimestamp(now + _parse_duration(value), UTC)
            out.append((new, at.strftime("%Y-%m-%dT%H:%M:%SZ").encode()))
        else:
            out.append((new, value))
    return tuple(out)


class Denial:
    """A refusal that relay renders in the route's protocol (status, code, message)."""

    __slots__ = ("code", "headers", "message", "reason", "retry_after", "status")

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float = 0.0,
        headers: Headers = (),
        reason: str = "",
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = headers
        self.reason = reason or code  # metrics label, e.g. "rpm", "key_disabled"

    def __repr__(self) -> str:
        return f"Denial({self.status}, {self.code!r}, {self.message!r}, {self.retry_after:.3f})"


def _rate_denial(
    reason: str, message: str, retry: float, rate: tuple[int, int, float, int, int, float]
) -> Denial:
    hs = _rate_headers(*rate)
    hs.append((b"retry-after", b"%d" % max(1, math.ceil(retry))))
    return Denial(429, "rate_limit_exceeded", message, retry, tuple(hs), reason)


# --- per-scope state ---------------------------------------------------------------------


class Scope:
    """Counters of one key or one user. Mutated only on the event loop, never awaited over."""

    __slots__ = (
        "blk",
        "cdeny",
        "cdeny_until",
        "chold",
        "conc_held",
        "cwait",
        "db",
        "debt",
        "demand_until",
        "flushed",
        "held",
        "hold_until",
        "id",
        "inflight",
        "ips",
        "kind",
        "ks",
        "last_reserve",
        "lc",
        "limit",
        "lr",
        "lt",
        "mhold",
        "money",
        "money_empty_until",
        "mwait",
        "nextfill",
        "owner",
        "quota_v",
        "refill_at",
        "reserved",
        "rleft",
        "rpm_empty_until",
        "rt",
        "rts",
        "short_since",
        "tcap",
        "touched",
        "transient",
        "tt",
        "tts",
        "unflushed",
    )

    def __init__(self, kind: str, id: int, now: float) -> None:
        self.kind = kind  # "k" (key), "u" (user) or "p" (plan: a subscription)
        self.id = id
        self.inflight = 0
        self.rt = _INF  # RPM tokens (a full bucket until the limit is known)
        self.rts = now
        self.tt = _INF  # TPM level
        self.tcap = 0.0  # TPM bucket capacity at the last admission (0: no TPM limit)
        self.tts = now
        self.db: int | None = None  # user: balance; key: -spent; plan: remaining (None: unknown)
        self.limit = 0  # key: cap (0 for users) so that available = limit + db - ...
        self.unflushed = 0
        self.reserved = 0
        self.ips: dict[str, float] = {}
        self.touched = now
        # shared mode only (limits.shared)
        self.conc_held = 0  # concurrency slots leased from Redis
        self.held = 0  # money leased from Redis and not yet spent
        self.debt = 0  # settled tokens not yet debited in Redis
        self.flushed: list[tuple[float, int]] = []  # (commit wall time, amount) not yet in a snapshot
        self.quota_v = 0.0
        self.last_reserve = 0
        self.rleft = -1  # last seen global RPM bucket level (-1: unknown)
        self.lc = self.lr = self.lt = 0  # limits as last seen, for the background sync
        self.money = False  # budget leased for this scope
        self.owner = 0  # a key scope's user id
        # Waiters a sync found the limit full for (every slot in use on every worker):
        # that many admissions are denied, no more (a slot freed anywhere is not seen
        # here without asking Redis).
        self.cdeny = 0
        self.cdeny_until = 0.0
        self.rpm_empty_until = 0.0
        self.money_empty_until = 0.0
        self.blk = 1  # lease block multiplier: doubles while the scope refills often
        self.refill_at = 0.0  # when the scope was last topped up
        self.nextfill = 0.0  # no prefetch before this (Redis had less than asked)
        self.ks: KeyState | None = None  # key state its shared limits were taken from
        self.cwait = 0  # admissions that waited for a slot since the last sync
        self.mwait = 0  # their reservations (nano-USD), when money was what they lacked
        self.demand_until = 0.0  # some worker waits on this scope: hold no more than needed
        self.transient = False  # last sync was short, but other workers may hand back
        self.short_since = 0  # Redis ms its waiters have been short since (0: they are not)
        # Waiters a sync has just served, until they admit (or hold_until passes).
        self.chold = 0
        self.mhold = 0
        self.hold_until = 0.0


class Lease:
    """An admitted request's claim on concurrency and quota. Release exactly once."""

    __slots__ = (
        "_k",
        "_limiter",
        "_m",
        "_u",
        "lim_r",
        "lim_t",
        "plan_id",
        "rem_r",
        "rem_t",
        "reserve",
        "reset_r",
        "reset_t",
    )

    def __init__(
        self, limiter: Limiter, k: Scope, u: Scope, reserve: int,
        rate: tuple[int, int, float, int, int, float], m: Scope | None = None,
    ) -> None:
        self._limiter: Limiter | None = limiter
        self._k = k
        self._u = u
        self._m = u if m is None else m  # the money scope: the user's balance or a plan
        # The subscription the request draws on (0: the balance): the usage row's plan_id.
        self.plan_id = m.id if m is not None and m.kind == "p" else 0
        self.reserve = reserve
        self.lim_r, self.rem_r, self.reset_r, self.lim_t, self.rem_t, self.reset_t = rate

    @property
    def released(self) -> bool:
        return self._limiter is None

    @property
    def headers(self) -> Headers:
        """Rate-limit headers (OpenAI naming) to attach to the successful response."""
        if not (self.lim_r or self.lim_t):
            return ()  # no RPM or TPM limit applies: nothing to say
        return tuple(
            _rate_headers(self.lim_r, self.rem_r, self.reset_r, self.lim_t, self.rem_t, self.reset_t)
        )

    def extend(self, extra_nano: int) -> bool:
        """Reserve `extra_nano` more for this request, or refuse: a stream that reached
        its reservation (relay.credit). Synchronous, no I/O, never waits for a refill.

        The same scopes the admission drew on (the key cap when it reserved against it,
        and the money scope: the plan or the balance, never the other one) and the same
        fit rule (`Limiter._fits`; with shared limits only the slice this worker holds).
        On success `reserve` grows, its sign kept, so `release` and settlement's cap see
        the larger reservation; on refusal nothing changes. A released lease refuses.
        """
        limiter = self._limiter
        if limiter is None or extra_nano < 0:
            return False
        return limiter._extend(self, extra_nano)

    def release(self, cost_nano: int, tokens: int) -> None:
        """Free the slot, replace the reservation by the actual cost, charge tokens to TPM.

        Idempotent: only the first call counts, so relay may call it on every path.
        """
        limiter = self._limiter
        if limiter is None:
            return
        self._limiter = None
        limiter._release(self._k, self._u, self._m, self.reserve, cost_nano, tokens)


# --- the limiter -------------------------------------------------------------------------


class Limiter:
    """Admission for one worker. In-process and exact, or leasing from Redis (`start`)."""

    def __init__(
        self,
        cfg: LimitsConfig,
        # The clock of `admit`'s `now`: relay passes time.time(), and the background
        # leasing compares its own readings with the `now` admissions stored.
        clock: Callable[[], float] = time.time,
        *,
        workers: int = 1,
        loader: Loader | None = None,
        plan_loader: PlanLoader | None = None,
        redis_prefix: str = "tollway:",
        lease_ttl_s: float = 10.0,
        sync_interval_s: float = 0.05,
        heartbeat_s: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.loader = loader
        self.plan_loader = plan_loader
        # Safe mode divides shared limits by the number of workers that may enforce them.
        self.peers = max(1, workers)
        self.keys: dict[int, Scope] = {}
        self.users: dict[int, Scope] = {}
        self.plans: dict[int, Scope] = {}  # by subscription id
        self.denials: dict[str, int] = {}
        self.inflight = 0
        self.degraded = False  # Redis configured but unreachable: safe mode
        self._cidrs: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self._ip_ok: dict[tuple[tuple[str, ...], str], bool] = {}
        self.shared: Shared | None = None
        if cfg.redis_url:
            from limits.shared import Shared

            self.shared = Shared(self, cfg.redis_url, redis_prefix, lease_ttl_s, sync_interval_s,
                                 heartbeat_s)

    # -- lifecycle (shared mode) --

    async def start(self) -> None:
        """Connect to Redis and start the background block refiller (no-op in-process)."""
        if self.shared is not None:
            await self.shared.start()

    async def close(self) -> None:
        """Return leased capacity to Redis and stop the background task."""
        if self.shared is not None:
            await self.shared.close()

    async def refill(self, key: KeyState) -> None:
        """Make `admit` decidable for this key: load budgets, lease blocks from Redis.

        Await it directly in the request's own task (not through a new task, as
        `asyncio.wait_for` makes on 3.11): it marks that task's next `admit` as one that
        waited, which may take what the sync got for the waiters (see `_WAITED`).
        """
        now = self.clock()
        k = self._scope(self.keys, "k", key.id, now)
        u = self._scope(self.users, "u", key.user_id, now)
        if (u.db is None or (key.cap_nano and k.db is None)) and self.loader is not None:
            balance, spent = await self.loader(key.user_id, key.id)
            if u.db is None:
                self.apply_user_snapshot(key.user_id, balance)
            if k.db is None:
                self.apply_key_snapshot(key.id, spent)
        p = None
        if key.plan_id:
            p = self._scope(self.plans, "p", key.plan_id, now)
            if p.db is None and self.plan_loader is not None:
                remaining = await self.plan_loader(key.plan_id)
                if p.db is None:
                    self.apply_plan_snapshot(key.plan_id, remaining)
        if self.shared is not None:
            await self.shared.refill_now(key, k, u, p)
            _WAITED.set(True)

    # -- snapshots from the system of record --

    def apply_user_snapshot(self, user_id: int, balance_nano: int, as_of: float | None = None) -> None:
        """Latest balance read from Postgres. `as_of`: wall time taken BEFORE the read."""
        s = self._scope(self.users, "u", user_id, self.clock())
        s.db = balance_nano
        if self.shared is not None:
            self.shared.snapshot(s, time.time() if as_of is None else as_of)

    def apply_key_snapshot(self, key_id: int, spent_nano: int, as_of: float | None = None) -> None:
        """Latest spent total of a key read from Postgres (see apply_user_snapshot)."""
        s = self._scope(self.keys, "k", key_id, self.clock())
        s.db = -spent_nano
        if self.shared is not None:
            self.shared.snapshot(s, time.time() if as_of is None else as_of)

    def apply_plan_snapshot(self, sub_id: int, remaining_nano: int, as_of: float | None = None) -> None:
        """Latest remaining plan credit of a subscription (see apply_user_snapshot)."""
        s = self._scope(self.plans, "p", sub_id, self.clock())
        s.db = remaining_nano
        if self.shared is not None:
            self.shared.snapshot(s, time.time() if as_of is None else as_of)

    def on_plan_flushed(self, plan_deltas: dict[int, int], committed_at: float | None = None) -> None:
        """The ledger committed these plan rows' costs (by subscription id)."""
        self.on_flushed({}, {}, committed_at, plan_deltas)

    def on_flushed(
        self, user_deltas: dict[int, int], key_deltas: dict[int, int], committed_at: float | None = None,
        plan_deltas: dict[int, int] | None = None,
    ) -> None:
        """The ledger committed these costs: they now live in the next snapshot, not here."""
        at = time.time() if committed_at is None else committed_at
        for table, deltas in ((self.users, user_deltas), (self.keys, key_deltas),
                              (self.plans, plan_deltas or {})):
            for sid, delta in deltas.items():
                s = table.get(sid)
                if s is None:
                    continue
                s.unflushed -= delta
                if self.shared is None and s.db is not None:
                    # The committed amount is now in Postgres; until the next snapshot
                    # (which the worker skips when it overlaps a flush) the local copy of
                    # the balance, -spent or remaining credit carries it, or the
                    # limiter would count it neither as unflushed nor as spent.
                    s.db -= delta
                if self.shared is not None:
                    # Until a snapshot newer than this commit reaches Redis, the amount stays
                    # claimed by this worker, so no other worker can spend it twice.
                    s.flushed.append((at, delta))

    # -- stats --

    def stats(self) -> dict[str, Any]:
        """For /metrics: denials by reason, in-flight leases, leased blocks (shared mode)."""
        out: dict[str, Any] = {
            "denials": dict(self.denials),
            "inflight": self.inflight,
            "degraded": self.degraded,
        }
        if self.shared is not None:
            out.update(self.shared.stats())
        return out

    # -- the hot path --

    def _scope(self, table: dict[int, Scope], kind: str, sid: int, now: float) -> Scope:
        s = table.get(sid)
        if s is None:
            s = table[sid] = Scope(kind, sid, now)
        return s

    def _deny(self, d: Denial) -> Denial:
        self.denials[d.reason] = self.denials.get(d.reason, 0) + 1
        return d

    def _ip_allowed(self, cidrs: tuple[str, ...], ip: str) -> bool:
        ok = self._ip_ok.get((cidrs, ip))
        if ok is not None:
            return ok
        nets = self._cidrs.get(cidrs)
        if nets is None:
            nets = self._cidrs[cidrs] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            ok = False
        else:
            ok = any(addr in n for n in nets if n.version == addr.version)
        if len(self._ip_ok) > 65536:
            self._ip_ok.clear()
        self._ip_ok[(cidrs, ip)] = ok
        return ok

    def admit(
        self,
        key: KeyState,
        model: str,
        est_tokens: int,
        reserve_nano: int,
        client_ip: str,
        model_allowed: bool,
        now: float,
        near: int = 0,
    ) -> Lease | Denial | object | None:
        """Lease on admission, Denial otherwise; None: `await refill(key)` then admit again.

        `near`: when the reservation fits but takes more than 1/`near` of what a money
        scope (key cap, balance or plan) has left, admit nothing and return NEAR: relay
        counts the input exactly and admits again with the tighter reservation (and
        `near` 0). Asked here, where the scopes are at hand, rather than in a second
        call before every admission."""
        if not key.enabled:
            return self._deny(Denial(401, "invalid_api_key", "key disabled", reason="key_disabled"))
        if not key.user_enabled:
            return self._deny(Denial(401, "invalid_api_key", "user disabled", reason="user_disabled"))
        if key.expires_at and key.expires_at <= time.time():
            return self._deny(Denial(401, "invalid_api_key", "key expired", reason="key_expired"))
        if key.plan_expires_at and key.plan_expires_at <= time.time():
            return self._deny(Denial(401, "invalid_api_key", "plan expired", reason="plan_expired"))
        if not model_allowed:
            return self._deny(Denial(
                403, "model_not_allowed", f"model {model!r} is not allowed for this key",
                reason="model_not_allowed",
            ))
        if key.allowed_cidrs and not self._ip_allowed(key.allowed_cidrs, client_ip):
            return self._deny(Denial(
                403, "ip_not_allowed", "client IP is not in this key's allowlist",
                reason="ip_not_allowed",
            ))
        cfg = self.cfg
        keys = self.keys
        k = keys.get(key.id)
        if k is None:
            k = keys[key.id] = Scope("k", key.id, now)
        users = self.users
        u = users.get(key.user_id)
        if u is None:
            u = users[key.user_id] = Scope("u", key.user_id, now)
        k.touched = u.touched = now

        # Distinct client IPs per user (device cap), sliding window.
        max_ips = cfg.user_max_ips
        if max_ips:
            ips = u.ips
            if client_ip not in ips and len(ips) >= max_ips:
                horizon = now - cfg.user_ip_window_s
                for ip in [ip for ip, seen in ips.items() if seen <= horizon]:
                    del ips[ip]
                if len(ips) >= max_ips:
                    oldest = min(ips.values())
                    return self._deny(Denial(
                        403, "ip_limit_exceeded",
                        f"device/IP limit reached: at most {max_ips} distinct client IPs per "
                        f"account within {cfg.user_ip_window_s} s",
                        oldest + cfg.user_ip_window_s - now, reason="ip_limit",
                    ))
            ips[client_ip] = now

        shared = self.shared
        leased = shared is not None and not self.degraded
        div = self.peers if self.degraded else 1

        # Concurrency.
        kc = (key.concurrency or cfg.key_concurrency) // div or 1
        uc = cfg.user_concurrency and (cfg.user_concurrency // div or 1)
        if k.inflight >= kc or (uc and u.inflight >= uc):
            which = "key" if k.inflight >= kc else "account"
            return self._deny(_rate_denial(
                "concurrency", f"{which} concurrency limit reached", _CONC_RETRY_S,
                (0, 0, 0.0, 0, 0, 0.0),
            ))
        # Shared mode: a scope with nothing leased yet makes the answer None, but only after
        # every other check, so that one refill learns all this request needs (relay
        # admits at most three times).
        pending = False
        kwait = uwait = waited = False
        if leased:
            waited = _WAITED.get()
            if waited:
                _WAITED.set(False)
            if waited or now >= k.hold_until:
                kwait = k.conc_held <= k.inflight
            else:
                kwait = k.conc_held - k.chold <= k.inflight
            if waited or now >= u.hold_until:
                uwait = bool(uc) and u.conc_held <= u.inflight
            else:
                uwait = bool(uc) and u.conc_held - u.chold <= u.inflight
            if kwait or uwait:
                kd = kwait and k.cdeny > 0 and now < k.cdeny_until
                ud = uwait and u.cdeny > 0 and now < u.cdeny_until
                if kd or ud:
                    if kd:
                        k.cdeny -= 1
                    if ud:
                        u.cdeny -= 1
                    return self._deny(_rate_denial(
                        "concurrency", "concurrency limit reached", _CONC_RETRY_S,
                        (0, 0, 0.0, 0, 0, 0.0),
                    ))
                pending = True

        # RPM (bucket state is committed only once every check has passed).
        krpm = key.rpm or cfg.key_rpm
        urpm = cfg.user_rpm
        ktok = utok = 0.0
        lim_r = rem_r = 0
        reset_r = 0.0
        for s, rpm in ((k, krpm), (u, urpm)) if krpm or urpm else ():
            if not rpm:
                continue
            if leased:
                tokens = s.rt
                if tokens == _INF:
                    tokens = s.rt = 0
                if tokens < 1:
                    if now < s.rpm_empty_until:
                        return self._deny(_rate_denial(
                            "rpm", f"{'key' if s is k else 'account'} requests-per-minute limit reached",
                            s.rpm_empty_until - now, (rpm, 0, s.rpm_empty_until - now, 0, 0, 0.0),
                        ))
                    pending = True
                    continue
                left = int(tokens - 1) + max(s.rleft, 0)
                rate = rpm / 60
            else:
                cap = rpm / div
                rate = cap / 60
                tokens = s.rt + (now - s.rts) * rate
                if tokens > cap:
                    tokens = cap
                if tokens < 1:
                    retry = (1 - tokens) / rate
                    return self._deny(_rate_denial(
                        "rpm", f"{'key' if s is k else 'account'} requests-per-minute limit reached",
                        retry, (rpm, 0, (cap - tokens) / rate, 0, 0, 0.0),
                    ))
                left = int(tokens - 1)
            if s is k:
                ktok = tokens
            else:
                utok = tokens
            if not lim_r or left < rem_r:
                lim_r, rem_r, reset_r = rpm, left, (rpm - left) / rate

        # TPM: deny only while the settled-token bucket is already empty.
        ktpm = key.tpm or cfg.key_tpm
        utpm = cfg.user_tpm
        klev = ulev = 0.0
        lim_t = rem_t = 0
        reset_t = 0.0
        for s, tpm in ((k, ktpm), (u, utpm)) if ktpm or utpm else ():
            if not tpm:
                continue
            cap = tpm / div
            rate = cap / 60
            level = s.tt + (now - s.tts) * rate
            if level > cap:
                level = cap
            if level <= 0:
                retry = -level / rate + 1 / rate
                return self._deny(_rate_denial(
                    "tpm", f"{'key' if s is k else 'account'} tokens-per-minute limit reached",
                    retry, (lim_r, rem_r, reset_r, tpm, 0, (cap - level) / rate),
                ))
            s.tcap = cap
            if s is k:
                klev = level
            else:
                ulev = level
            if not lim_t or level < rem_t:
                lim_t, rem_t, reset_t = tpm, int(level), (cap - level) / rate

        # Quota: the reservation must fit the key cap and the money scope: the plan's
        # credit for a key bound to a subscription (else, with fallback, the balance),
        # the user's balance for any other key.
        cap_nano = key.cap_nano
        k.limit = cap_nano
        m = u
        short: list[Scope] = []  # money scopes this admission waits on (shared mode)
        if key.plan_id:
            p = self.plans.get(key.plan_id)
            if p is None:
                p = self.plans[key.plan_id] = Scope("p", key.plan_id, now)
            p.touched = now
            fit = self._fits(p, reserve_nano, now, waited)
            if fit == _FITS:
                m = p
            elif fit == _SHORT:
                if not key.plan_fallback:
                    return self._deny(Denial(402, "insufficient_quota", "plan credit exhausted",
                                             reason="plan_credit"))
            elif fit == _REFILL:
                pending = True
                short.append(p)
                m = p
            else:
                return self._undecided(fit, "plan credit not loaded yet")
        close = False  # near exhaustion in some scope (`near`)
        for s in ((k, m) if cap_nano else (m,)):
            fit = self._fits(s, reserve_nano, now, waited, near)
            if fit == _FITS:
                continue
            if fit == _NEAR:
                close = True
            elif fit == _SHORT:
                if s is m and m is not u:
                    return self._deny(Denial(402, "insufficient_quota", "plan credit exhausted"
                                             + self._amounts(s, reserve_nano), reason="plan_credit"))
                return self._quota_denial(s is k, s, reserve_nano)
            elif fit == _REFILL:
                pending = True
                if s not in short:
                    short.append(s)
            else:
                return self._undecided(fit, "balance not loaded yet")
        if pending:
            # What this admission waits for, so that the next sync asks for all waiters.
            if kwait:
                k.cwait += 1
            if uwait:
                u.cwait += 1
            for s in short:
                s.mwait += reserve_nano
            return None
        if close:
            return NEAR

        # Commit.
        if krpm:
            k.rt = ktok - 1
            k.rts = now
        if urpm:
            u.rt = utok - 1
            u.rts = now
        if ktpm:
            k.tt = klev
            k.tts = now
        if utpm:
            u.tt = ulev
            u.tts = now
        k.inflight += 1
        u.inflight += 1
        if cap_nano:
            k.reserved += reserve_nano
        m.reserved += reserve_nano
        self.inflight += 1
        if shared is not None:
            if waited:  # it took what a sync held for the waiters
                if k.chold:
                    k.chold -= 1
                if u.chold:
                    u.chold -= 1
                if m.mhold:
                    m.mhold = max(0, m.mhold - reserve_nano)
                if cap_nano and k.mhold:
                    k.mhold = max(0, k.mhold - reserve_nano)
            shared.after_admit(key, k, u, m)
        return Lease(self, k, u, reserve_nano if cap_nano else -reserve_nano,
                     (lim_r, rem_r, reset_r, lim_t, rem_t, reset_t), m)

    def headroom(self, key: KeyState) -> int | None:
        """What this worker could still reserve for `key` (key cap and money scope), as
        it last knew; None when a scope is not loaded yet. Read only: relay uses it to
        decide whether a request is near exhaustion and worth counting exactly."""
        scopes: list[Scope | None] = [self.plans.get(key.plan_id) if key.plan_id
                                      else self.users.get(key.user_id)]
        if key.cap_nano:
            scopes.append(self.keys.get(key.id))
        least: int | None = None
        for s in scopes:
            if s is None:
                return None
            if self.shared is not None:
                avail = s.held - s.reserved
            elif s.db is None:
                return None
            else:
                avail = s.limit + s.db - s.unflushed - s.reserved
            if least is None or avail < least:
                least = avail
        return least

    def _fits(self, s: Scope, reserve: int, now: float, waited: bool = False, near: int = 0) -> int:
        """Whether `reserve` fits the money scope `s` (_FITS, _SHORT; _NEAR: fits, but
        takes more than 1/`near` of what is left), or why that is not known yet
        (_REFILL: await refill; _DEGRADED: Redis away; _UNKNOWN: no snapshot)."""
        if self.shared is not None:
            # Leased budget only; in safe mode no new slice can be had.
            avail = s.held - s.reserved
            if not waited and now < s.hold_until:
                avail -= s.mhold  # got for requests that waited: theirs first
            if reserve <= avail and avail > 0:
                return _NEAR if near and reserve * near > avail else _FITS
            s.last_reserve = reserve
            if self.degraded:
                return _DEGRADED
            return _SHORT if now < s.money_empty_until else _REFILL
        db = s.db
        if db is None:
            has_loader = self.plan_loader if s.kind == "p" else self.loader
            return _REFILL if has_loader is not None else _UNKNOWN
        avail = s.limit + db - s.unflushed - s.reserved
        if reserve <= avail and avail > 0:
            return _NEAR if near and reserve * near > avail else _FITS
        return _SHORT

    def _undecided(self, fit: int, unknown: str) -> Denial | None:
        if fit == _REFILL:
            return None
        if fit == _DEGRADED:
            return self._deny(Denial(
                429, "rate_limit_exceeded", "quota check temporarily unavailable; retry shortly", 1.0,
                ((b"retry-after", b"1"),), reason="quota_degraded",
            ))
        return self._deny(Denial(402, "insufficient_quota", unknown, 1.0,
                                 ((b"retry-after", b"1"),), reason="quota_unknown"))

    def _quota_denial(self, is_key: bool, s: Scope | None = None, need: int = 0) -> Denial:
        msg = "key spending cap reached" if is_key else "insufficient balance"
        if s is not None:
            msg += self._amounts(s, need)
        return self._deny(Denial(402, "insufficient_quota", msg, reason="key_cap" if is_key else "balance"))

    def _amounts(self, s: Scope, need: int) -> str:
        """What a 402 tells the client: the reservation and what the scope has left for
        it (with shared limits: what this worker holds, the rest being spent per Redis)."""
        if self.shared is not None or s.db is None:
            avail = s.held - s.reserved
            if s.mhold and self.clock() < s.hold_until:
                avail -= s.mhold  # got for requests that waited and are about to take it
        else:
            avail = s.limit + s.db - s.unflushed - s.reserved
        return (f": this request needs up to {format_usd(need)} USD (its input and max output"
                f" tokens at the model's price), {format_usd(max(0, avail))} USD available")

    def _extend(self, lease: Lease, extra: int) -> bool:
        k, m, reserve = lease._k, lease._m, lease.reserve
        # A negative reserve held nothing against the key cap. Zero says nothing (a free
        # model): the key's cap as last admitted decides, and `_release` undoes either.
        capped = reserve > 0 or (reserve == 0 and k.limit > 0)
        now = self.clock()
        for s in ((k, m) if capped else (m,)):
            if self._fits(s, extra, now) != _FITS:
                if self.shared is not None:
                    # This worker's slice was short (Redis may hold more): have it topped
                    # up, sized for this request (_fits noted it), for the stream's retry.
                    self.shared.after_extend(k, m, capped)
                return False
        if capped:
            k.reserved += extra
            lease.reserve = reserve + extra
        else:
            lease.reserve = reserve - extra
        m.reserved += extra
        if self.shared is not None:
            self.shared.after_extend(k, m, capped)
        return True

    def _release(self, k: Scope, u: Scope, m: Scope, reserve: int, cost: int, tokens: int) -> None:
        # A negative reserve marks a lease that reserved nothing against the key cap.
        # `m` is the money scope the lease drew on: the user's balance or a plan.
        k.inflight -= 1
        u.inflight -= 1
        self.inflight -= 1
        # The ledger reports every key's spend (on_flushed), capped or not: count it here
        # too, so that a key's unflushed never goes below zero.
        k.unflushed += cost
        if reserve >= 0:
            k.reserved -= reserve
            k.held -= cost
        else:
            reserve = -reserve
        m.reserved -= reserve
        m.unflushed += cost
        m.held -= cost
        shared = self.shared is not None
        if tokens:
            now = self.clock()
            for s in (k, u):
                cap = s.tcap
                if cap:
                    level = s.tt + (now - s.tts) * cap / 60
                    s.tt = (cap if level > cap else level) - tokens
                    s.tts = now
                if shared and s.lt:
                    s.debt += tokens
        if self.shared is not None:
            self.shared.after_release(k, u, m)

"""Shared limit state across workers and hosts: capacity leased from Redis in blocks.

The problem: concurrency, RPM, TPM and budgets must hold across every worker, yet the
request path may not wait on Redis. The naive answer (one Redis round trip per request)
costs a network hop per admission. The chosen one: each worker leases capacity for a
scope (one key or one user) in blocks of `limits.lease_block` units and admits locally
from what it holds; this module refills in the background ahead of exhaustion, returns
what a worker does not need, and renews its leases. It never decides admission itself.

One Redis hash per scope (`<prefix>s:k<id>` / `<prefix>s:u<id>`), changed only by atomic
Lua scripts that read Redis' own clock:
- concurrency: field `c:<worker>` = slots that worker holds; a grant never lets the sum
  exceed the limit. `x:<worker>` is the worker's lease expiry: a dead worker's slots and
  money claim vanish after `lease_ttl_s` (live workers renew every ttl/4).
- RPM: one token bucket (`rt`, `rts`); a worker takes up to a block of tokens.
- TPM: one bucket (`tt`, `tts`) debited by settled tokens, pushed every sync interval.
- money: `db` = the Postgres snapshot (user: balance; key: -spent; cap passed per call),
  `v` = its version (wall time of the read; older snapshots never replace newer ones),
  `m:<worker>` = money that worker has leased, spent-but-unflushed, or flushed but not yet
  visible in a snapshot. available = cap + db - sum(claims). A worker spends only from its
  leased slice. A Redis flush or restart loses nothing of record: the next refill rebuilds
  `db` from Postgres (the loader, else the worker's last snapshot) and every worker
  re-registers its claim (claims are absolute values each worker owns).

Over-admission bound. Concurrency and budgets are moved, not copied, so leasing adds no
over-admission while workers live (a worker paused past the TTL may over-admit by what
it held). RPM: tokens are taken from the shared bucket before use, so over any interval a
key admits at most what one process's bucket would, plus the tokens live workers held at
the interval's start: at most N x lease_block for N workers (idle workers hand theirs
back within a second). TPM: a worker sees other workers' settled tokens one sync interval
late (50 ms), so the bucket may dip below zero by what settles in that interval; it then
denies until it refills. Money amounts travel as Lua doubles: exact below 2**53 nano-USD
(about 9 million USD per scope).

Safe mode (Redis unreachable): the limiter sets `degraded`; each worker enforces
1/N of every rate and concurrency limit locally (N = the worker count the limiter was
given), spends only money it had already leased, and denies new spending otherwise
(429, retry shortly). It never admits unlimited spending. A background probe restores
shared mode once Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from limits.keys import KeyState

if TYPE_CHECKING:
    from limits.admission import Limiter, Scope

_SYNC = r"""
local key, w = KEYS[1], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HGETALL', key)
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
local oc, om = 0, 0
for name, v in pairs(f) do
  if string.sub(name, 1, 2) == 'x:' then
    local who = string.sub(name, 3)
    if who ~= w then
      if tonumber(v) < now then
        redis.call('HDEL', key, name, 'c:' .. who, 'm:' .. who)
      else
        oc = oc + tonumber(f['c:' .. who] or '0')
        om = om + tonumber(f['m:' .. who] or '0')
      end
    end
  end
end
local climit, cwant, cmin = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cgrant = cwant
if climit > 0 and cgrant > climit - oc then cgrant = climit - oc end
if cgrant < cmin then cgrant = cmin end
redis.call('HSET', key, 'c:' .. w, string.format('%d', cgrant))
local rpm, rwant, rret = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[14])
local rgrant, rwait, rleft = 0, 0, -1
if rpm > 0 then
  local rate = rpm / 60000
  local tok = tonumber(f['rt'] or rpm)
  tok = tok + (now - tonumber(f['rts'] or now)) * rate + rret
  if tok > rpm then tok = rpm end
  rgrant = math.floor(math.min(rwant, tok))
  if rgrant < 0 then rgrant = 0 end
  tok = tok - rgrant
  if rgrant < rwant and tok < 1 then rwait = math.ceil((1 - tok) / rate) end
  rleft = math.floor(tok)
  redis.call('HSET', key, 'rt', string.format('%.17g', tok), 'rts', string.format('%d', now))
end
local tpm, debit = tonumber(ARGV[8]), tonumber(ARGV[9])
local tlev = 0
if tpm > 0 then
  local rate = tpm / 60000
  local lev = tonumber(f['tt'] or tpm) + (now - tonumber(f['tts'] or now)) * rate
  if lev > tpm then lev = tpm end
  lev = lev - debit
  redis.call('HSET', key, 'tt', string.format('%.17g', lev), 'tts', string.format('%d', now))
  tlev = math.floor(lev)
end
local known, mgrant, mavail = 0, 0, 0
local base = tonumber(ARGV[12])
if ARGV[10] == '1' and f['db'] then
  known = 1
  local avail = tonumber(ARGV[11]) + tonumber(f['db']) - om - base
  mgrant = tonumber(ARGV[13])
  if mgrant > avail then mgrant = avail end
  if mgrant < 0 then mgrant = 0 end
  mavail = avail - mgrant
end
redis.call('HSET', key, 'm:' .. w, string.format('%.0f', base + mgrant))
redis.call('HSET', key, 'x:' .. w, string.format('%d', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', key, 86400000)
return {cgrant, rgrant, rwait, rleft, tlev, known, mgrant, mavail, f['v'] or '0'}
"""

_SNAPSHOT = r"""
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
if tonumber(ARGV[2]) > v then
  redis.call('HSET', KEYS[1], 'db', ARGV[1], 'v', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 86400000)
  return 1
end
return 0
"""

_CLOCK_MARGIN_S = 2.0  # a flush counts as in a snapshot only if read this long after it
_IDLE_S = 1.0  # an idle scope hands its RPM tokens and money slice back after this
_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class Shared:
    """The background half of shared mode: lease, renew, return, push TPM debits."""

    def __init__(
        self, limiter: Limiter, url: str, prefix: str, ttl_s: float, interval_s: float
    ) -> None:
        self.lim = limiter
        self.url = url
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.interval = interval_s
        self.block = max(1, limiter.cfg.lease_block)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.redis: Any = aioredis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5, retry_on_timeout=False
        )
        self._sync = self.redis.register_script(_SYNC)
        self._snap = self.redis.register_script(_SNAPSHOT)
        self._hungry: set[Scope] = set()
        # Money slices grow only for scopes whose admissions asked for it: a slice leased
        # ahead of need is money other workers cannot use.
        self._grow: set[Scope] = set()
        self._snaps: dict[Scope, float] = {}
        self._versions: dict[Scope, float] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._last_full = 0.0
        self.errors = 0

    # -- lifecycle --

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except _ERRORS:
            self._fail()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.lim.degraded:
            scopes = [s for s in self._all() if s.conc_held or s.rt or s.held > 0]
            with contextlib.suppress(*_ERRORS):
                await self._sync_scopes(scopes, final=True)
        await self.redis.aclose()

    # -- called by the limiter (synchronous) --

    def after_admit(self, key: KeyState, k: Scope, u: Scope, m: Scope | None = None) -> None:
        self._limits(key, k, u, m)
        block = self.block
        half = block // 2
        for s in (k, u) if m is None or m is u else (k, u, m):
            if s.last_reserve and s.held - s.reserved < s.last_reserve * (half + 1):
                self._grow.add(s)
                self._hungry.add(s)
                self._wake.set()
            elif (s.lc and s.conc_held - s.inflight <= half) or (s.lr and s.rt < half + 1):
                self._hungry.add(s)
                self._wake.set()

    def after_release(self, k: Scope, u: Scope) -> None:
        # Hand surplus slots back promptly so other workers can use them; TPM debt and
        # money moves ride on the periodic sync.
        twice = 2 * self.block
        if k.conc_held - k.inflight > twice:
            self._hungry.add(k)
        if u.conc_held - u.inflight > twice:
            self._hungry.add(u)

    def snapshot(self, s: Scope, as_of: float) -> None:
        self._versions[s] = as_of
        self._snaps[s] = as_of
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        scopes = self._all()
        return {
            "leased_slots": sum(s.conc_held for s in scopes),
            "leased_rpm_tokens": sum(int(s.rt) for s in scopes if s.rt > 0 and s.rt != float("inf")),
            "leased_nano": sum(max(s.held, 0) for s in scopes),
            "redis_errors": self.errors,
        }

    # -- leasing --

    def _all(self) -> list[Scope]:
        return [*self.lim.keys.values(), *self.lim.users.values(), *self.lim.plans.values()]

    def _name(self, s: Scope) -> str:
        return f"{self.prefix}s:{s.kind}{s.id}"

    def _fail(self) -> None:
        self.errors += 1
        self.lim.degraded = True

    def _limits(self, key: KeyState, k: Scope, u: Scope, p: Scope | None = None) -> None:
        cfg = self.lim.cfg
        k.lc = key.concurrency or cfg.key_concurrency
        k.lr = key.rpm or cfg.key_rpm
        k.lt = key.tpm or cfg.key_tpm
        k.limit = key.cap_nano
        k.money = bool(key.cap_nano)
        k.owner = key.user_id
        u.lc = cfg.user_concurrency
        u.lr = cfg.user_rpm
        u.lt = cfg.user_tpm
        u.money = True
        if p is not None:  # a plan scope holds money only: no rate or concurrency limits
            p.money = True
            p.limit = 0

    async def refill_now(self, key: KeyState, k: Scope, u: Scope, p: Scope | None = None) -> None:
        """Lease for this key's scopes now (the caller waits); degrade on Redis failure."""
        self._limits(key, k, u, p)
        if self.lim.degraded:
            return
        scopes = [k, u] if p is None else [k, u, p]
        for s in scopes:
            if not s.last_reserve:
                s.last_reserve = 1
            self._grow.add(s)
        try:
            unknown = await self._sync_scopes(scopes)
            if unknown:
                for s in unknown:
                    await self._rebuild(s)
                await self._sync_scopes(unknown)
        except _ERRORS:
            self._fail()

    async def _rebuild(self, s: Scope) -> None:
        """Redis has no snapshot for this scope (new, flushed or restarted): seed it."""
        loader = self.lim.loader
        plan_loader = self.lim.plan_loader
        if s.kind == "p":
            if plan_loader is not None:
                as_of = time.time()
                s.db = await plan_loader(s.id)
                self._versions[s] = as_of
        elif loader is not None:
            as_of = time.time()
            if s.kind == "u":
                balance, _ = await loader(s.id, 0)
                s.db = balance
            else:
                _, spent = await loader(s.owner, s.id)
                s.db = -spent
            self._versions[s] = as_of
        if s.db is not None:
            await self._snap(keys=[self._name(s)], args=[s.db, repr(self._versions.get(s, 0.0))])

    async def _sync_scopes(self, scopes: list[Scope], final: bool = False) -> list[Scope]:
        """One atomic script per scope, pipelined. Returns scopes whose budget is unknown."""
        if not scopes:
            return []
        # Claims are written as absolute values computed before the round trip, so two
        # syncs of one worker must never overlap.
        async with self._lock:
            return await self._sync_locked(scopes, final)

    async def _sync_locked(self, scopes: list[Scope], final: bool) -> list[Scope]:
        block = self.block
        now = self.lim.clock()
        pipe = self.redis.pipeline(transaction=False)
        sent = []
        for s in scopes:
            idle = final or (s.inflight == 0 and now - s.touched > _IDLE_S)
            # concurrency: lower first (so local admissions during the await stay covered)
            cwant = 0 if idle else s.inflight + block
            if not s.lc:
                cwant = 0
            if s.conc_held > cwant:
                s.conc_held = max(cwant, s.inflight)
            cmin = s.conc_held
            # RPM
            rt = s.rt
            if rt == float("inf") or rt < 0:
                rt = s.rt = 0
            rret = 0
            rwant = 0
            if s.lr:
                if idle:
                    rret = int(rt)
                    s.rt = rt - rret
                elif rt < block:
                    rwant = block - int(rt)
            # money
            ret = 0
            if s.held < 0:
                s.held = 0  # overspend is already in unflushed, which the claim counts
            free = s.held - s.reserved
            want = 0
            if s.money:
                target = 0 if idle else max(s.last_reserve, 1) * block
                if free > target * 2 or (idle and free > 0):
                    ret = free - target if not idle else free
                    s.held -= ret
                elif free < target and s in self._grow:
                    want = target - free
            base = s.held + s.unflushed + sum(a for _, a in s.flushed)
            debit = s.debt
            s.debt = 0
            await self._sync(
                keys=[self._name(s)],
                args=[
                    self.worker, self.ttl_ms, s.lc, cwant, cmin, s.lr, rwant, s.lt, debit,
                    1 if s.money else 0, s.limit, base, want, rret,
                ],
                client=pipe,
            )
            sent.append((s, debit, cwant))
        self._grow.difference_update(scopes)
        try:
            results = await pipe.execute()
        except _ERRORS:
            for s, debit, _ in sent:
                s.debt += debit
            raise
        unknown = []
        now = self.lim.clock()
        for (s, _, cwant), r in zip(sent, results, strict=True):
            cgrant, rgrant, rwait, rleft, tlev, known, mgrant, mavail, ver = r
            s.conc_held = int(cgrant)
            if s.lc and s.conc_held < cwant and s.conc_held <= s.inflight:  # Redis refused
                s.conc_empty_until = now + 0.05
            if s.lr:
                s.rt += int(rgrant)
                s.rleft = int(rleft)
                s.rts = now
                if s.rt < 1:
                    s.rpm_empty_until = now + max(int(rwait), 1) / 1000
            if s.lt:
                s.tt = float(tlev) - s.debt
                s.tts = now
            if s.money:
                if int(known):
                    s.held += int(mgrant)
                    if s.held - s.reserved < max(s.last_reserve, 1) and int(mavail) <= 0:
                        s.money_empty_until = now + 0.5
                    v = float(ver)
                    if s.flushed:
                        kept = [(at, a) for at, a in s.flushed if at + _CLOCK_MARGIN_S >= v]
                        if len(kept) < len(s.flushed):
                            s.flushed = kept
                            self._hungry.add(s)  # lower the claim on the next round
                else:
                    unknown.append(s)
        return unknown

    async def _run(self) -> None:
        lim = self.lim
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        while not self._closing:
            # A timer sets the event: 3.11's wait_for and asyncio.timeout can swallow a
            # cancellation that races their timeout, and close() must always stop this task.
            timer = loop.call_later(self.interval if not lim.degraded else 1.0, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()
            if lim.degraded:
                try:
                    await self.redis.ping()
                except _ERRORS:
                    if self._closing or me.cancelling():
                        raise asyncio.CancelledError from None
                    continue
                for s in self._all():
                    s.rt = 0  # tokens refilled locally in safe mode are not Redis' to honour
                    s.conc_held = s.inflight
                lim.degraded = False
                self._last_full = 0.0
            try:
                snaps, self._snaps = self._snaps, {}
                for s, v in snaps.items():
                    if s.db is not None:
                        await self._snap(keys=[self._name(s)], args=[s.db, repr(v)])
                now = lim.clock()
                block = self.block
                batch = self._hungry
                self._hungry = set()
                if now - self._last_full > self.ttl_ms / 4000:
                    self._last_full = now
                    batch.update(
                        s for s in self._all()
                        if s.conc_held or s.rt or s.held > 0 or s.debt or s.inflight or s.flushed
                    )
                else:
                    batch.update(
                        s for s in self._all()
                        if s.debt
                        or s.flushed
                        or s.conc_held > s.inflight + block
                        or (s.inflight == 0 and now - s.touched > _IDLE_S
                            and (s.held > 0 or s.rt >= 1 or s.conc_held))
                    )
                unknown = await self._sync_scopes(list(batch))
                for s in unknown:
                    await self._rebuild(s)
            except _ERRORS:
                # redis-py may turn a cancellation into a connection error: honour it.
                if self._closing or me.cancelling():
                    raise asyncio.CancelledError from None
                self._fail()

"""Shared limit state across workers and hosts: capacity leased from Redis in blocks.

The problem: concurrency, RPM, TPM and budgets must hold across every worker, yet the
request path may not wait on Redis. The naive answer (one Redis round trip per request)
costs a network hop per admission, and so does a lease whose blocks are too small for
the traffic, returned too eagerly, or refilled only once they are empty. The chosen one:
each worker leases capacity for a scope (one key, one user or one plan) in blocks and
admits locally from what it holds. This module, in one background task (the only code
that talks to Redis for leases):
- prefetches: an admission that leaves a scope below half a block wakes the task, which
  tops it up while the remaining half serves traffic;
- adapts: a scope that needs a top-up again within `_GROW_S` of the last one (or whose
  admission had to wait) doubles its block, up to `_MAX_GROWTH` x `limits.lease_block`;
  a scope idle for `_IDLE_S` hands everything back and starts again at one block;
- coalesces: every top-up, every waiter's refill (`refill_now`), snapshot pushes and TPM
  debits of one round travel in one pipeline, so 64 requests waiting on one scope cost
  one round trip, not 64;
- returns lazily: surplus concurrency beyond two blocks goes back on the next periodic
  round, money beyond twice the target slice too, everything once the scope is idle.
It never decides admission itself.

One Redis hash per scope (`<prefix>s:k<id>` / `s:u<id>` / `s:p<id>`), changed only by
atomic Lua scripts that read Redis' own clock:
- concurrency: field `c:<worker>` = slots that worker holds; a grant never lets the sum
  exceed the limit. `x:<worker>` is the worker's lease expiry: a dead worker's slots and
  money claim vanish after `lease_ttl_s` (live workers renew every ttl/4).
- RPM: one token bucket (`rt`, `rts`); a worker takes up to a block of tokens.
- TPM: one bucket (`tt`, `tts`) debited by settled tokens, pushed every sync interval.
- money: `db` = the Postgres snapshot (user: balance; key: -spent; plan: remaining; cap
  passed per call), `v` = its version (wall time of the read; older snapshots never
  replace newer ones), `m:<worker>` = money that worker has leased, spent-but-unflushed,
  or flushed but not yet visible in a snapshot. available = cap + db - sum(claims). A
  worker spends only from its leased slice, and beyond what the waiting request needs a
  worker's claim grows to at most 1/N of what other workers leave (N = the limiter's
  worker count), so one worker's prefetched slice cannot starve the others into a 402. A Redis flush or
  restart loses nothing of record: the next refill rebuilds `db` from Postgres (the
  loader, else the worker's last snapshot) and every worker re-registers its claim
  (claims are absolute values each worker owns).
The script reads the scope's hash once: O(fields) = O(workers holding the scope).

Over-admission bound. Concurrency and budgets are moved, not copied, so leasing adds no
over-admission while workers live (a worker paused past the TTL may over-admit by what
it held). RPM: tokens are taken from the shared bucket before use, so over any interval a
key admits at most what one process's bucket would, plus the tokens live workers held at
the interval's start: at most N x max(lease_block, rpm / 60) for N workers (an RPM
block grows to at most one second of the limit's rate, never below lease_block; idle
workers hand theirs back within a second). TPM: a worker sees other workers' settled
tokens one sync interval late (50 ms), so the bucket may dip below zero by what settles
in that interval; it then denies until it refills. Money amounts travel as Lua doubles:
exact below 2**53 nano-USD (about 9 million USD per scope).

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
from redis.exceptions import NoScriptError, RedisError

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
  local pool = tonumber(ARGV[11]) + tonumber(f['db']) - om
  local avail = pool - base
  mgrant = tonumber(ARGV[13])
  local need, peers = tonumber(ARGV[15]), tonumber(ARGV[16])
  if peers > 1 and mgrant > need then
    local share = math.floor(pool / peers) - base
    if share < need then share = need end
    if mgrant > share then mgrant = share end
  end
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
_IDLE_S = 1.0  # an idle scope hands its capacity back after this
_GROW_S = 1.0  # a top-up this soon after the previous one doubles the scope's block
_MAX_GROWTH = 64  # a block grows to at most this many times limits.lease_block
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
        # Scopes below their low-water mark (or waited on): top them up, growing money
        # slices only for these (a slice leased ahead of need is money others cannot use).
        self._want: set[Scope] = set()
        # Scopes an admission waited on in this round: their block doubles.
        self._urgent: set[Scope] = set()
        # Scopes with something to hand back.
        self._dirty: set[Scope] = set()
        self._snaps: dict[Scope, float] = {}
        self._versions: dict[Scope, float] = {}
        self._wake = asyncio.Event()
        # Resolved when the round that will carry the current wants has finished.
        self._next: asyncio.Future[None] | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._last_full = 0.0
        self.errors = 0
        self.rounds = 0  # pipelines sent (each one Redis round trip)
        self.waits = 0  # refill_now calls: admissions that had to wait for a round

    # -- lifecycle --

    async def start(self) -> None:
        try:
            await self.redis.ping()
            await self._load_scripts()
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
        self._resolve(self._next)
        self._next = None
        if not self.lim.degraded:
            scopes = [s for s in self._all() if s.conc_held or s.rt or s.held > 0 or s.debt]
            with contextlib.suppress(*_ERRORS):
                await self._sync_scopes(scopes, final=True)
        await self.redis.aclose()

    # -- called by the limiter (synchronous, on the request path) --

    def after_admit(self, key: KeyState, k: Scope, u: Scope, m: Scope | None = None) -> None:
        if k.ks is not key or (m is not None and not m.money):
            self._limits(key, k, u, m)
        now = k.touched
        low = self._low
        if low(k, now) | low(u, now) | (m is not None and m is not u and low(m, now)):
            self._wake.set()

    def _low(self, s: Scope, now: float) -> bool:
        """Below the low-water mark (half a block) of something this scope leases?"""
        if s in self._want or now < s.nextfill:
            return False
        b = self.block * s.blk
        half = b // 2
        if (
            (s.money and s.held - s.reserved < s.last_reserve * (half + 1))
            or (s.lc and s.conc_held - s.inflight <= half)
            or (s.lr and s.rt < min(b, max(self.block, s.lr // 60)) // 2 + 1)
        ):
            self._want.add(s)
            return True
        return False

    def after_release(self, k: Scope, u: Scope) -> None:
        # Surplus slots beyond two blocks go back on the next periodic round, not now: a
        # burst that ends is often followed by another.
        if k.conc_held - k.inflight > 2 * self.block * k.blk:
            self._dirty.add(k)
        if u.lc and u.conc_held - u.inflight > 2 * self.block * u.blk:
            self._dirty.add(u)

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
            "redis_rounds": self.rounds,
            "refill_waits": self.waits,
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
        k.ks = key
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
        if p is not None and p is not u:  # a plan scope holds money only
            p.money = True
            p.limit = 0

    async def _load_scripts(self) -> None:
        # Pipelines call the scripts by EVALSHA: redis-py would otherwise precede every
        # pipeline holding a script with a SCRIPT EXISTS round trip.
        await self.redis.script_load(_SYNC)
        await self.redis.script_load(_SNAPSHOT)

    @staticmethod
    def _resolve(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def refill_now(self, key: KeyState, k: Scope, u: Scope, p: Scope | None = None) -> None:
        """Have this key's scopes topped up in the next round and wait for it.

        Every waiter of a round shares its one pipeline. Returns at once in safe mode or
        when the background task is gone (the caller's next admit then decides).
        """
        self._limits(key, k, u, p)
        task = self._task
        if self.lim.degraded or task is None or task.done() or self._closing:
            return
        self.waits += 1
        for s in (k, u) if p is None else (k, u, p):
            if not s.last_reserve:
                s.last_reserve = 1
            s.nextfill = 0.0
            self._want.add(s)
            self._urgent.add(s)
        fut = self._next
        if fut is None:
            fut = self._next = asyncio.get_running_loop().create_future()
        self._wake.set()
        # shield: a cancelled waiter (client gone) must not cancel the others' round.
        await asyncio.shield(fut)

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
            self.rounds += 1
            await self._snap(keys=[self._name(s)], args=[s.db, repr(self._versions.get(s, 0.0))])

    async def _sync_scopes(
        self, scopes: list[Scope], final: bool = False, snaps: dict[Scope, float] | None = None,
        retry: bool = False,
    ) -> list[Scope]:
        """Snapshot pushes, then one atomic script per scope, in one pipeline.

        Returns scopes whose budget Redis does not know. Claims are absolute values
        computed before the round trip: only the background task (or close, after it)
        calls this, so two syncs of one worker never overlap.
        """
        if not scopes and not snaps:
            return []
        block = self.block
        lim = self.lim
        now = lim.clock()
        pipe = self.redis.pipeline(transaction=False)
        nsnaps = 0
        for s, v in (snaps or {}).items():
            if s.db is None:
                continue
            pipe.evalsha(self._snap.sha, 1, self._name(s), s.db, repr(v))
            nsnaps += 1
            if s.flushed:
                # Redis' snapshot is at least this new once the pipeline has run (older
                # ones never replace newer), so flushes it covers leave the claim.
                kept = [(at, a) for at, a in s.flushed if at + _CLOCK_MARGIN_S >= v]
                if len(kept) < len(s.flushed):
                    s.flushed = kept
                    if s not in scopes:
                        scopes.append(s)
        want = self._want
        urgent = self._urgent
        sent = []
        for s in scopes:
            idle = final or (s.inflight == 0 and now - s.touched > _IDLE_S)
            wanted = s in want
            if idle:
                s.blk = 1
                s.refill_at = 0.0
            elif wanted:
                # Adapt: a scope that needs a top-up again soon after the last one (or
                # whose admission had to wait for one) gets twice the block.
                if s.refill_at and (s in urgent or now - s.refill_at < _GROW_S):
                    s.blk = min(s.blk * 2, _MAX_GROWTH)
                s.refill_at = now
            b = block * s.blk
            # concurrency: lower first (so local admissions during the await stay covered)
            cwant = 0
            if s.lc and not idle:
                surplus = s.conc_held - s.inflight
                cwant = s.inflight + b if wanted or surplus > 2 * b else s.conc_held
            if s.conc_held > cwant:
                s.conc_held = max(cwant, s.inflight)
            cmin = s.conc_held
            # RPM: a block of at most one second of the rate (the over-admission bound)
            rt = s.rt
            if rt == float("inf") or rt < 0:
                rt = s.rt = 0
            rret = 0
            rwant = 0
            if s.lr:
                if idle:
                    rret = int(rt)
                    s.rt = rt - rret
                else:
                    rb = min(b, max(block, s.lr // 60))
                    if rt < rb and (wanted or rt < 1):
                        rwant = rb - int(rt)
            # money
            if s.held < 0:
                s.held = 0  # overspend is already in unflushed, which the claim counts
            free = s.held - s.reserved
            mwant = need = 0
            if s.money:
                lr = max(s.last_reserve, 1)
                target = 0 if idle else lr * b
                if free > target * 2 or (idle and free > 0):
                    ret = free - target if not idle else free
                    s.held -= ret
                elif free < target and wanted:
                    mwant = target - free
                    need = max(0, lr - free)
            base = s.held + s.unflushed + sum(a for _, a in s.flushed)
            debit = s.debt
            s.debt = 0
            pipe.evalsha(
                self._sync.sha, 1, self._name(s),
                self.worker, self.ttl_ms, s.lc, cwant, cmin, s.lr, rwant, s.lt, debit,
                1 if s.money else 0, s.limit, base, mwant, rret, need, lim.peers,
            )
            sent.append((s, debit, cwant, rwant, mwant, wanted))
            want.discard(s)
            urgent.discard(s)
        self.rounds += 1
        try:
            results = await pipe.execute()
        except NoScriptError:
            # Redis lost its scripts (restart, SCRIPT FLUSH): nothing of this round ran.
            for s, debit, *_, wanted in sent:
                s.debt += debit
                if wanted:
                    want.add(s)
            if retry:
                raise
            await self._load_scripts()
            return await self._sync_scopes(scopes, final, snaps, retry=True)
        except _ERRORS:
            for s, debit, *_ in sent:
                s.debt += debit
            raise
        unknown = []
        now = lim.clock()
        for (s, _, cwant, rwant, mwant, _), r in zip(sent, results[nsnaps:], strict=True):
            cgrant, rgrant, rwait, rleft, tlev, known, mgrant, mavail, ver = r
            short = False
            s.conc_held = int(cgrant)
            if s.lc and s.conc_held < cwant:
                short = True
                if s.conc_held <= s.inflight:  # Redis refused: the limit is reached
                    s.conc_empty_until = now + 0.05
            if s.lr:
                s.rt += int(rgrant)
                s.rleft = int(rleft)
                s.rts = now
                if int(rgrant) < rwant:
                    short = True
                if s.rt < 1:
                    s.rpm_empty_until = now + max(int(rwait), 1) / 1000
            if s.lt:
                s.tt = float(tlev) - s.debt
                s.tts = now
            if s.money:
                if int(known):
                    s.held += int(mgrant)
                    if int(mgrant) < mwant:
                        short = True
                    if s.held - s.reserved < max(s.last_reserve, 1) and int(mavail) <= 0:
                        s.money_empty_until = now + 0.5
                else:
                    unknown.append(s)
            if s.flushed:
                v = float(ver)
                kept = [(at, a) for at, a in s.flushed if at + _CLOCK_MARGIN_S >= v]
                if len(kept) < len(s.flushed):
                    s.flushed = kept
                    if s.money:
                        self._dirty.add(s)  # lower the claim on the next round
            # Redis had less than asked: no prefetch for an interval (a waiter still may),
            # so a scope at its limit does not turn every admission into a round trip.
            s.nextfill = now + self.interval if short else 0.0
        return unknown

    def _periodic(self, now: float) -> set[Scope]:
        """Scopes the timer owes a sync: renewals, TPM debits, returns."""
        if now - self._last_full > self.ttl_ms / 4000:
            self._last_full = now
            return {
                s for s in self._all()
                if s.conc_held or s.rt or s.held > 0 or s.debt or s.inflight or s.flushed
            }
        return {
            s for s in self._all()
            if s.debt
            or s.flushed  # a newer snapshot may cover them: lower the claim soon
            or (s.inflight == 0 and now - s.touched > _IDLE_S
                and (s.held > 0 or s.rt >= 1 or s.conc_held))
        }

    async def _round(self) -> None:
        lim = self.lim
        snaps, self._snaps = self._snaps, {}
        batch = self._want | self._dirty
        self._dirty = set()
        now = lim.clock()
        if now - self._last_tick >= self.interval:
            self._last_tick = now
            batch |= self._periodic(now)
        unknown = await self._sync_scopes(list(batch), snaps=snaps)
        if unknown:
            for s in unknown:
                await self._rebuild(s)
            for s in unknown:
                self._want.add(s)
            await self._sync_scopes(unknown)

    _last_tick = 0.0

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
            # Waiters from now on wait for the next round: this one's batch is taken below.
            fut, self._next = self._next, None
            try:
                if lim.degraded:
                    try:
                        await self.redis.ping()
                        await self._load_scripts()
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
                    await self._round()
                except _ERRORS:
                    # redis-py may turn a cancellation into a connection error: honour it.
                    if self._closing or me.cancelling():
                        raise asyncio.CancelledError from None
                    self._want.clear()
                    self._urgent.clear()
                    self._fail()
            finally:
                self._resolve(fut)

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
  round, money beyond twice the target slice too, everything once the scope is idle;
- hands back on demand: a worker whose admissions wait for capacity that Redis does not
  have free marks the scope wanted (`<prefix>d`, a sorted set); every worker reads that
  set with its heartbeat each interval and, for each wanted scope it holds, keeps only
  what its own requests use (and its own waiters need) and reports that. While a scope
  is wanted nobody prefetches for it. The waiting worker's refill waits for those
  answers (at most `_PATIENCE_S`): its waiters are denied only once every live holder
  has answered with nothing unused, i.e. when the key really is at its limit.
It never decides admission itself.

Why hand-back and not blocks alone: a block that doubles with traffic (up to 64 x
lease_block) let one busy worker hold every slot of a key it was not using, returned
only after a second of idleness; another worker (a fresh one after a restart, or one
whose clients arrived later) was then denied "concurrency limit reached" far under the
limit, for as long as the first stayed busy. Now a worker holds, beyond what it uses, at
most its share of the room nobody uses, and gives even that back when another waits.

One Redis hash per scope (`<prefix>s:k<id>` / `s:u<id>` / `s:p<id>`), changed only by
atomic Lua scripts that read Redis' own clock:
- concurrency: field `c:<worker>` = slots that worker holds, `i:<worker>` how many it
  used at its last sync, `t:<worker>` when (Redis ms); a grant never lets the sum exceed
  the limit. A worker is alive while its heartbeat (`<prefix>w`, worker -> expiry, sent
  every sync interval, valid `heartbeat_s`, 1 s) lasts: a dead worker's slots are free
  again within about a second of a kill -9. `x:<worker>` is the worker's money claim
  expiry: its money claim (`h:` leased slice, `m:` settled but not yet in a snapshot)
  vanishes after `lease_ttl_s` (live workers renew every ttl/4), because settled spend
  of a dead worker reaches Postgres only once its journal is replayed.
- demand: `de` = until when the scope is wanted (Redis ms).
- RPM: one token bucket (`rt`, `rts`); a worker takes up to a block of tokens.
- TPM: one bucket (`tt`, `tts`) debited by settled tokens, pushed every sync interval.
- money: `db` = the Postgres snapshot (user: balance; key: -spent; plan: remaining; cap
  passed per call), `v` = its version (wall time of the read; older snapshots never
  replace newer ones), `h:<worker>` + `m:<worker>` = money that worker has leased (h),
  spent-but-unflushed or flushed but not yet visible in a snapshot (m). available = cap + db - sum(claims). A
  worker spends only from its leased slice, and beyond what the waiting request needs a
  worker's claim grows to at most 1/N of what other workers leave (N = the limiter's
  worker count), so one worker's prefetched slice cannot starve the others into a 402. A Redis flush or
  restart loses nothing of record: the next refill rebuilds `db` from Postgres (the
  loader, else the worker's last snapshot) and every worker re-registers its claim
  (claims are absolute values each worker owns).
The script reads the scope's hash once: O(fields) = O(workers holding the scope).

Over-admission bound. Concurrency and budgets are moved, not copied, so leasing adds no
over-admission while workers live (a worker whose event loop stalls past the heartbeat
TTL may over-admit concurrency by the slots it held, until its next sync; past the lease
TTL, money too). RPM: tokens are taken from the shared bucket before use, so over any interval a
key admits at most what one process's bucket would, plus the tokens live workers held at
the interval's start: at most N x max(lease_block, rpm / 60) for N workers (an RPM
block grows to at most one second of the limit's rate, never below lease_block; idle
workers hand theirs back within a second). TPM: a worker sees other workers' settled
tokens one sync interval late (50 ms), so the bucket may dip below zero by what settles
in that interval; it then denies until it refills. Money amounts travel as Lua doubles:
exact below 2**53 nano-USD (about 9 million USD per scope).

A stream's extension (`Lease.extend`, mid-stream) never waits on Redis: it draws only on
the slice this worker holds; a refused one marks the scope for a top-up sized for it,
which the stream may find when it tries again at the end of its reservation.

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
local key, beats, wanted, w = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HGETALL', key)
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
local de = tonumber(f['de'] or '0')
-- Waiters here have been short since this instant (ms, Redis time; 0: new shortage).
local since = tonumber(ARGV[21])
if since == 0 then since = now end
local oc, oi, om, holders, csur = 0, 0, 0, 1, 0
local chat, mhat = {}, {}  -- when each live holder of slots / of money last synced
for name, v in pairs(f) do
  if string.sub(name, 1, 2) == 'x:' then
    local who = string.sub(name, 3)
    if who ~= w then
      if tonumber(v) < now then
        redis.call('HDEL', key, name, 'c:' .. who, 'i:' .. who, 't:' .. who, 'h:' .. who, 'm:' .. who)
      else
        local c = tonumber(f['c:' .. who] or '0')
        local at = tonumber(f['t:' .. who] or '0')
        local hh = tonumber(f['h:' .. who] or '0')
        if tonumber(redis.call('HGET', beats, who) or '0') < now then
          -- No heartbeat: the worker is dead (or stalled past the heartbeat TTL). Its
          -- slots are free now; its money claim stays until x: expires (it may hold
          -- settled spend not yet in Postgres).
          if c > 0 then redis.call('HDEL', key, 'c:' .. who, 'i:' .. who) end
        else
          local i = tonumber(f['i:' .. who] or '0')
          oc = oc + c
          oi = oi + i
          holders = holders + 1
          if c > i then csur = csur + c - i end
          if c > 0 then chat[#chat + 1] = at end
          if hh > 0 then mhat[#mhat + 1] = at end
        end
        om = om + hh + tonumber(f['m:' .. who] or '0')
      end
    end
  end
end
local active = de >= now
local function demand()
  -- Waiters here that this worker cannot serve: every holder hands back what it does
  -- not use (they poll the `wanted` set) and no one prefetches while it lasts.
  de = now + tonumber(ARGV[20])
  redis.call('HSET', key, 'de', string.format('%d', de))
  redis.call('ZADD', wanted, de, key)
  active = true
end
local function unanswered(ats)
  -- Some holder has not synced since these waiters began to wait: it may hand back.
  for _, at in ipairs(ats) do
    if at <= since then return true end
  end
  return false
end
local climit, cwant, cmin = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local inflight, cneed = tonumber(ARGV[18]), tonumber(ARGV[19])
local cgrant, cwait = cwant, 0
if climit > 0 then
  -- Beyond what it needs, a worker holds at most its share of the room nobody uses.
  local spare = math.floor((climit - oi - inflight) / holders)
  if active or spare < 0 then spare = 0 end
  local most = inflight + spare
  if most < cneed then most = cneed end
  if cgrant > most then cgrant = most end
  if cgrant > climit - oc then cgrant = climit - oc end
end
if cgrant < cmin then cgrant = cmin end
if climit > 0 and cgrant < cneed then
  demand()
  -- Decided only once every live holder has answered this demand with no slot unused.
  if csur > 0 or unanswered(chat) then cwait = 1 end
end
redis.call('HSET', key, 'c:' .. w, string.format('%d', cgrant),
  'i:' .. w, string.format('%d', inflight), 't:' .. w, string.format('%d', now))
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
local known, mgrant, mavail, mwait = 0, 0, 0, 0
local held, spent = tonumber(ARGV[12]), tonumber(ARGV[17])
local base = held + spent
if ARGV[10] == '1' and f['db'] then
  known = 1
  local pool = tonumber(ARGV[11]) + tonumber(f['db']) - om
  local avail = pool - base
  mgrant = tonumber(ARGV[13])
  local need, peers = tonumber(ARGV[15]), tonumber(ARGV[16])
  if mgrant > need and (active or peers > 1) then
    local share = math.floor(pool / peers) - base
    if active or share < need then share = need end
    if mgrant > share then mgrant = share end
  end
  if mgrant > avail then mgrant = avail end
  if mgrant < 0 then mgrant = 0 end
  mavail = avail - mgrant
  if mgrant < need then
    demand()
    if unanswered(mhat) then mwait = 1 end
  end
end
redis.call('HSET', key, 'h:' .. w, string.format('%.0f', held + mgrant),
  'm:' .. w, string.format('%.0f', spent))
redis.call('HSET', key, 'x:' .. w, string.format('%d', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', key, 86400000)
local dleft = 0
if active then dleft = de - now end
return {cgrant, rgrant, rwait, rleft, tlev, known, mgrant, mavail, f['v'] or '0', cwait, mwait,
  dleft, since}
"""

# The heartbeat, sent every sync interval, also answers which scopes are wanted: scopes
# where some worker has admissions waiting that it cannot serve (see `_SYNC`'s demand).
_BEAT = r"""
local beats, wanted = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', beats, ARGV[1], string.format('%d', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', beats, 86400000)
if ARGV[3] == '1' then
  local all = redis.call('HGETALL', beats)
  for i = 1, #all, 2 do
    if tonumber(all[i + 1]) < now - 60000 then redis.call('HDEL', beats, all[i]) end
  end
end
redis.call('ZREMRANGEBYSCORE', wanted, '-inf', now)
local out = redis.call('ZRANGE', wanted, 0, -1, 'WITHSCORES')
table.insert(out, 1, string.format('%d', now))
return out
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
_DEMAND_S = 0.5  # a shortage with waiters keeps every holder handing back this long
_PATIENCE_S = 1.0  # a refill waits this long at most for other workers to hand back
_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class Shared:
    """The background half of shared mode: lease, renew, return, push TPM debits."""

    def __init__(
        self, limiter: Limiter, url: str, prefix: str, ttl_s: float, interval_s: float,
        heartbeat_s: float = 1.0,
    ) -> None:
        self.lim = limiter
        self.url = url
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.beat_ms = int(min(heartbeat_s, ttl_s) * 1000)
        self._beats = f"{prefix}w"
        self._wanted = f"{prefix}d"
        self._last_beat = 0.0
        self._last_sweep = 0.0
        self.interval = interval_s
        self.block = max(1, limiter.cfg.lease_block)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.redis: Any = aioredis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5, retry_on_timeout=False
        )
        self._sync = self.redis.register_script(_SYNC)
        self._snap = self.redis.register_script(_SNAPSHOT)
        self._beat = self.redis.register_script(_BEAT)
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

    def after_extend(self, k: Scope, m: Scope, capped: bool) -> None:
        """A lease grew, or could not from this slice (Lease.extend): top the slices up
        as after an admission, so the stream's next try may find the money here."""
        now = self.lim.clock()
        if self._low(m, now) | (capped and self._low(k, now)):
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

    def after_release(self, k: Scope, u: Scope, m: Scope) -> None:
        # Surplus slots beyond two blocks go back on the next periodic round, not now: a
        # burst that ends is often followed by another. While another worker waits on the
        # scope (demand), whatever is free goes back on the next round.
        if k.conc_held - k.inflight > 2 * self.block * k.blk:
            self._dirty.add(k)
        if u.lc and u.conc_held - u.inflight > 2 * self.block * u.blk:
            self._dirty.add(u)
        if k.demand_until or u.demand_until or m.demand_until:
            now = self.lim.clock()
            for s in (k, u, m):
                if s.demand_until > now:
                    self._dirty.add(s)

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
        await self.redis.script_load(_BEAT)

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
        self.waits += 1
        scopes = (k, u) if p is None else (k, u, p)
        deadline = self.lim.clock() + _PATIENCE_S
        first = True
        while True:
            task = self._task
            if self.lim.degraded or task is None or task.done() or self._closing:
                return
            for s in scopes:
                if not s.last_reserve:
                    s.last_reserve = 1
                s.nextfill = 0.0
                self._want.add(s)
                if first:
                    self._urgent.add(s)
            fut = self._next
            if fut is None:
                fut = self._next = asyncio.get_running_loop().create_future()
            if first:
                # Later rounds come with the timer: the other workers answer a demand
                # on their next tick, so asking sooner would only spin.
                self._wake.set()
                first = False
            # shield: a cancelled waiter (client gone) must not cancel the others' round.
            await asyncio.shield(fut)
            if not any(s.transient for s in scopes) or self.lim.clock() >= deadline:
                return

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
            # Another worker waits on this scope: hold only what is needed, no prefetch.
            yielding = s.demand_until > now
            if idle:
                s.blk = 1
                s.refill_at = 0.0
            elif wanted:
                # Adapt: a scope that needs a top-up again soon after the last one (or
                # whose admission had to wait for one) gets twice the block.
                if s.refill_at and not yielding and (s in urgent or now - s.refill_at < _GROW_S):
                    s.blk = min(s.blk * 2, _MAX_GROWTH)
                s.refill_at = now
            b = block * s.blk
            # concurrency: lower first (so local admissions during the await stay covered)
            cwaiting = s.cwait
            # Admissions waiting for a slot count too, and so do waiters a round has
            # just decided that have not run yet: a hand-back must not take theirs.
            chold = mhold = 0
            if now < s.hold_until:
                chold, mhold = s.chold, s.mhold
            cneed = s.inflight + cwaiting + chold
            cwant = 0
            if s.lc and not idle:
                surplus = s.conc_held - s.inflight
                if yielding:
                    cwant = cneed
                elif wanted or surplus > 2 * b:
                    cwant = max(s.inflight + b, cneed)
                else:
                    cwant = max(s.conc_held, cneed)
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
            waiting = s.mwait  # reservations of admissions waiting for this round
            if s.money:
                lr = max(s.last_reserve, 1)
                if idle:
                    target = 0
                elif yielding:
                    target = waiting + mhold
                else:
                    target = max(lr * b, waiting + mhold)
                if free > target * 2 or ((idle or yielding) and free > target):
                    s.held -= free - target
                elif free < target and (wanted or waiting):
                    # All the waiters ask, whatever is free now: requests arriving while
                    # the round is out may take that.
                    need = waiting
                    mwant = max(target - free, need)
            spent = s.unflushed + sum(a for _, a in s.flushed)
            debit = s.debt
            s.debt = 0
            pipe.evalsha(
                self._sync.sha, 3, self._name(s), self._beats, self._wanted,
                self.worker, self.ttl_ms, s.lc, cwant, cmin, s.lr, rwant, s.lt, debit,
                1 if s.money else 0, s.limit, s.held, mwant, rret, need, lim.peers, spent,
                s.inflight, cneed, int(_DEMAND_S * 1000), s.short_since,
            )
            sent.append((s, debit, cwant, rwant, mwant, wanted, cneed, need, cwaiting, waiting))
            want.discard(s)
            urgent.discard(s)
        self.rounds += 1
        try:
            results = await pipe.execute()
        except NoScriptError:
            # Redis lost its scripts (restart, SCRIPT FLUSH): nothing of this round ran.
            for s, debit, _, _, _, wanted, *_ in sent:
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
        for (s, _, cwant, rwant, mwant, _, cneed, need, cwaiting, waiting), r in zip(
            sent, results[nsnaps:], strict=True
        ):
            cgrant, rgrant, rwait, rleft, tlev, known, mgrant, mavail, ver, cwait, mwait, dleft, since = r
            short = False
            s.transient = False  # (set only here: a waiter reads it once its round is done)
            s.conc_held = int(cgrant)
            s.demand_until = now + int(dleft) / 1000 if int(dleft) > 0 else 0.0
            if s.lc and s.conc_held < cwant:
                short = True
                if s.conc_held < cneed:
                    if int(cwait):
                        s.transient = True  # another worker holds slots it may hand back
                    else:
                        # Every slot is in use: the limit. The waiters that got none
                        # are denied (they run next), and no other admission.
                        s.cdeny = cneed - s.conc_held
                        s.cdeny_until = now + _PATIENCE_S
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
                    if int(mgrant) < need and int(mwait):
                        s.transient = True  # another worker holds money it may hand back
                    elif (int(mgrant) < need or s.held - s.reserved < max(s.last_reserve, 1)) \
                            and int(mavail) <= 0:
                        # The budget cannot cover what waits: a 402 until a release here,
                        # or until this lapses.
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
            s.short_since = int(since) if s.transient else 0
            if not s.transient and s not in unknown:
                # Decided: these waiters now admit or are denied. Short but transient, they
                # wait for the next round and still count (so do newcomers meanwhile).
                s.cwait -= cwaiting
                s.mwait -= waiting
                if cwaiting or waiting:
                    # Hold for the waiters this round served (not for those it denied).
                    if now >= s.hold_until:
                        s.chold = s.mhold = 0
                    s.chold += max(0, cwaiting - max(0, cneed - s.conc_held))
                    s.mhold += waiting if int(mgrant) >= need else max(0, min(waiting, s.held - s.reserved))
                    s.hold_until = now + self.interval
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

    async def _heartbeat(self, now: float) -> set[Scope]:
        """Say this worker lives; return the scopes it knows that another worker waits on."""
        self._last_beat = now
        sweep = now - self._last_sweep > 60
        if sweep:
            self._last_sweep = now
        out = await self._beat(keys=[self._beats, self._wanted],
                               args=[self.worker, self.beat_ms, 1 if sweep else 0])
        if len(out) < 3:
            return set()
        rnow = int(out[0])
        tables = {"k": self.lim.keys, "u": self.lim.users, "p": self.lim.plans}
        plen = len(self.prefix) + 2  # "<prefix>s:"
        wanted = set()
        for i in range(1, len(out) - 1, 2):
            name = out[i].decode() if isinstance(out[i], bytes) else str(out[i])
            if not name.startswith(self.prefix):
                continue
            table = tables.get(name[plen:plen + 1])
            sid = name[plen + 1:]
            s = table.get(int(sid)) if table is not None and sid.isdigit() else None
            if s is None:
                continue
            s.demand_until = max(s.demand_until, now + (float(out[i + 1]) - rnow) / 1000)
            # Answer even when holding nothing here: Redis may still count a claim of
            # this worker that a failed round did not lower, and the waiter waits for it.
            wanted.add(s)
        return wanted

    async def _round(self) -> None:
        lim = self.lim
        now = lim.clock()
        batch: set[Scope] = set()
        if now - self._last_beat >= self.interval:
            batch = await self._heartbeat(now)
        snaps, self._snaps = self._snaps, {}
        batch |= self._want | self._dirty
        self._dirty = set()
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

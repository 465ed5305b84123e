"""The usage ledger: a synchronous in-memory recorder and the task that flushes it.

`Ledger.record()` is on the hot path of every request: it writes the row to the
local journal (one `os.write`, see accounting.journal) and appends it to a list. It
never awaits, locks or talks to Postgres. `Flusher` is the only thing that does:
every `flush_interval_ms` (or sooner when `flush_rows` are pending) it moves a batch
into Postgres in one transaction:

1. COPY the rows into a temp table;
2. INSERT them into `usage_log` ON CONFLICT DO NOTHING, so only rows not already
   there count: replays and retries never charge twice;
3. from those new rows alone, upsert `usage_hourly` and apply *aggregated* deltas:
   one `users.balance_nano -= sum` per user and one `keys.spent_nano += sum` per key,
   locking the rows in id order first so concurrent flushers (several workers, several
   hosts) never deadlock.

After the commit it tells the journal the rows are durable (their segments get
deleted) and calls `on_flushed(user_deltas, key_deltas)`. If Postgres is down the
rows stay, the flusher retries with backoff and requests keep flowing; memory is
bounded by `max_pending_rows`, past which rows live only in the journal ("spill") and
are read back from it in order when the backlog drains. Nothing is ever dropped.

Rows drawn on a plan (`plan_id != 0`) are charged to the key's spend but not to the
user's balance; charging the plan itself is the plans module's job (see
`_PLAN_DELTAS_HOOK`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from accounting.journal import Cursor, DeadSegment, Journal, dead_segments
from accounting.records import UsageRecord

log = logging.getLogger(__name__)

OnFlushed = Callable[[dict[int, int], dict[int, int]], None]


class LedgerSettings(Protocol):
    """The fields of relay.config.LedgerConfig this module reads (accounting never imports relay)."""

    @property
    def flush_interval_ms(self) -> int: ...
    @property
    def flush_rows(self) -> int: ...
    @property
    def max_pending_rows(self) -> int: ...
    @property
    def journal_fsync_ms(self) -> int: ...
    @property
    def retention_days(self) -> int: ...


class Ledger:
    """Settled rows waiting for the flusher. `record()` is the only hot-path method."""

    __slots__ = (
        "_flush_rows", "_max", "_spill", "_wake", "head_seq", "journal", "pending",
        "unjournaled",
    )

    def __init__(
        self, journal: Journal | None, *, max_pending_rows: int = 200_000, flush_rows: int = 5000
    ) -> None:
        self.journal = journal
        self.pending: list[UsageRecord] = []  # journal seqs [head_seq, head_seq + len)
        self.head_seq = journal.seq if journal is not None else 0
        # Rows whose journal write failed (disk full): kept in memory whatever the bound.
        self.unjournaled: list[UsageRecord] = []
        self._spill: Cursor | None = None  # first row that lives only in the journal
        self._max = max(1, max_pending_rows)
        self._flush_rows = max(1, flush_rows)
        self._wake: Callable[[], None] | None = None

    def record(self, rec: UsageRecord) -> None:
        """Take one settled row. Synchronous, no lock, no await, never raises on I/O."""
        pending = self.pending
        journal = self.journal
        if journal is None:
            pending.append(rec)
        else:
            spilling = self._spill is not None or len(pending) >= self._max
            if spilling and self._spill is None:
                self._spill = journal.tail()
            if not journal.append(rec):
                self.unjournaled.append(rec)
                return
            if spilling:
                return
            pending.append(rec)
        if len(pending) == self._flush_rows and self._wake is not None:
            self._wake()

    # --- flusher side -----------------------------------------------------------------

    @property
    def spilled_rows(self) -> int:
        if self._spill is None or self.journal is None:
            return 0
        return self.journal.seq - self._spill.seq

    @property
    def backlog(self) -> int:
        """Rows not yet in Postgres: in memory plus spilled to the journal."""
        return len(self.pending) + len(self.unjournaled) + self.spilled_rows

    def committed(self, n: int) -> None:
        """The first `n` pending rows are in Postgres."""
        del self.pending[:n]
        self.head_seq += n
        if self.journal is not None:
            self.journal.committed(self.head_seq)

    def refill(self) -> int:
        """Read spilled rows back from the journal while memory has room; return how many."""
        journal, cur = self.journal, self._spill
        if journal is None or cur is None:
            return 0
        room = self._max - len(self.pending)
        if room <= 0:
            return 0
        recs, cur = journal.read(cur, min(room, max(self._flush_rows * 4, 1)))
        self.pending.extend(recs)
        # Synchronous with record(): nothing can be appended between this read and the
        # check, so order is preserved when the spill ends.
        self._spill = None if cur.seq >= journal.seq else cur
        return len(recs)


# --- SQL ---------------------------------------------------------------------------

_STAGE = "tollway_usage_stage"
_COLUMNS = (
    "request_id", "ts", "user_id", "key_id", "group_name", "model", "upstream_model",
    "channel", "protocol", "route", "stream", "status", "error_code", "input_tokens",
    "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
    "usage_source", "cost_nano", "price_version", "latency_ms", "ttfb_ms", "attempts",
    "channels_tried", "client_request_id", "client_ip", "plan_id",
)
_TYPES = (
    "text", "float8", "bigint", "bigint", "text", "text", "text", "text", "text", "text",
    "boolean", "integer", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "text",
    "bigint", "bigint", "integer", "integer", "integer", "text", "text", "text", "bigint",
)
# ts travels as float8 unix seconds and is converted by to_timestamp() in SQL: the same
# float always gives the same microsecond, so a replayed row hits the same key.
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ("
    + ", ".join(f"{c} {t}" for c, t in zip(_COLUMNS, _TYPES, strict=True))
    + ") ON COMMIT DELETE ROWS"
)
_SELECT_COLS = ", ".join("to_timestamp(ts)" if c == "ts" else c for c in _COLUMNS)
_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
           "reasoning_tokens")

# One statement: new rows only (ON CONFLICT DO NOTHING ... RETURNING), hourly upsert
# from them, and the per-user / per-key sums back to us. Rows are inserted in key order
# so two flushers replaying overlapping rows wait on each other instead of deadlocking.
_INSERT = f"""
WITH ins AS (
    INSERT INTO usage_log ({", ".join(_COLUMNS)})
    SELECT {_SELECT_COLS} FROM {_STAGE} ORDER BY request_id, ts
    ON CONFLICT DO NOTHING
    RETURNING ts, user_id, key_id, group_name, model, status, error_code,
              {", ".join(_TOKENS)}, cost_nano, latency_ms, ttfb_ms, plan_id
), hourly AS (
    INSERT INTO usage_hourly (hour, user_id, key_id, group_name, model, requests, errors,
        {", ".join(_TOKENS)}, cost_nano, latency_ms_sum, ttfb_ms_sum, last_at)
    SELECT date_trunc('hour', ts, 'UTC'), user_id, key_id, group_name, model, count(*),
        count(*) FILTER (WHERE status >= 400 OR error_code <> ''),
        {", ".join(f"sum({t})" for t in _TOKENS)}, sum(cost_nano), sum(latency_ms),
        sum(ttfb_ms), max(ts)
    FROM ins GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (hour, user_id, key_id, group_name, model) DO UPDATE SET
        requests = usage_hourly.requests + EXCLUDED.requests,
        errors = usage_hourly.errors + EXCLUDED.errors,
        {", ".join(f"{t} = usage_hourly.{t} + EXCLUDED.{t}" for t in _TOKENS)},
        cost_nano = usage_hourly.cost_nano + EXCLUDED.cost_nano,
        latency_ms_sum = usage_hourly.latency_ms_sum + EXCLUDED.latency_ms_sum,
        ttfb_ms_sum = usage_hourly.ttfb_ms_sum + EXCLUDED.ttfb_ms_sum,
        last_at = greatest(usage_hourly.last_at, EXCLUDED.last_at)
)
SELECT 0 AS kind, user_id AS id, sum(cost_nano)::bigint AS delta, count(*) AS n
    FROM ins WHERE plan_id = 0 GROUP BY user_id
UNION ALL
SELECT 1, key_id, sum(cost_nano)::bigint, count(*) FROM ins GROUP BY key_id
UNION ALL
SELECT 2, plan_id, sum(cost_nano)::bigint, count(*) FROM ins WHERE plan_id <> 0 GROUP BY plan_id
"""

# Lock in id order (the LockRows node sits above the Sort), then update from the arrays.
_LOCK_USERS = "SELECT 1 FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE"
_CHARGE_USERS = (
    "UPDATE users AS u SET balance_nano = u.balance_nano - d.delta"
    " FROM unnest($1::bigint[], $2::bigint[]) AS d(id, delta) WHERE u.id = d.id"
)
_LOCK_KEYS = "SELECT 1 FROM keys WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE"
_CHARGE_KEYS = (
    "UPDATE keys AS k SET spent_nano = k.spent_nano + d.delta"
    " FROM unnest($1::bigint[], $2::bigint[]) AS d(id, delta) WHERE k.id = d.id"
)
# Integration point: plan (subscription) credit is charged by the plans module; until it
# exists the per-plan sums are only counted in stats (the rows are in usage_log anyway).
_PLAN_DELTAS_HOOK: Callable[[asyncpg.Connection, dict[int, int]], Any] | None = None


def _row(r: UsageRecord) -> tuple[Any, ...]:
    u = r.usage
    return (
        r.request_id, r.ts, r.user_id, r.key_id, r.group, r.model, r.upstream_model,
        r.channel, r.protocol, r.route, r.stream, r.status, r.error_code, u.input, u.output,
        u.cache_read, u.cache_write, u.reasoning, r.usage_source, r.cost_nano,
        r.price_version, r.latency_ms, r.ttfb_ms, r.attempts, r.channels_tried,
        r.client_request_id, r.client_ip, r.plan_id,
    )


@dataclass(slots=True)
class FlushResult:
    inserted: int
    user_deltas: dict[int, int]
    key_deltas: dict[int, int]
    plan_deltas: dict[int, int]


async def prepare(conn: asyncpg.Connection) -> None:
    """Per-connection setup for `write_batch` (the staging temp table)."""
    await conn.execute(_CREATE_STAGE)


async def write_batch(conn: asyncpg.Connection, batch: list[UsageRecord]) -> FlushResult:
    """Write `batch` in one transaction; only rows not already logged are charged."""
    users: dict[int, int] = {}
    keys: dict[int, int] = {}
    plans: dict[int, int] = {}
    inserted = 0
    async with conn.transaction():
        await conn.copy_records_to_table(_STAGE, records=map(_row, batch), columns=_COLUMNS)
        for r in await conn.fetch(_INSERT):
            kind, ident, delta = r["kind"], r["id"], r["delta"]
            if kind == 1:
                inserted += r["n"]
                keys[ident] = delta
            elif kind == 0:
                users[ident] = delta
            else:
                plans[ident] = delta
        user_ids = sorted(i for i, d in users.items() if d)
        if user_ids:
            await conn.execute(_LOCK_USERS, user_ids)
            await conn.execute(_CHARGE_USERS, user_ids, [users[i] for i in user_ids])
        key_ids = sorted(i for i, d in keys.items() if d)
        if key_ids:
            await conn.execute(_LOCK_KEYS, key_ids)
            await conn.execute(_CHARGE_KEYS, key_ids, [keys[i] for i in key_ids])
        if plans and _PLAN_DELTAS_HOOK is not None:
            await _PLAN_DELTAS_HOOK(conn, plans)
    return FlushResult(inserted, users, keys, plans)


# --- the flusher -------------------------------------------------------------------

_CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                      asyncpg.InterfaceError)


class Flusher:
    """Background task moving the ledger into Postgres. `start()`, then `stop()` on shutdown."""

    def __init__(
        self,
        ledger: Ledger,
        dsn: str,
        *,
        flush_interval_ms: int = 250,
        flush_rows: int = 5000,
        journal_fsync_ms: int = 50,
        retention_days: int = 90,
        on_flushed: OnFlushed | None = None,
        connect_timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.ledger = ledger
        self.dsn = dsn  # read at every (re)connect
        self.on_flushed = on_flushed
        self._interval = max(flush_interval_ms, 1) / 1000
        self._flush_rows = max(flush_rows, 1)
        self._fsync_s = max(journal_fsync_ms, 1) / 1000
        self._retention_days = retention_days
        self._connect_timeout = connect_timeout_s
        self._max_backoff = max_backoff_s
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._fsync_task: asyncio.Task[None] | None = None
        self._dead: list[DeadSegment] = []
        self._dead_done = 0  # rows of self._dead[0] already committed
        self._maintained_at = 0.0
        # stats (read by /metrics)
        self.flushed_rows = 0  # newly inserted rows
        self.duplicate_rows = 0  # rows already in Postgres (replays, retries)
        self.flushes = 0
        self.failures = 0
        self.last_flush_s = 0.0
        self.last_error = ""
        self.replayed_rows = 0
        self.plan_charged_nano = 0

    @classmethod
    def from_settings(
        cls, ledger: Ledger, dsn: str, settings: LedgerSettings, on_flushed: OnFlushed | None = None
    ) -> Flusher:
        return cls(
            ledger, dsn, flush_interval_ms=settings.flush_interval_ms,
            flush_rows=settings.flush_rows, journal_fsync_ms=settings.journal_fsync_ms,
            retention_days=settings.retention_days, on_flushed=on_flushed,
        )

    def stats(self) -> dict[str, float]:
        journal = self.ledger.journal
        return {
            "pending_rows": self.ledger.backlog,
            "spilled_rows": self.ledger.spilled_rows,
            "flushed_rows_total": self.flushed_rows,
            "duplicate_rows_total": self.duplicate_rows,
            "flushes_total": self.flushes,
            "flush_failures_total": self.failures,
            "last_flush_seconds": self.last_flush_s,
            "journal_bytes": journal.bytes if journal is not None else 0,
            "journal_write_errors_total": journal.write_errors if journal is not None else 0,
            "replayed_rows_total": self.replayed_rows,
        }

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Adopt dead workers' journal segments, then flush in the background."""
        journal = self.ledger.journal
        if journal is not None:
            self._dead = list(dead_segments(journal.directory, exclude=journal.paths))
        self.ledger._wake = self._wake.set
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="ledger-flusher")
        if journal is not None:
            self._fsync_task = loop.create_task(self._fsync_loop(), name="journal-fsync")

    async def stop(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Flush everything, then return True. On timeout (Postgres down) return False:
        the unflushed rows stay in the journal and are replayed on the next start."""
        self._stopping = True
        self._wake.set()
        done = False
        if self._task is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
                done = True
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._fsync_task is not None:
            self._fsync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fsync_task
        self.ledger._wake = None
        for seg in self._dead:
            seg.release(delete=False)
        self._dead = []
        journal = self.ledger.journal
        if journal is not None:
            journal.close(delete=done and self.ledger.backlog == 0)
        if self._conn is not None:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await self._conn.close(timeout=2)
            self._conn = None
        return done and self.ledger.backlog == 0

    # --- loop ----------------------------------------------------------------------

    def _has_work(self) -> bool:
        ledger = self.ledger
        return bool(self._dead or ledger.unjournaled or ledger.pending or ledger.spilled_rows)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self._drain()
            except _CONNECTION_ERRORS as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("ledger flush failed (rows kept, retrying): %s", self.last_error)
                await self._drop_connection()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 0.05
            if self._stopping and not self._has_work():
                return

    async def _fsync_loop(self) -> None:
        journal = self.ledger.journal
        assert journal is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._fsync_s)
            await loop.run_in_executor(None, journal.fsync)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self.dsn, timeout=self._connect_timeout,
                                         command_timeout=60)
            try:
                await prepare(conn)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        if time.monotonic() - self._maintained_at > 3600:
            await self._maintain(self._conn)
        return self._conn

    async def _maintain(self, conn: asyncpg.Connection) -> None:
        """Day partitions ahead, retention behind; a failure here never blocks usage rows."""
        try:
            await conn.execute("SELECT usage_log_maintain($1)", self._retention_days)
        except asyncpg.PostgresError as exc:
            log.warning("usage_log partition maintenance failed: %s", exc)
        self._maintained_at = time.monotonic()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _drain(self) -> None:
        """Flush until nothing is left; every batch is its own transaction."""
        ledger = self.ledger
        while True:
            if self._dead:
                seg = self._dead[0]
                batch = seg.records[self._dead_done:self._dead_done + self._flush_rows]
                if batch:
                    await self._flush(batch)
                    self._dead_done += len(batch)
                    self.replayed_rows += len(batch)
                if self._dead_done >= len(seg.records):
                    seg.release(delete=True)
                    self._dead.pop(0)
                    self._dead_done = 0
                continue
            if ledger.unjournaled:
                batch = ledger.unjournaled[:self._flush_rows]
                await self._flush(batch)
                del ledger.unjournaled[:len(batch)]
                continue
            if len(ledger.pending) < self._flush_rows:
                ledger.refill()
            if not ledger.pending:
                return
            batch = ledger.pending[:self._flush_rows]
            await self._flush(batch)
            ledger.committed(len(batch))

    async def _flush(self, batch: list[UsageRecord]) -> None:
        conn = await self._connection()
        t0 = time.perf_counter()
        res = await write_batch(conn, batch)
        self.last_flush_s = time.perf_counter() - t0
        self.flushes += 1
        self.flushed_rows += res.inserted
        self.duplicate_rows += len(batch) - res.inserted
        self.plan_charged_nano += sum(res.plan_deltas.values())
        if self.on_flushed is not None and (res.user_deltas or res.key_deltas):
            try:
                self.on_flushed(res.user_deltas, res.key_deltas)
            except Exception:
                log.exception("on_flushed callback failed")


def open_ledger(
    settings: LedgerSettings,
    journal_dir: str,
    dsn: str,
    on_flushed: OnFlushed | None = None,
    name: str | None = None,
) -> tuple[Ledger, Flusher]:
    """The usual wiring: a journal in `journal_dir`, a ledger, and its flusher (not started)."""
    journal = Journal(journal_dir, name)
    ledger = Ledger(journal, max_pending_rows=settings.max_pending_rows,
                    flush_rows=settings.flush_rows)
    return ledger, Flusher.from_settings(ledger, dsn, settings, on_flushed)

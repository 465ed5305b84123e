"""The usage ledger: a synchronous in-memory recorder and the task that flushes it.

`Ledger.record()` is on the hot path of every request: it hands the row to the local
journal (see accounting.journal: encoded and written once per event-loop iteration
while a flusher runs, at once otherwise) and appends it to a list, where the journal's
frame of the row replaces it once encoded, unless a text needs escaping or its time or
id is odd (nearly never): the frame's payload is also a COPY CSV line. It never awaits,
locks or talks to Postgres. `Flusher` is the only thing that does: every
`flush_interval_ms` (or sooner when `flush_rows` are pending) it moves a batch into
Postgres in one transaction:

1. check the records' types (fixing a missing text field, refusing a wrong number)
   and, unless no row of the batch has been in a transaction before, drop rows already
   in `usage_log` (one indexed lookup): replays and retries never charge twice;
2. COPY the rest into a temp table (frames' payloads as CSV, whose types Postgres
   checks; records in binary) and INSERT them into `usage_log` (if another
   flusher commits one of them meanwhile, the batch is redone with ON CONFLICT DO
   NOTHING);
3. from those new rows alone, upsert `usage_hourly` and apply *aggregated* deltas:
   one `users.balance_nano -= sum` per user and one `keys.spent_nano += sum` per key,
   locking the rows in id order first so concurrent flushers (several workers, several
   hosts) never deadlock.

After the commit it tells the journal the rows are durable (their segments get
deleted) and calls `on_flushed(user_deltas, key_deltas)`. If Postgres is down the
rows stay, the flusher retries with backoff and requests keep flowing; memory is
bounded by `max_pending_rows`, past which rows live only in the journal ("spill") and
are read back from it in order when the backlog drains. A row Postgres refuses (a
data error) is isolated by bisecting its batch and, unless making its text storable
fixes it, set aside in a dead-letter file; it never blocks the rows behind it.
Nothing is ever dropped silently.

Rows drawn on a plan (`plan_id` = a subscription's id) are charged to the key's spend
and to the subscription's credit (accounting.plans.charge, in the same transaction);
only what the plan cannot cover, with balance fallback on, reaches the user's balance.
`on_flushed` receives the per-user sums of balance rows (plan_id 0) only, and
`on_plans_flushed` the per-subscription sums of plan rows, because that is how
admission reserved them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import orjson

from accounting import plans as plan_credit
from accounting.journal import (
    HEADER_SIZE,
    UNENCODABLE,
    Cursor,
    DeadSegment,
    Journal,
    dead_journals,
    decode,
    encode,
    encode_checkpoint,
)
from accounting.records import ROW_FIELDS, UsageRecord, UsageRow

log = logging.getLogger(__name__)

OnFlushed = Callable[[dict[int, int], dict[int, int]], None]
# A row waiting for the flusher: its journal frame (bytes, see Ledger.record) or, when it
# needs checking or escaping first or is not encoded yet, the record or flat row itself.
Row = UsageRecord | UsageRow | bytes


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
    def flush_connections(self) -> int: ...
    @property
    def retention_days(self) -> int: ...


class Ledger:
    """Settled rows waiting for the flusher. `record()` is the only hot-path method."""

    __slots__ = (
        "_defer", "_flush_rows", "_keep", "_max", "_spill", "_wake", "head_seq", "journal",
        "pending", "unjournaled",
    )

    def __init__(
        self, journal: Journal | None, *, max_pending_rows: int = 200_000, flush_rows: int = 5000,
        keep: bool = True,
    ) -> None:
        self.journal = journal
        # keep=False (a journal is required): rows go to the journal only, and a ledger
        # process (accounting.ledgerd) reads them from there and flushes them. Only rows
        # the journal could not take stay here (`unjournaled`), for this process's flusher.
        self._keep = keep or journal is None
        if not self._keep and journal is not None:
            journal.on_unwritten = self._unwritten
        self.pending: list[Row] = []  # journal seqs [head_seq, head_seq + len)
        self.head_seq = journal.seq if journal is not None else 0
        # Rows whose journal write failed (disk full): kept in memory whatever the bound.
        self.unjournaled: list[UsageRecord] = []
        self._spill: Cursor | None = None  # first row that lives only in the journal
        self._max = max(1, max_pending_rows)
        self._flush_rows = max(1, flush_rows)
        self._wake: Callable[[], None] | None = None
        self._defer = False

    def defer_writes(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Batch journal writes per iteration of `loop` (None: write each row at once).

        See accounting.journal.Journal: one `os.write` per loop iteration instead of one
        per row; a kill -9 loses at most the rows settled in the current iteration.
        """
        if self.journal is not None:
            self.journal.on_encoded = self._encoded if loop is not None and self._keep else None
            self.journal.defer(loop.call_soon if loop is not None else None)
            self._defer = loop is not None

    def record(self, rec: UsageRecord | UsageRow) -> None:
        """Take one settled row. Synchronous, no lock, no await, never raises.

        The gateway passes the flat row (accounting.records.UsageRow), which is cheaper
        to build and to encode than a UsageRecord; both are accepted.

        With a journal, each row is encoded once: while writes are deferred, by the
        journal's write at the end of the loop iteration (all of the iteration's rows in
        one tight loop, `_encoded`), otherwise here. The frame then replaces the record
        in `pending` unless its time or id is odd or a text needs escaping: the flusher
        sends its payload to Postgres as it is (a CSV line, see write_batch), with no
        per-row work, and memory holds bytes, which the garbage collector never walks.
        """
        pending = self.pending
        journal = self.journal
        if journal is None:
            pending.append(rec)
        elif self._defer and self._spill is None and len(pending) < self._max:
            journal.append_deferred(rec)  # a failed write later: the row is in memory
            if self._keep:
                pending.append(rec)
            else:
                return
        else:
            try:
                data = encode(rec)
            except UNENCODABLE:
                # Not journalable as it is: held in memory like a row whose write
                # failed; the flusher makes its text storable or sets it aside.
                self.unjournaled.append(as_record(rec))
                return
            if not self._keep:
                if not journal.append_frame(data):
                    self.unjournaled.append(as_record(rec))
                return
            if self._spill is not None or len(pending) >= self._max:
                # Spilling: the journal is the only copy, so write it now.
                if self._spill is None:
                    self._spill = journal.tail()
                if not journal.append_frame(data):
                    self.unjournaled.append(as_record(rec))
                return
            if not journal.append_frame(data):
                self.unjournaled.append(as_record(rec))
                return
            pending.append(data if _csv_ready(rec, data) else rec)
        if len(pending) == self._flush_rows and self._wake is not None:
            self._wake()

    def checkpoint(self, row: UsageRow) -> None:
        """Journal a checkpoint of a stream in flight: the flat row it would settle with
        now (same layout as `record`'s; its request id and admission time must be those
        of the row the stream will settle with). Synchronous, never raises; off the
        per-request path (the gateway calls it about once a second per live stream).

        Never flushed while this process lives: if the process dies before the stream
        settles, whoever adopts the journal charges the last checkpoint, once
        (accounting.journal, "Checkpoints"). Without a journal there is nothing a crash
        could leave, so nothing to do.
        """
        journal = self.journal
        if journal is None:
            return
        try:
            frame = encode_checkpoint(row)
        except UNENCODABLE:
            return  # its settled row is handled as any unencodable row; a crash loses it
        journal.checkpoint(row[1], frame)

    def forget_checkpoint(self, request_id: str) -> None:
        """The stream is settling (its row follows) or owes nothing: stop carrying its
        checkpoint into new journal segments."""
        if self.journal is not None:
            self.journal.forget_checkpoint(request_id)

    def _unwritten(self, rows: list[UsageRecord | UsageRow]) -> None:
        """keep=False: rows the journal could not write are held here, as in record()."""
        self.unjournaled.extend(as_record(r) for r in rows)
        if self._wake is not None:
            self._wake()

    def _encoded(self, first_seq: int, frames: list[bytes | None]) -> None:
        """The journal wrote (or tried to write) the rows from `first_seq` on: keep their
        frames in place of the records. A row the flusher has taken meanwhile keeps
        the record in its batch, which is as good."""
        pending = self.pending
        base = first_seq - self.head_seq
        n = len(pending)
        for i, data in enumerate(frames):
            j = base + i
            if data is not None and 0 <= j < n:
                rec = pending[j]
                if not isinstance(rec, bytes) and _csv_ready(rec, data):
                    pending[j] = data

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

    def refill(self, want: int = 0) -> int:
        """Read spilled rows back from the journal while memory has room (about `want`
        rows, at least four batches' worth); return how many."""
        journal, cur = self.journal, self._spill
        if journal is None or cur is None:
            return 0
        room = self._max - len(self.pending)
        if room <= 0:
            return 0
        recs, cur = journal.read(cur, min(room, max(self._flush_rows * 4, want, 1)))
        self.pending.extend(recs)
        # Synchronous with record(): nothing can be appended between this read and the
        # check, so order is preserved when the spill ends.
        self._spill = None if cur.seq >= journal.seq else cur
        return len(recs)


# --- SQL ---------------------------------------------------------------------------

_COLUMNS = (
    "request_id", "ts", "user_id", "key_id", "group_name", "model", "upstream_model",
    "channel", "protocol", "route", "stream", "status", "error_code", "input_tokens",
    "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
    "usage_source", "cost_nano", "price_version", "latency_ms", "ttfb_ms", "attempts",
    "channels_tried", "client_request_id", "client_ip", "plan_id", "multiplier",
    "upstream_request_id", "response_id",
)
# The Python type each column's value must have before COPY (ts before conversion).
_PY_TYPES = (
    str, float, int, int, str, str, str, str, str, str, bool, int, str, int, int, int, int,
    int, str, int, int, int, int, int, str, str, str, int, str, str, str,
)
_STR_COLS = tuple(i for i, t in enumerate(_PY_TYPES) if t is str)
_MULTIPLIER = _COLUMNS.index("multiplier")
_INT_COLS = tuple(i for i, t in enumerate(_PY_TYPES) if t is int)

# Fast path: ask which of the batch's rows are logged already (a replay, a retry after
# a lost commit reply) and leave those out; COPY the others into a temp table (no WAL,
# no index); move them into usage_log with a plain INSERT ... SELECT; aggregate from
# the temp table. Measured (bench/RESULTS.md) against the first design, a staged
# INSERT ... ON CONFLICT DO NOTHING RETURNING feeding a CTE: speculative insertion pays
# for every row the price of a conflict that almost never happens, and aggregating
# from a RETURNING list or from parameter arrays cost more than the insert itself.
# If another flusher commits one of the rows between our check and our insert, the
# unique index stops the insert and the batch goes again through the slow path.
_EXISTING = (
    "SELECT request_id, ts FROM usage_log"
    " WHERE ts >= to_timestamp($2) AND ts <= to_timestamp($3) AND request_id = ANY($1::text[])"
)
_STAGE = "tollway_usage_stage"
_SQL_TYPES = (
    "text", "float8", "bigint", "bigint", "text", "text", "text", "text", "text", "text",
    "boolean", "integer", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "text",
    "bigint", "bigint", "integer", "integer", "integer", "text", "text", "text", "bigint",
    "text", "text", "text",
)
# ts travels as float8 unix seconds and becomes a timestamptz in SQL (to_timestamp):
# the same float always gives the same microsecond, so a replayed row hits the same
# key, and the client never builds a datetime per row.
# `fmt` takes a CSV line's first field, the journal payload's format number (unused).
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (fmt smallint, "
    + ", ".join(f"{c} {t}" for c, t in zip(_COLUMNS, _SQL_TYPES, strict=True))
    + ") ON COMMIT DELETE ROWS"
)
_CSV_COLUMNS = ("fmt", *_COLUMNS)
_COLS = ", ".join(_COLUMNS)
_SELECT_COLS = ", ".join("to_timestamp(ts)" if c == "ts" else c for c in _COLUMNS)
_INSERT_STAGED = f"INSERT INTO usage_log ({_COLS}) SELECT {_SELECT_COLS} FROM {_STAGE}"
# Slow path: rows not already there, in key order so two flushers inserting overlapping
# rows wait on each other instead of deadlocking; the rows that were there already
# leave the stage, so what remains is exactly what to charge.
_INSERT_STAGED_IDEMPOTENT = f"""
WITH ins AS (
    INSERT INTO usage_log ({_COLS})
    SELECT {_SELECT_COLS} FROM {_STAGE} ORDER BY request_id, ts
    ON CONFLICT DO NOTHING
    RETURNING request_id, ts
), old AS (
    DELETE FROM {_STAGE} s
    WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.request_id = s.request_id AND ins.ts = to_timestamp(s.ts))
)
SELECT count(*) FROM ins
"""

# Flusher.stats gauges that combine across flushers (journals, workers) by their maximum:
# the slowest last batch says more than a sum of durations.
MAX_STATS = frozenset({"last_flush_seconds"})

_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
           "reasoning_tokens")
# The staged (= new) rows' hourly upsert and per-user / per-key / per-plan sums, in one
# statement. `g` is small (one row per hour, user, key, group, model and plan), so the
# sums are read from it rather than from the rows again.
def _grouped(source: str, ts: str) -> str:
    """Rows of `source` summed per (hour, user, key, group, model, plan); `ts` is the
    expression giving a row's timestamptz."""
    return f"""
    SELECT date_trunc('hour', {ts}, 'UTC') AS hour, user_id, key_id, group_name, model, plan_id,
        count(*) AS requests, count(*) FILTER (WHERE status >= 400 OR error_code <> '') AS errors,
        {", ".join(f"sum({t}) AS {t}" for t in _TOKENS)}, sum(cost_nano) AS cost_nano,
        sum(latency_ms) AS latency_ms_sum, sum(ttfb_ms) AS ttfb_ms_sum, max({ts}) AS last_at
    FROM {source} GROUP BY 1, 2, 3, 4, 5, 6"""


_MEASURES = ("requests", "errors", *_TOKENS, "cost_nano", "latency_ms_sum", "ttfb_ms_sum")


def _upsert(table: str, keys: tuple[str, ...], exprs: tuple[str, ...]) -> str:
    """Adds `g`, summed per `keys` (computed from g's columns by `exprs`), into `table`,
    in key order so concurrent flushers lock rows in the same order."""
    n = ", ".join(str(i) for i in range(1, len(keys) + 1))
    return f"""
    INSERT INTO {table} ({", ".join(keys)}, {", ".join(_MEASURES)}, last_at)
    SELECT {", ".join(exprs)}, {", ".join(f"sum({m})" for m in _MEASURES)}, max(last_at)
    FROM g GROUP BY {n} ORDER BY {n}
    ON CONFLICT ({", ".join(keys)}) DO UPDATE SET
        {", ".join(f"{m} = {table}.{m} + EXCLUDED.{m}" for m in _MEASURES)},
        last_at = greatest({table}.last_at, EXCLUDED.last_at)"""


_ACCOUNT_KEYS = ("user_id", "key_id", "group_name", "model")
_KEY_KEYS = ("group_name", "user_id", "key_id")
# The aggregates (007_scale.sql, 008_views.sql): per hour and account, per UTC day and
# account, per hour, group and model, and per hour / UTC day and key without the model.
_ROLLUPS = (
    ("hourly", _upsert("usage_hourly", ("hour", *_ACCOUNT_KEYS), ("hour", *_ACCOUNT_KEYS))),
    ("daily", _upsert("usage_daily", ("day", *_ACCOUNT_KEYS),
                      ("date_trunc('day', hour, 'UTC')", *_ACCOUNT_KEYS))),
    ("models", _upsert("usage_hourly_models", ("hour", "group_name", "model"),
                       ("hour", "group_name", "model"))),
    ("hkeys", _upsert("usage_hourly_keys", ("hour", *_KEY_KEYS), ("hour", *_KEY_KEYS))),
    ("dkeys", _upsert("usage_daily_keys", ("day", *_KEY_KEYS),
                      ("date_trunc('day', hour, 'UTC')", *_KEY_KEYS))),
)
_ROLLUP_CTES = "".join(f", {name} AS ({sql}\n)" for name, sql in _ROLLUPS)


def rollup_sql(source: str, ts: str = "ts") -> str:
    """The flusher's aggregation of rows into usage_hourly, usage_daily and
    usage_hourly_models, reading `source` (a table or subquery of usage_log's shape).
    bench/usage_scale.py builds the aggregates with it, so the benchmark's are exactly
    the flusher's."""
    return f"WITH g AS ({_grouped(source, ts)}){_ROLLUP_CTES} SELECT count(*) FROM g"


_AGGREGATE = f"""
WITH g AS ({_grouped(_STAGE, "to_timestamp(ts)")}
){_ROLLUP_CTES}
SELECT 0 AS kind, user_id AS id, sum(cost_nano)::bigint AS delta
    FROM g WHERE plan_id = 0 GROUP BY user_id
UNION ALL
SELECT 1, key_id, sum(cost_nano)::bigint FROM g GROUP BY key_id
UNION ALL
SELECT 2, plan_id, sum(cost_nano)::bigint FROM g WHERE plan_id <> 0 GROUP BY plan_id
"""

# Lock in id order (the LockRows node sits above the Sort), then update from the arrays.
_LOCK_USERS = "SELECT 1 FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE"
_CHARGE_USERS = (
    "UPDATE users AS u SET balance_nano = u.balance_nano - d.delta"
    " FROM unnest($1::bigint[], $2::bigint[]) AS d(id, delta) WHERE u.id = d.id"
)
# Marks this transaction's key updates as spend only: no change-feed version bump
# (migration 004 explains why; the users' balance does bump: it is the feed).
_SPEND_ONLY = "SET LOCAL tollway.ledger_charge = 'on'"
_LOCK_KEYS = "SELECT 1 FROM keys WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE"
_CHARGE_KEYS = (
    "UPDATE keys AS k SET spent_nano = k.spent_nano + d.delta"
    " FROM unnest($1::bigint[], $2::bigint[]) AS d(id, delta) WHERE k.id = d.id"
)

# ts travels as unix seconds (float) and becomes a timestamptz here, to the microsecond
# exactly as Postgres' to_timestamp(float8) rounds it (shift to the 2000 epoch, scale,
# round half to even), so a row replayed from an old journal hits the same key.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_UNIX = 946_684_800.0
_TS_MIN, _TS_MAX = 0.0, 253_402_300_799.0  # 1970 .. 9999


def _csv_ready(rec: UsageRecord | UsageRow, data: bytes) -> bool:
    """Whether `data`, the frame of `rec`, can go to Postgres as a CSV line (_csv): a
    plain float time in range, an id without a comma (the catch-up split reads the user
    id by position) and no backslash in the payload (so no escaped character and no
    quote inside a string). Other fields' types are Postgres's to check: a wrong one
    fails the batch, which is split and the row typed and fixed (or set aside) alone."""
    if isinstance(rec, UsageRecord):
        ts, rid = rec.ts, rec.request_id
    else:  # a flat row; one of an older, shorter layout has fewer CSV fields than COPY takes
        if len(rec) != ROW_FIELDS:
            return False
        ts, rid = rec[2], rec[1]
    return (type(ts) is float and _TS_MIN <= ts <= _TS_MAX and type(rid) is str
            and rid != "" and "," not in rid and data.find(b"\\", HEADER_SIZE) < 0)


def pg_timestamp(ts: float) -> datetime:
    """The timestamptz Postgres' `to_timestamp(ts)` gives, to the microsecond."""
    return _PG_EPOCH + timedelta(microseconds=round((ts - _PG_EPOCH_UNIX) * 1e6))


def _row(r: UsageRecord) -> tuple[Any, ...]:
    u = r.usage
    return (
        r.request_id, r.ts, r.user_id, r.key_id, r.group, r.model, r.upstream_model,
        r.channel, r.protocol, r.route, r.stream, r.status, r.error_code, u.input, u.output,
        u.cache_read, u.cache_write, u.reasoning, r.usage_source, r.cost_nano,
        r.price_version, r.latency_ms, r.ttfb_ms, r.attempts, r.channels_tried,
        r.client_request_id, r.client_ip, r.plan_id, r.multiplier, r.upstream_request_id,
        r.response_id,
    )


def _coerce(t: tuple[Any, ...]) -> list[Any]:
    """Fix what is safely fixable in a row with a wrong-typed field, or raise ValueError.

    A missing text field becomes '' (every text column has that meaning for "none");
    a number that is not an int is refused: guessing a cost or an id is not ours to do.
    """
    v = list(t)
    if type(v[0]) is not str or not v[0]:
        raise ValueError(f"request_id: expected a non-empty str, got {v[0]!r}")
    for i in _STR_COLS:
        if v[i] is None:
            v[i] = "1" if i == _MULTIPLIER else ""
        elif type(v[i]) is not str:
            raise ValueError(f"{_COLUMNS[i]}: expected str, got {type(v[i]).__name__}")
    for i in _INT_COLS:
        x = v[i]
        if type(x) is not int:
            if isinstance(x, int) and not isinstance(x, bool):
                v[i] = int(x)
            else:
                raise ValueError(f"{_COLUMNS[i]}: expected int, got {x!r}")
    if type(v[10]) is not bool:
        if v[10] not in (0, 1):
            raise ValueError(f"stream: expected bool, got {v[10]!r}")
        v[10] = bool(v[10])
    if type(v[1]) is not float:
        if not isinstance(v[1], int | float) or isinstance(v[1], bool):
            raise ValueError(f"ts: expected unix seconds, got {v[1]!r}")
        v[1] = float(v[1])
    return v


def prepare_rows(
    batch: list[UsageRecord],
) -> tuple[list[tuple[Any, ...]], list[tuple[UsageRecord, str]]]:
    """COPY-ready rows and the records refused before they reach Postgres, each with
    the reason.

    The common case costs one `type()` per field, compared at C speed as one tuple.
    """
    rows: list[tuple[Any, ...]] = []
    rejected: list[tuple[UsageRecord, str]] = []
    append = rows.append
    for rec in batch:
        try:
            t = _row(rec)
            if tuple(map(type, t)) != _PY_TYPES:
                t = tuple(_coerce(t))
            if not _TS_MIN <= t[1] <= _TS_MAX:  # also refuses NaN
                raise ValueError(f"ts: {t[1]!r} is not a time between 1970 and 9999")
        except (AttributeError, ValueError, TypeError, OverflowError) as exc:
            rejected.append((rec, f"{type(exc).__name__}: {exc}"))
            continue
        append(t)
    return rows, rejected


_MAX_TEXT = 256  # characters: at most 1 KiB of UTF-8, so two fit in one index row
_TEXT_FIELDS = (
    "request_id", "group", "model", "upstream_model", "channel", "protocol", "route",
    "error_code", "usage_source", "channels_tried", "client_request_id", "client_ip",
    "multiplier", "upstream_request_id", "response_id",
)


def _clean(text: str) -> str:
    text = text.replace("\x00", "\ufffd")
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates
    return text[:_MAX_TEXT]


def sanitized(rec: UsageRecord) -> UsageRecord | None:
    """`rec` with every text field storable (no NUL, valid UTF-8, at most 256
    characters), or None if it already was. Deterministic, so a replay of the same row
    lands on the same key."""
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        v = getattr(rec, name)
        if type(v) is str:
            c = _clean(v)
            if c != v:
                changes[name] = c
    return dataclasses.replace(rec, **changes) if changes else None


@dataclass(slots=True)
class FlushResult:
    inserted: int
    user_deltas: dict[int, int]
    key_deltas: dict[int, int]
    plan_deltas: dict[int, int]
    # Records refused before COPY (wrong types, impossible time), with the reason:
    # not written; the flusher sets them aside in the dead-letter file.
    rejected: list[tuple[UsageRecord, str]] = field(default_factory=list)
    # The fast insert hit a row logged meanwhile (or twice in the batch) and the batch
    # went through the slow path: rare, and counted so a rise shows.
    raced: bool = False


async def prepare(conn: asyncpg.Connection) -> None:
    """Per-connection setup for `write_batch` (the slow path's staging temp table)."""
    await conn.execute(_CREATE_STAGE)


def as_record(item: Row) -> UsageRecord:
    """A pending row as a UsageRecord: the ledger holds most rows as their journal
    frame (Ledger.record), and a row recorded in this loop iteration as it came."""
    if isinstance(item, bytes):
        return decode(item[HEADER_SIZE:])
    if isinstance(item, tuple):
        return UsageRecord.from_row(item)
    return item


_LINE = HEADER_SIZE + 1  # a frame's CSV line: its payload without the brackets


def _csv(frames: list[bytes]) -> memoryview:
    """Pending frames as COPY CSV input. A journal payload `[1,"req_..",..,"1"]` without
    its brackets is a CSV line, given what Ledger.record checked (no backslash, so no
    escaped character and no quote inside a string); orjson's unquoted `null` (a field
    that was None) is read as NULL, which usage_log's NOT NULL refuses. A memoryview:
    asyncpg would take bytes for a file name."""
    return memoryview(b"\n".join([f[_LINE:-1] for f in frames]) + b"\n")


async def write_batch(
    conn: asyncpg.Connection, batch: Sequence[Row], *, fresh: bool = False
) -> FlushResult:
    """Write `batch` in one transaction; only rows not already logged are charged.

    `fresh` says no row of the batch has been part of a transaction before (the
    flusher knows: rows recorded by this process and never tried), so none can be
    logged yet and the existing-row check is skipped (bench/RESULTS.md, "Ledger",
    round 5). Correctness never rests on it: a row that is there after all stops the
    insert at the unique index, and the batch goes through the slow path.

    Raises on a database error (the transaction is rolled back, nothing is charged);
    a data error names no row, which is why the flusher bisects.
    """
    lines: list[bytes] = []
    if fresh:
        # Journal frames go to Postgres as they are; records (rows that needed a check
        # or escaping) are typed and COPYed in binary.
        lines = [x for x in batch if isinstance(x, bytes)]
        records = ([as_record(x) for x in batch if not isinstance(x, bytes)]
                   if len(lines) < len(batch) else [])
    else:
        records = [as_record(x) for x in batch]
    rows, rejected = prepare_rows(records)
    if not rows and not lines:
        return FlushResult(0, {}, {}, {}, rejected)
    try:
        async with conn.transaction():
            logged = None
            if not fresh:
                ids = [t[0] for t in rows]
                times = [t[1] for t in rows]
                logged = await conn.fetch(_EXISTING, ids, min(times), max(times))
            new = rows
            if logged:
                old = {(r[0], r[1]) for r in logged}
                known = {r[0] for r in logged}
                new = [t for t in rows
                       if t[0] not in known or (t[0], pg_timestamp(t[1])) not in old]
            if lines:
                await conn.copy_to_table(_STAGE, source=_csv(lines), columns=_CSV_COLUMNS,
                                         format="csv", null="null")
            if new:
                await conn.copy_records_to_table(_STAGE, records=new, columns=_COLUMNS)
            if new or lines:
                await conn.execute(_INSERT_STAGED)
            res = await _account(conn, len(new) + len(lines))
    except asyncpg.UniqueViolationError:
        # Logged meanwhile by another flusher, or the same row twice in this batch.
        rows += [_row(as_record(p)) for p in lines]
        rows = list({(t[0], t[1]): t for t in rows}.values())
        async with conn.transaction():
            await conn.copy_records_to_table(_STAGE, records=rows, columns=_COLUMNS)
            res = await _account(conn, await conn.fetchval(_INSERT_STAGED_IDEMPOTENT))
        res.raced = True
    res.rejected = rejected
    return res


async def _account(conn: asyncpg.Connection, inserted: int) -> FlushResult:
    """Hourly aggregates and charges for the `inserted` rows left in the stage."""
    users: dict[int, int] = {}
    keys: dict[int, int] = {}
    plans: dict[int, int] = {}
    if not inserted:
        return FlushResult(0, users, keys, plans)
    for kind, ident, delta in await conn.fetch(_AGGREGATE):
        (users, keys, plans)[kind][ident] = delta
    # Lock order everywhere: subscriptions, users, keys.
    debits = users
    if plans:
        spill = await plan_credit.charge(conn, _STAGE)
        if spill:
            debits = dict(users)
            for i, d in spill.items():
                debits[i] = debits.get(i, 0) + d
    user_ids = sorted(i for i, d in debits.items() if d)
    if user_ids:
        await conn.execute(_LOCK_USERS, user_ids)
        await conn.execute(_CHARGE_USERS, user_ids, [debits[i] for i in user_ids])
    key_ids = sorted(i for i, d in keys.items() if d)
    if key_ids:
        await conn.execute(_LOCK_KEYS, key_ids)
        await conn.execute(_SPEND_ONLY)
        await conn.execute(_CHARGE_KEYS, key_ids, [keys[i] for i in key_ids])
    return FlushResult(inserted, users, keys, plans)


# --- the flusher -------------------------------------------------------------------

# A data error belongs to a row, not to the moment: retrying the same batch fails the
# same way forever, so the batch is split to find the row. Anything else (network,
# server restarting, disk full, deadlock, a query cancelled) is retried as it is.
_DATA_ERRORS = (
    asyncpg.DataError,  # SQLSTATE class 22: bad value (NUL in text, out of range...)
    asyncpg.IntegrityConstraintViolationError,  # class 23: NOT NULL, CHECK...
    asyncpg.ProgramLimitExceededError,  # class 54: e.g. a text too long for an index row
    ValueError, TypeError, OverflowError,  # refused by the client-side encoder
)
_CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                      asyncpg.InterfaceError)


class Flusher:
    """Background task moving the ledger into Postgres. `start()`, then `stop()` on shutdown.

    A batch that fails with a data error is bisected until the bad rows are alone; the
    good rows are committed, the bad ones are appended (fsync'd) to the dead-letter file
    `<journal dir>/deadletter-<journal name>.jsonl`, one JSON object per line with the
    row and the error, and only then is the journal told the batch is done. An operator
    fixes and re-imports them by hand; they are never charged silently.

    Batches grow with the backlog: `flush_rows` per transaction when the flusher keeps
    up, up to `flush_rows * max_batch_factor` when rows pile up (after an outage, on
    replay), which spreads the fixed cost of a transaction (the per-key and per-user
    charges, the commit) over more rows exactly when throughput matters.

    The session keeps `synchronous_commit = on`. Turning it off would be safe for the
    rows themselves only if journal segments outlived the commit until Postgres had
    flushed its WAL; they do not (a segment is deleted right after the commit returns),
    so a server crash in that window would lose settled rows. Keeping the segments until
    the WAL is known flushed would close the hole, but there is nothing to win: with
    batches of tens of thousands of rows a commit is one WAL flush per half second,
    and `--async-commit` in bench/ledger_bench.py measured no difference beyond noise
    (bench/RESULTS.md, "Ledger").
    """

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
        max_batch_factor: int = 16,
        deadletter_path: str | None = None,
        connections: int = 2,
    ) -> None:
        self.ledger = ledger
        self.dsn = dsn  # read at every (re)connect
        self.on_flushed = on_flushed
        # Called with {subscription id: nano} right before on_flushed (limits' plan scopes).
        self.on_plans_flushed: Callable[[dict[int, int]], None] | None = None
        # Called before each batch's transactions begin (accounting.ledgerd tells the
        # worker, whose budget snapshots must not straddle a commit).
        self.on_flush_start: Callable[[], None] | None = None
        # Whether start() adopts dead workers' journal segments (a ledger process does
        # that when one runs, and a worker's flusher must leave them to it).
        self.adopt_dead = True
        self._interval = max(flush_interval_ms, 1) / 1000
        self._flush_rows = max(flush_rows, 1)
        self._max_batch = self._flush_rows * max(max_batch_factor, 1)
        self._fsync_s = max(journal_fsync_ms, 1) / 1000
        self._retention_days = retention_days
        self._connect_timeout = connect_timeout_s
        self._max_backoff = max_backoff_s
        journal = ledger.journal
        if deadletter_path is None and journal is not None:
            deadletter_path = os.path.join(journal.directory, f"deadletter-{journal.name}.jsonl")
        self.deadletter_path = deadletter_path
        # Connection 0 writes every batch; the others join in for catch-up batches.
        self._parts = max(connections, 1)
        self._conns: list[asyncpg.Connection | None] = [None] * self._parts
        self._single_until = 0.0  # after a failed extra connection: one part until then
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._fsync_task: asyncio.Task[None] | None = None
        self._dead: list[DeadSegment] = []
        self._dead_done = 0  # rows of self._dead[0] already committed
        # Pending rows with a journal seq below this have been part of a transaction
        # that did not report success: they may be logged, so their batch is checked.
        self._tried_seq = 0
        self._maintained_at = 0.0
        # stats (read by /metrics)
        self.flushed_rows = 0  # newly inserted rows
        self.duplicate_rows = 0  # rows already in Postgres (replays, retries)
        self.deadletter_rows = 0  # rows set aside as unwritable
        self.sanitized_rows = 0  # rows written with their text made storable
        self.raced_batches = 0  # batches redone on a unique violation (write_batch)
        self.flushes = 0
        self.failures = 0
        self.last_flush_s = 0.0
        self.last_error = ""
        self.replayed_rows = 0
        # Interrupted streams' last checkpoints taken from dead journals, to be charged
        # unless already logged (counted in replayed_rows too).
        self.interrupted_rows = 0
        self.plan_charged_nano = 0

    @classmethod
    def from_settings(
        cls, ledger: Ledger, dsn: str, settings: LedgerSettings, on_flushed: OnFlushed | None = None
    ) -> Flusher:
        return cls(
            ledger, dsn, flush_interval_ms=settings.flush_interval_ms,
            flush_rows=settings.flush_rows, journal_fsync_ms=settings.journal_fsync_ms,
            retention_days=settings.retention_days, on_flushed=on_flushed,
            connections=settings.flush_connections,
        )

    def stats(self) -> dict[str, float]:
        """Counters (`*_total`) and gauges; those of MAX_STATS combine across flushers by
        their maximum, the rest by their sum."""
        journal = self.ledger.journal
        return {
            "pending_rows": self.ledger.backlog,
            "spilled_rows": self.ledger.spilled_rows,
            "flushed_rows_total": self.flushed_rows,
            "duplicate_rows_total": self.duplicate_rows,
            "deadletter_rows_total": self.deadletter_rows,
            "sanitized_rows_total": self.sanitized_rows,
            "raced_batches_total": self.raced_batches,
            "flushes_total": self.flushes,
            "flush_failures_total": self.failures,
            "last_flush_seconds": self.last_flush_s,
            "journal_bytes": journal.bytes if journal is not None else 0,
            "journal_write_errors_total": journal.write_errors if journal is not None else 0,
            "checkpoint_write_errors_total": journal.checkpoint_errors if journal is not None else 0,
            "replayed_rows_total": self.replayed_rows,
            "interrupted_rows_total": self.interrupted_rows,
        }

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Adopt dead workers' journal segments, then flush in the background."""
        journal = self.ledger.journal
        if journal is not None and self.adopt_dead:
            # Whole journals, each with what it owes for its interrupted streams first.
            self._dead = [seg for segs in dead_journals(journal.directory, exclude=journal.paths)
                          for seg in segs]
            self.interrupted_rows += sum(seg.interrupted for seg in self._dead)
        self.ledger._wake = self._wake.set
        loop = asyncio.get_running_loop()
        self.ledger.defer_writes(loop)
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
        self.ledger.defer_writes(None)
        for seg in self._dead:
            seg.release(delete=False)
        self._dead = []
        journal = self.ledger.journal
        if journal is not None:
            # keep=False: the journal holds rows a ledger process has still to flush.
            # A stream still live here (never settled) is owed its last checkpoint by
            # whoever adopts the journal next.
            journal.close(delete=done and self.ledger.backlog == 0 and self.ledger._keep
                          and not journal.live_checkpoints)
        for i, conn in enumerate(self._conns):
            if conn is not None:
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    await conn.close(timeout=2)
            self._conns[i] = None
        return done and self.ledger.backlog == 0

    # --- loop ----------------------------------------------------------------------

    def _has_work(self) -> bool:
        ledger = self.ledger
        return bool(self._dead or ledger.unjournaled or ledger.pending or ledger.spilled_rows)

    async def _run(self) -> None:
        backoff = 0.05
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if not self._stopping:
                # One tick every flush_interval_ms from the start of the last one (not
                # from its end), or sooner when flush_rows are pending (the wake).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, started + self._interval - loop.time())):
                        await self._wake.wait()
            self._wake.clear()
            started = loop.time()
            try:
                await self._drain()
            except Exception as exc:  # the rows stay where they are; nothing is dropped
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, _CONNECTION_ERRORS):
                    log.warning("ledger flush failed (rows kept, retrying): %s", self.last_error)
                else:
                    log.exception("ledger flush failed unexpectedly (rows kept, retrying)")
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
            journal.write_buffered()
            await loop.run_in_executor(None, journal.fsync)

    async def _connection(self, i: int = 0) -> asyncpg.Connection:
        conn = self._conns[i]
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(self.dsn, timeout=self._connect_timeout,
                                         command_timeout=60)
            try:
                await prepare(conn)
            except BaseException:
                await conn.close()
                raise
            self._conns[i] = conn
        if i == 0 and time.monotonic() - self._maintained_at > 3600:
            await self._maintain(conn)
        return conn

    async def _maintain(self, conn: asyncpg.Connection) -> None:
        """Day partitions ahead, retention behind; a failure here never blocks usage rows."""
        try:
            await conn.execute("SELECT usage_log_maintain($1)", self._retention_days)
        except asyncpg.PostgresError as exc:
            log.warning("usage_log partition maintenance failed: %s", exc)
        self._maintained_at = time.monotonic()

    async def _drop_connection(self) -> None:
        for i, conn in enumerate(self._conns):
            self._conns[i] = None
            if conn is not None:
                conn.terminate()

    def _batch_size(self, backlog: int) -> int:
        """`flush_rows`, or more (up to the cap) while a backlog of several batches waits."""
        if backlog <= 2 * self._flush_rows:
            return self._flush_rows
        return min(backlog, self._max_batch)

    async def _drain(self) -> None:
        """Flush what is pending, each batch its own transaction: everything when a
        backlog of full batches waits (a catch-up, a replay, on stop), otherwise the one
        batch, and the rows recorded meanwhile wait for the next tick.

        Flushing those at once would keep the flusher busy back to back under steady
        traffic, in batches of what arrived during the previous flush: measured
        (bench/RESULTS.md, "Ledger", round 5) 14-55 flushes a second instead of 4, and
        every flush pays its fixed statements and, per group of rows, every aggregate
        row again.
        """
        ledger = self.ledger
        flushed = False
        while True:
            if self._dead:
                seg = self._dead[0]
                size = self._batch_size(len(seg.records) - self._dead_done)
                batch = seg.records[self._dead_done:self._dead_done + size]
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
                batch = ledger.unjournaled[:self._max_batch]
                await self._flush(batch)
                del ledger.unjournaled[:len(batch)]
                continue
            size = self._batch_size(ledger.backlog)
            if len(ledger.pending) < size:
                ledger.refill(size)
            if not ledger.pending:
                return
            if flushed and not self._stopping and ledger.backlog < self._flush_rows:
                return
            rows = ledger.pending[:size]
            fresh = ledger.head_seq >= self._tried_seq
            self._tried_seq = ledger.head_seq + len(rows)
            await self._flush(rows, fresh=fresh)
            ledger.committed(len(rows))
            flushed = True

    def _split(self, batch: Sequence[Row]) -> list[Sequence[Row]]:
        """`batch` as one part, or, for a catch-up batch (more than `flush_rows`), as up
        to `connections` parts written concurrently, one per connection.

        Rows are parted by user, so the parts charge disjoint users, keys and per-account
        aggregate rows: their transactions do not wait on each other's row locks (only
        the few per-model rows are shared). Measured (bench/RESULTS.md, "Ledger", round
        4): most of a row's cost is the insert into usage_log and its indexes, in the
        backend, so two backends move a catch-up faster on two cores. Steady traffic (a
        batch up to `flush_rows`) stays on one connection: one transaction per flush is
        the cheaper in CPU there. A batch from one user alone stays one part.
        """
        n = self._parts
        if n == 1 or len(batch) <= self._flush_rows or time.monotonic() < self._single_until:
            return [batch]
        parts: list[list[Row]] = [[] for _ in range(n)]
        for rec in batch:
            if isinstance(rec, bytes):
                # A frame Ledger.record kept: `[1,"<id without comma>",<ts>,<user id>,`
                # after the header (whose binary bytes may hold a comma).
                uid = int(rec[_LINE:].split(b",", 4)[3])
            elif isinstance(rec, tuple):
                uid = rec[3]
            else:
                uid = rec.user_id
            parts[uid % n if type(uid) is int else 0].append(rec)
        return [p for p in parts if p]

    async def _flush(self, batch: Sequence[Row], *, fresh: bool = False) -> None:
        """Commit `batch` (bisecting around bad rows); return once every row is either
        in Postgres or in the dead-letter file.

        The parts of a split batch are independent transactions. If one fails, the
        others' commits stand and are reported (on_flushed) before the error is raised;
        the caller keeps the whole batch and writes it again, and the committed rows are
        then found logged already and charged nothing (write_batch's existing-row check).
        `fresh`: no row of `batch` has been in a transaction before (see write_batch).
        """
        if self.on_flush_start is not None:
            self.on_flush_start()
        parts = self._split(batch)
        t0 = time.perf_counter()
        bad: list[tuple[UsageRecord, str]] = []
        error: BaseException | None = None
        results: list[FlushResult] = []
        conns = [await self._connection()]
        if len(parts) > 1:
            try:
                conns += [await self._connection(i) for i in range(1, len(parts))]
            except _CONNECTION_ERRORS as exc:
                # No room for another connection (max_connections, a pooler's limit):
                # the batch goes on the one that works rather than waiting for a second.
                log.warning("ledger: flushing on one connection for a minute, another"
                            " failed: %s", exc)
                self._single_until = time.monotonic() + 60
                parts = [batch]
        if len(parts) == 1:
            results = await self._write_isolating(conns[0], batch, bad, fresh)
        else:
            outcomes = await asyncio.gather(
                *(self._write_isolating(c, p, bad, fresh)
                  for c, p in zip(conns, parts, strict=True)),
                return_exceptions=True)
            for out in outcomes:
                if isinstance(out, BaseException):
                    error = error or out
                else:
                    results.extend(out)
        self.last_flush_s = time.perf_counter() - t0
        self.flushes += 1
        inserted = 0
        users: dict[int, int] = {}
        keys: dict[int, int] = {}
        plans: dict[int, int] = {}
        for res in results:
            inserted += res.inserted
            self.raced_batches += res.raced
            bad.extend(res.rejected)
            for ident, d in res.user_deltas.items():
                users[ident] = users.get(ident, 0) + d
            for ident, d in res.key_deltas.items():
                keys[ident] = keys.get(ident, 0) + d
            for ident, d in res.plan_deltas.items():
                plans[ident] = plans.get(ident, 0) + d
            self.plan_charged_nano += sum(res.plan_deltas.values())
        if bad and error is None:
            self._deadletter(bad, len(batch))
        self.flushed_rows += inserted
        if error is None:
            self.duplicate_rows += len(batch) - inserted - len(bad)
        if self.on_plans_flushed is not None and plans:
            try:
                self.on_plans_flushed(plans)
            except Exception:
                log.exception("on_plans_flushed callback failed")
        if self.on_flushed is not None and (users or keys):
            try:
                self.on_flushed(users, keys)
            except Exception:
                log.exception("on_flushed callback failed")
        if error is not None:
            raise error

    async def _write_isolating(
        self, conn: asyncpg.Connection, batch: Sequence[Row],
        bad: list[tuple[UsageRecord, str]], fresh: bool = False,
    ) -> list[FlushResult]:
        # A data error rolls the whole transaction back, so the halves stay as fresh
        # as the batch was.
        try:
            return [await write_batch(conn, batch, fresh=fresh)]
        except _DATA_ERRORS as exc:
            if len(batch) == 1:
                one = batch[0]
                if isinstance(one, bytes):
                    # Postgres refused its CSV line: typed, it is fixed where it safely
                    # can be (a missing text field) or refused with a reason.
                    return await self._write_isolating(conn, [as_record(one)], bad, fresh)
                return await self._write_sanitized(conn, as_record(one), exc, bad, fresh)
        mid = len(batch) // 2
        first = await self._write_isolating(conn, batch[:mid], bad, fresh)
        return first + await self._write_isolating(conn, batch[mid:], bad, fresh)

    async def _write_sanitized(
        self, conn: asyncpg.Connection, rec: UsageRecord, exc: Exception,
        bad: list[tuple[UsageRecord, str]], fresh: bool = False,
    ) -> list[FlushResult]:
        """A row Postgres refused: bill it with its text made storable if that is what
        was wrong (the money fields are never touched), else set it aside."""
        error = f"{type(exc).__name__}: {exc}"
        fixed = sanitized(rec)
        if fixed is not None:
            try:
                res = await write_batch(conn, [fixed], fresh=fresh)
            except _DATA_ERRORS as again:
                error = f"{error}; after sanitizing text: {type(again).__name__}: {again}"
            else:
                self.sanitized_rows += 1
                log.warning("ledger: row %r written with its text sanitized: %s",
                            fixed.request_id[:_MAX_TEXT], error)
                return [res]
        bad.append((rec, error))
        return []

    def _deadletter(self, bad: list[tuple[UsageRecord, str]], batch_rows: int) -> None:
        """Append `bad` durably to the dead-letter file (raises OSError if it cannot:
        then the batch stays in the journal and is tried again)."""
        at = time.time()
        lines = b"".join(
            orjson.dumps({"at": at, "error": err, "row": dataclasses.asdict(rec)},
                         default=repr) + b"\n"
            for rec, err in bad)
        if self.deadletter_path is not None:
            fd = os.open(self.deadletter_path,
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        self.deadletter_rows += len(bad)
        log.warning("ledger: %d of %d rows could not be written and were set aside in %s;"
                    " first error: %s", len(bad), batch_rows,
                    self.deadletter_path or "(no journal: logged only)", bad[0][1])
        if self.deadletter_path is None:
            for line in lines.splitlines():
                log.error("ledger dead letter: %s", line.decode())


def open_ledger(
    settings: LedgerSettings,
    journal_dir: str,
    dsn: str,
    on_flushed: OnFlushed | None = None,
    name: str | None = None,
    *,
    keep: bool = True,
) -> tuple[Ledger, Flusher]:
    """The usual wiring: a journal in `journal_dir`, a ledger, and its flusher (not
    started). `keep=False`: a ledger process flushes the journal (see Ledger), and this
    flusher takes only the rows the journal could not."""
    journal = Journal(journal_dir, name)
    ledger = Ledger(journal, max_pending_rows=settings.max_pending_rows,
                    flush_rows=settings.flush_rows, keep=keep)
    flusher = Flusher.from_settings(ledger, dsn, settings, on_flushed)
    flusher.adopt_dead = keep
    return ledger, flusher

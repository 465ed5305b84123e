"""Prices and their versions, and the one cost function every request is settled with.

A price is nano-USD per 1M tokens for each of the four token classes. Every change
is a new, immutable version in Postgres (table `prices`, migration 003); a request is
priced with the version current when it was admitted, so `PriceBook` keeps every
version it has seen in memory and `by_version` can explain any old request.

The hot path touches only `PriceBook.lookup` and `cost`, both synchronous and free
of I/O. The async functions here are for start-up, the admin surface and the
once-a-second poller; none of them is called per request. This module never
rounds except once, in `cost` (half up) or `estimate_max_cost` (up).

Cache prices: when config gives no `cache_read` or `cache_write`, each defaults to
the input price, so an unknown cache discount is never a free lunch and cached
tokens are never billed above uncached ones by a missing setting.

Long-context tier (optional, part of the version): as Anthropic (1M-context beta) and
Google (Gemini 2.5 Pro) publish it, a request whose input, counted over every input
class (input + cache read + cache write tokens), exceeds `long_context_threshold` is
billed ENTIRELY at the `long_context_*` prices, output included; exactly at the
threshold is the base price. Missing long-context cache prices default to the
long-context input price (the rule above). Each long-context price is at least its
base price, as providers publish them: a reservation made at the tier then covers a
request that ends up billed at the base. The tier is built once per version (`PriceRow.
long_context`, a PriceRow of its own), so a price without one costs `cost` a single
`is None` check; `cost`, `cost_nano`, `estimate_max_cost` and `explain` all decide with
the same rule (`tier_for`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Protocol

import asyncpg

from accounting.money import (
    MAX_NANO,
    MIN_NANO,
    check_nano,
    format_fraction,
    format_usd,
    parse_usd,
)
from accounting.records import Usage

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens
DEFAULT_MODEL = "default"
# The largest long-context threshold accepted (input tokens): no model reads 100M tokens;
# a larger figure is a typo, not a tier.
MAX_LONG_CONTEXT_THRESHOLD = 100_000_000
LONG_CONTEXT_CLASSES = ("long_context_input", "long_context_output", "long_context_cache_read",
                        "long_context_cache_write")
_ONE = Fraction(1)


class UnknownPrice(LookupError):
    """No price for a model and no "default" price to fall back on."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"no price for model {model!r} and no \"default\" price: add "
            f"[prices.\"{model}\"] or [prices.default] to config.toml, or set one with the admin API"
        )
        self.model = model


class Price(Protocol):
    """USD per 1M tokens as decimal strings; `relay.config.Price` has this shape.

    Described structurally because accounting never imports relay. Empty cache prices
    mean "same as input".
    """

    @property
    def input(self) -> str: ...
    @property
    def output(self) -> str: ...
    @property
    def cache_read(self) -> str: ...
    @property
    def cache_write(self) -> str: ...
    @property
    def long_context_threshold(self) -> int: ...
    @property
    def long_context_input(self) -> str: ...
    @property
    def long_context_output(self) -> str: ...
    @property
    def long_context_cache_read(self) -> str: ...
    @property
    def long_context_cache_write(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PriceRow:
    """One price version: nano-USD per 1M tokens per token class."""

    version: int  # prices.id; 0 for a row not yet stored
    model: str
    input: int
    output: int
    cache_read: int
    cache_write: int
    effective_at: float = 0.0  # epoch seconds this version takes effect; 0: when written
    # The long-context tier (module docstring): input tokens above which the whole
    # request is billed at the long_context_* prices; 0: no tier (and no such prices).
    long_context_threshold: int = 0
    long_context_input: int = 0
    long_context_output: int = 0
    long_context_cache_read: int = 0
    long_context_cache_write: int = 0
    # The tier as a row of its own (threshold 0), built once here: None without a tier.
    long_context: PriceRow | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("version", "input", "output", "cache_read", "cache_write", *LONG_CONTEXT_CLASSES):
            v = check_nano(getattr(self, name), f"price {self.model}.{name}")
            if v < 0:
                raise ValueError(f"price {self.model}.{name}: must be >= 0, got {v}")
        t = self.long_context_threshold
        if type(t) is not int:
            raise TypeError(f"prices.{self.model}.long_context_threshold: expected an int, got {t!r}")
        if not 0 <= t <= MAX_LONG_CONTEXT_THRESHOLD:
            raise ValueError(f"prices.{self.model}.long_context_threshold: expected 0 (no tier) to"
                             f" {MAX_LONG_CONTEXT_THRESHOLD} input tokens, got {t}")
        tier = tuple(getattr(self, n) for n in LONG_CONTEXT_CLASSES)
        if not t:
            if any(tier):
                raise ValueError(f"prices.{self.model}.long_context_threshold: required with"
                                 " long-context prices (the input tokens above which they apply)")
            return
        for name, v in zip(LONG_CONTEXT_CLASSES, tier, strict=True):
            base = getattr(self, name.removeprefix("long_context_"))
            if v < base:
                raise ValueError(
                    f"prices.{self.model}.{name}: must be at least the base"
                    f" {name.removeprefix('long_context_')} price ({format_usd(base)} USD per 1M"
                    f" tokens), got {format_usd(v)}: a long-context tier is never cheaper")
        object.__setattr__(self, "long_context", PriceRow(
            self.version, self.model, self.long_context_input, self.long_context_output,
            self.long_context_cache_read, self.long_context_cache_write, self.effective_at))

    def same_price(self, other: PriceRow) -> bool:
        return (self.input, self.output, self.cache_read, self.cache_write,
                self.long_context_threshold, self.long_context_input, self.long_context_output,
                self.long_context_cache_read, self.long_context_cache_write) == (
            other.input, other.output, other.cache_read, other.cache_write,
            other.long_context_threshold, other.long_context_input, other.long_context_output,
            other.long_context_cache_read, other.long_context_cache_write,
        )


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """A stored version with its audit fields, as `history` returns them."""

    row: PriceRow
    created_at: datetime
    created_by: str


def row_from_price(model: str, price: Price, version: int = 0) -> PriceRow:
    """Exact PriceRow from config strings; empty cache prices default to the input price
    (the long-context ones to the long-context input price)."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"price model: expected a non-empty name, got {model!r}")
    path = f"prices.{model}"
    inp = parse_usd(price.input, what=f"{path}.input")
    out = parse_usd(price.output, what=f"{path}.output")
    cr = parse_usd(price.cache_read, what=f"{path}.cache_read") if price.cache_read != "" else inp
    cw = parse_usd(price.cache_write, what=f"{path}.cache_write") if price.cache_write != "" else inp
    threshold = price.long_context_threshold
    if type(threshold) is not int:
        raise ValueError(f"{path}.long_context_threshold: expected an integer number of input"
                         f" tokens, got {threshold!r}")
    texts = [getattr(price, n) for n in LONG_CONTEXT_CLASSES]
    if not threshold:
        if any(texts):
            raise ValueError(f"{path}.long_context_threshold: required with long_context_* prices"
                             " (the input tokens above which they apply)")
        return PriceRow(version, model, inp, out, cr, cw)
    if not texts[0] or not texts[1]:
        raise ValueError(f"{path}.long_context_input and {path}.long_context_output: required"
                         " with long_context_threshold")
    li = parse_usd(texts[0], what=f"{path}.long_context_input")
    lo = parse_usd(texts[1], what=f"{path}.long_context_output")
    lcr = parse_usd(texts[2], what=f"{path}.long_context_cache_read") if texts[2] else li
    lcw = parse_usd(texts[3], what=f"{path}.long_context_cache_write") if texts[3] else li
    return PriceRow(version, model, inp, out, cr, cw, 0.0, threshold, li, lo, lcr, lcw)


# --- the in-memory book (hot path) -------------------------------------------------


class PriceBook:
    """Current price per model plus every version seen; synchronous, no I/O.

    Fed by `apply(rows)` from `load_since`; a worker polls about once a second.
    """

    __slots__ = ("_current", "_due", "_pending", "_versions", "clock", "last_version")

    def __init__(self, rows: Iterable[PriceRow] = (), clock: Any = time.time) -> None:
        self._current: dict[str, PriceRow] = {}
        self._versions: dict[int, PriceRow] = {}
        # Versions written ahead of their time, and the earliest of their instants: the
        # hot path compares one float while any is pending, nothing otherwise.
        self._pending: list[PriceRow] = []
        self._due: float | None = None
        self.clock = clock
        self.last_version = 0  # highest version applied: pass it to load_since
        self.apply(rows)

    def apply(self, rows: Iterable[PriceRow]) -> None:
        """Add versions; for each model the highest version in effect becomes current,
        and a version scheduled for later becomes current at its instant."""
        now = self.clock()
        for row in rows:
            self._versions[row.version] = row
            if row.version > self.last_version:
                self.last_version = row.version
            if row.effective_at > now:
                self._pending.append(row)
                if self._due is None or row.effective_at < self._due:
                    self._due = row.effective_at
                continue
            self._make_current(row)

    def _make_current(self, row: PriceRow) -> None:
        cur = self._current.get(row.model)
        if cur is None or row.version > cur.version:
            self._current[row.model] = row

    def _promote(self, now: float) -> None:
        due = [r for r in self._pending if r.effective_at <= now]
        self._pending = [r for r in self._pending if r.effective_at > now]
        for row in sorted(due, key=lambda r: r.version):
            self._make_current(row)
        self._due = min((r.effective_at for r in self._pending), default=None)

    def scheduled(self) -> list[PriceRow]:
        """Versions waiting for their instant, soonest first."""
        if self._due is not None:
            self._promote(self.clock())
        return sorted(self._pending, key=lambda r: (r.effective_at, r.version))

    def lookup(self, model: str) -> PriceRow:
        """The current price for `model`, else the current "default" price, else UnknownPrice."""
        if self._due is not None and self.clock() >= self._due:
            self._promote(self.clock())
        row = self._current.get(model)
        if row is None:
            row = self._current.get(DEFAULT_MODEL)
            if row is None:
                raise UnknownPrice(model)
        return row

    def by_version(self, version: int) -> PriceRow | None:
        """A version seen by this book (current or superseded), or None."""
        return self._versions.get(version)

    def models(self) -> list[str]:
        if self._due is not None:
            self._promote(self.clock())
        return sorted(self._current)


# --- cost ---------------------------------------------------------------------------


# The last multiplier seen and its terms: a group's multiplier is one object until the
# groups reload, and Fraction's numerator and denominator are Python properties (two
# calls per use, on every request's reservation and settlement).
_last_terms: tuple[Fraction, int, int] = (_ONE, 1, 1)


def _terms(multiplier: Fraction) -> tuple[int, int]:
    global _last_terms
    last = _last_terms
    if multiplier is last[0]:
        return last[1], last[2]
    if type(multiplier) is not Fraction:
        raise TypeError(f"multiplier: expected a Fraction, got {type(multiplier).__name__} {multiplier!r}")
    mn, md = multiplier.numerator, multiplier.denominator
    _last_terms = (multiplier, mn, md)
    return mn, md


def tier_for(price: PriceRow, input_tokens: int) -> PriceRow:
    """The row a request with `input_tokens` of input (every input class) is billed at:
    the long-context tier above its threshold, else `price`. `cost`, `cost_nano` and
    `estimate_max_cost` inline this rule (a call per request costs more than the check)."""
    tier = price.long_context
    if tier is not None and input_tokens > price.long_context_threshold:
        return tier
    return price


def cost(usage: Usage, price: PriceRow, multiplier: Fraction) -> tuple[int, Fraction]:
    """(cost in nano-USD rounded once half up, the exact cost as a Fraction of nano-USD).

    exact = sum(tokens * price_per_1M) / 1_000_000 * multiplier. The rounding runs on
    integers and exactly one Fraction is built, from two ints (Fraction's cheapest
    constructor; Fraction arithmetic costs several times more). The common case,
    multiplier 1 and a whole number of nano-USD, skips the gcd as well.
    """
    mn, md = _terms(multiplier)
    tier = price.long_context  # tier_for, inlined: one check for a price without a tier
    if tier is not None and usage.input + usage.cache_read + usage.cache_write > price.long_context_threshold:
        price = tier
    weighted = (
        usage.input * price.input
        + usage.output * price.output
        + usage.cache_read * price.cache_read
        + usage.cache_write * price.cache_write
    )
    if type(weighted) is not int:
        raise TypeError(f"token counts must be ints, got {usage!r}")
    if mn == md:  # multiplier 1 (a Fraction is always in lowest terms)
        q, r = divmod(weighted, TOKENS_PER_PRICE_UNIT)
        if not r:
            if q > MAX_NANO:
                check_nano(q, "cost")
            return q, Fraction(q, 1)
        num, den = weighted, TOKENS_PER_PRICE_UNIT
    else:
        num = weighted * mn
        den = TOKENS_PER_PRICE_UNIT * md
    nano = (2 * num + den) // (2 * den)
    if nano > MAX_NANO:
        check_nano(nano, "cost")
    return nano, Fraction(num, den)


def cost_nano(usage: Usage, price: PriceRow, multiplier: Fraction) -> int:
    """`cost(...)[0]` without building the exact Fraction: integers only, for settlement.

    The usage row stores only the rounded cost; the exact value is for explanations,
    which recompute it with `cost` or `explain` from the row's usage and price version.
    """
    mn, md = _terms(multiplier)
    tier = price.long_context  # tier_for, inlined: one check for a price without a tier
    if tier is not None and usage.input + usage.cache_read + usage.cache_write > price.long_context_threshold:
        price = tier
    weighted = (
        usage.input * price.input
        + usage.output * price.output
        + usage.cache_read * price.cache_read
        + usage.cache_write * price.cache_write
    )
    if type(weighted) is not int:
        raise TypeError(f"token counts must be ints, got {usage!r}")
    den = TOKENS_PER_PRICE_UNIT * md
    nano = (2 * weighted * mn + den) // (2 * den)
    if nano > MAX_NANO:
        check_nano(nano, "cost")
    return nano


def estimate_max_cost(input_tokens: int, max_output: int, price: PriceRow, multiplier: Fraction) -> int:
    """A reservation: the most `input_tokens` in and `max_output` out can cost, rounded up.

    Input is priced at the dearest input class (uncached, cache read or cache write), so
    the estimate is an upper bound whatever the upstream's cache does. `input_tokens` is
    an upper bound too: above the long-context threshold the whole estimate is at the
    tier, which no request that bound covers can cost more than (tier >= base).
    """
    mn, md = _terms(multiplier)
    if type(input_tokens) is not int or type(max_output) is not int:
        raise TypeError("token counts must be ints")
    tier = price.long_context  # tier_for, inlined
    if tier is not None and input_tokens > price.long_context_threshold:
        price = tier
    in_price = max(price.input, price.cache_read, price.cache_write)
    weighted = input_tokens * in_price + max_output * price.output
    nano = -((-weighted * mn) // (TOKENS_PER_PRICE_UNIT * md))
    if nano > MAX_NANO or nano < MIN_NANO:
        check_nano(nano, "reservation")  # raises: out of range
    return nano


def _exact_usd(nano: Fraction) -> str:
    """Exact USD text of a nano-USD Fraction: a decimal when it terminates, else "a/b"."""
    return format_fraction(nano / 1_000_000_000)


def explain(usage: Usage, price: PriceRow, multiplier: Fraction) -> dict[str, Any]:
    """The bill for one request, class by class, exact; JSON-ready (ints and strings).

    `tier` says which prices applied: "long_context" when the request's input was above
    the version's `long_context_threshold` (> 0), else "base"."""
    cost_nano, exact = cost(usage, price, multiplier)
    threshold = price.long_context_threshold
    billed = tier_for(price, usage.input + usage.cache_read + usage.cache_write)
    classes = []
    subtotal = Fraction(0)
    for name in ("input", "output", "cache_read", "cache_write"):
        tokens = getattr(usage, name)
        unit = getattr(billed, name)
        sub = Fraction(tokens * unit, TOKENS_PER_PRICE_UNIT)
        subtotal += sub
        classes.append(
            {
                "class": name,
                "tokens": tokens,
                "usd_per_million": format_usd(unit),
                "subtotal_usd": _exact_usd(sub),
            }
        )
    return {
        "model": price.model,
        "price_version": price.version,
        "tier": "base" if billed is price else "long_context",
        "long_context_threshold": threshold,
        "input_tokens_total": usage.input + usage.cache_read + usage.cache_write,
        "classes": classes,
        "reasoning_tokens": usage.reasoning,  # already inside output, listed for reference
        "subtotal_usd": _exact_usd(subtotal),
        "multiplier": format_fraction(multiplier),
        "exact_total_usd": _exact_usd(exact),
        "exact_total_nano": str(exact),
        "cost_nano": cost_nano,
        "cost_usd": format_usd(cost_nano),
        "rounding": "once, half up",
    }


# --- storage (start-up, admin, poller; never per request) ----------------------------

_COLUMNS = ("id, model, input, output, cache_read, cache_write, effective_at, long_context_threshold,"
            " long_context_input, long_context_output, long_context_cache_read,"
            " long_context_cache_write")


def _row(r: asyncpg.Record) -> PriceRow:
    at = r["effective_at"]
    return PriceRow(r["id"], r["model"], r["input"], r["output"], r["cache_read"], r["cache_write"],
                    at.timestamp() if at is not None else 0.0, r["long_context_threshold"],
                    r["long_context_input"], r["long_context_output"],
                    r["long_context_cache_read"], r["long_context_cache_write"])


async def load_since(conn: asyncpg.Connection, since_id: int) -> list[PriceRow]:
    """Every version with id > since_id, oldest first (0: all of them).

    Writers are serialised by a trigger (see 003_prices.sql), so ids become visible
    in order and polling with the highest id seen never skips a version.
    """
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM prices WHERE id > $1 ORDER BY id", since_id
    )
    return [_row(r) for r in rows]


async def load_version(conn: asyncpg.Connection, version: int) -> PriceRow | None:
    r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM prices WHERE id = $1", version)
    return _row(r) if r is not None else None


async def _current(conn: asyncpg.Connection, models: Sequence[str]) -> dict[str, PriceRow]:
    rows = await conn.fetch(
        f"SELECT DISTINCT ON (model) {_COLUMNS} FROM prices WHERE model = ANY($1::text[])"
        " AND (effective_at IS NULL OR effective_at <= now()) ORDER BY model, id DESC",
        list(models),
    )
    return {r["model"]: _row(r) for r in rows}


async def _insert(conn: asyncpg.Connection, row: PriceRow, created_by: str,
                  effective_at: datetime | None = None) -> PriceRow:
    r = await conn.fetchrow(
        "INSERT INTO prices (model, input, output, cache_read, cache_write, created_by, effective_at,"
        " long_context_threshold, long_context_input, long_context_output, long_context_cache_read,"
        f" long_context_cache_write) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        f" RETURNING {_COLUMNS}",
        row.model, row.input, row.output, row.cache_read, row.cache_write, created_by, effective_at,
        row.long_context_threshold, row.long_context_input, row.long_context_output,
        row.long_context_cache_read, row.long_context_cache_write,
    )
    assert r is not None
    return _row(r)


async def sync_config_prices(
    conn: asyncpg.Connection, prices: Sequence[tuple[str, Price]], created_by: str = "config"
) -> int:
    """At start: store a new version for each config price that differs from the current one.

    Returns how many versions were created (0 when config matches the database). Every
    price is parsed before anything is written, so one bad value changes nothing.
    """
    wanted = [row_from_price(model, price) for model, price in prices]
    if not wanted:
        return 0
    created = 0
    async with conn.transaction():
        # The advisory lock (taken here as well as by the insert trigger) makes two
        # workers starting together compare against each other's insert, not race it.
        await conn.execute("SELECT pg_advisory_xact_lock(1886546275)")
        current = await _current(conn, [w.model for w in wanted])
        for row in wanted:
            cur = current.get(row.model)
            if cur is None or not cur.same_price(row):
                current[row.model] = await _insert(conn, row, created_by)
                created += 1
    return created


async def set_price(conn: asyncpg.Connection, model: str, price: Price, created_by: str,
                    effective_at: datetime | None = None) -> PriceRow:
    """Make `price` current for `model` (at `effective_at`, or now); returns the version.

    An immediate price equal to the current one creates no version and returns the
    current row. A scheduled one is always a new version: it becomes current at its
    instant unless a newer version has taken effect by then.
    """
    row = row_from_price(model, price)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(1886546275)")
        if effective_at is not None:
            if effective_at <= datetime.now(UTC):
                raise ValueError("effective_at: must be in the future (leave it out to apply now)")
            return await _insert(conn, row, created_by, effective_at)
        cur = (await _current(conn, [model])).get(model)
        if cur is not None and cur.same_price(row):
            return cur
        return await _insert(conn, row, created_by)


async def history(conn: asyncpg.Connection, model: str) -> list[PriceVersion]:
    """Every version of `model`, newest first, with who set it and when."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS}, created_at, created_by FROM prices WHERE model = $1 ORDER BY id DESC",
        model,
    )
    return [PriceVersion(_row(r), r["created_at"], r["created_by"]) for r in rows]


async def current_all(conn: asyncpg.Connection) -> list[PriceRow]:
    """The version in effect now for every model, by model."""
    rows = await conn.fetch(
        f"SELECT DISTINCT ON (model) {_COLUMNS} FROM prices"
        " WHERE effective_at IS NULL OR effective_at <= now() ORDER BY model, id DESC")
    return [_row(r) for r in rows]


async def scheduled(conn: asyncpg.Connection) -> list[PriceVersion]:
    """Versions written to take effect later, soonest first."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS}, created_at, created_by FROM prices WHERE effective_at > now()"
        " ORDER BY effective_at, id")
    return [PriceVersion(_row(r), r["created_at"], r["created_by"]) for r in rows]

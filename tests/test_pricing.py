"""Prices: exact cost rounded once, the in-memory book, versions stored in real Postgres."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from fractions import Fraction

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from accounting.money import parse_usd, round_nano
from accounting.pricing import (
    PriceBook,
    PriceRow,
    UnknownPrice,
    cost,
    cost_nano,
    estimate_max_cost,
    explain,
    history,
    load_since,
    load_version,
    row_from_price,
    set_price,
    sync_config_prices,
)
from accounting.records import Usage


@dataclass(frozen=True)
class P:
    """Shaped like relay.config.Price (accounting must not import relay)."""

    input: str
    output: str
    cache_read: str = ""
    cache_write: str = ""
    long_context_threshold: int = 0
    long_context_input: str = ""
    long_context_output: str = ""
    long_context_cache_read: str = ""
    long_context_cache_write: str = ""


ONE = Fraction(1)


def row(input: str = "0", output: str = "0", cache_read: str = "0", cache_write: str = "0",
        version: int = 1, model: str = "m") -> PriceRow:
    return row_from_price(model, P(input, output, cache_read, cache_write), version)


# --- config prices into rows ------------------------------------------------------------


def test_row_from_price_is_exact_and_cache_defaults_to_input() -> None:
    r = row_from_price("gpt-4o-mini", P("0.15", "0.60"))
    assert (r.input, r.output, r.cache_read, r.cache_write) == (150_000_000, 600_000_000, 150_000_000, 150_000_000)
    r = row_from_price("m", P("3", "15", cache_read="0.30", cache_write="3.75"))
    assert (r.cache_read, r.cache_write) == (300_000_000, 3_750_000_000)
    assert r.version == 0


def test_row_from_price_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"prices\.m\.output: .*more than 9 decimal places"):
        row_from_price("m", P("1", "0.0000000001"))
    with pytest.raises(TypeError, match=r"prices\.m\.input"):
        row_from_price("m", P(0.15, "1"))  # type: ignore[arg-type]


def test_price_row_rejects_floats_and_negatives() -> None:
    with pytest.raises(TypeError):
        PriceRow(1, "m", 0.5, 0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        PriceRow(1, "m", -1, 0, 0, 0)


# --- cost ---------------------------------------------------------------------------------


def test_one_token_at_015_per_million_is_150_nano() -> None:
    assert cost(Usage(input=1), row(input="0.15"), ONE) == (150, Fraction(150))


def test_seven_tokens_at_0075_times_two_thirds() -> None:
    # 7 * 75 nano = 525, * 2/3 = 350 exactly
    nano, exact = cost(Usage(input=7), row(input="0.075"), Fraction(2, 3))
    assert (nano, exact) == (350, Fraction(350))
    # one more output token at $0.0001/M (0.1 nano) makes it inexact: rounded once
    nano, exact = cost(Usage(input=7, output=1), row(input="0.075", output="0.0001"), Fraction(2, 3))
    assert exact == Fraction(5251, 15)  # (525 + 1/10) * 2/3
    assert nano == 350


def test_cost_rounds_once_not_per_class() -> None:
    # 1 token at $0.0005/M = 0.5 nano in each of two classes: per-class half-up
    # rounding would charge 2; rounding the exact total once charges 1.
    price = row(input="0.0005", output="0.0005")
    nano, exact = cost(Usage(input=1, output=1), price, ONE)
    assert exact == 1 and nano == 1
    nano, exact = cost(Usage(input=1), price, ONE)
    assert exact == Fraction(1, 2) and nano == 1  # half up
    nano, exact = cost(Usage(input=1), price, Fraction(2, 3))
    assert exact == Fraction(1, 3) and nano == 0


def test_cost_uses_every_class() -> None:
    price = row(input="3", output="15", cache_read="0.3", cache_write="3.75")
    usage = Usage(input=10, output=20, cache_read=1000, cache_write=100, reasoning=5)
    nano, _ = cost(usage, price, ONE)
    assert nano == 10 * 3000 + 20 * 15000 + 1000 * 300 + 100 * 3750
    assert cost(usage, price, Fraction(4, 5))[0] == nano * 4 // 5


def test_cost_nano_is_the_rounded_cost() -> None:
    assert cost_nano(Usage(input=1), row(input="0.15"), ONE) == 150
    assert cost_nano(Usage(input=1), row(input="0.0005"), ONE) == 1  # 0.5 -> 1, half up
    assert cost_nano(Usage(input=1), row(input="0.0005"), Fraction(2, 3)) == 0
    with pytest.raises(TypeError):
        cost_nano(Usage(input=1), row(input="1"), 1.0)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        cost_nano(Usage(input=2_000_000), row(input="9223372036"), ONE)


def test_cost_refuses_floats() -> None:
    with pytest.raises(TypeError, match="multiplier"):
        cost(Usage(input=1), row(input="1"), 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ints"):
        cost(Usage(input=1.5), row(input="1"), ONE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="multiplier"):
        estimate_max_cost(1, 1, row(input="1"), 0.5)  # type: ignore[arg-type]


def test_cost_overflow_is_refused() -> None:
    price = row(input="9223372036")
    with pytest.raises(OverflowError):
        cost(Usage(input=2_000_000), price, ONE)


prices_st = st.integers(min_value=0, max_value=10**12)
tokens_st = st.integers(min_value=0, max_value=10**7)


@given(
    st.tuples(tokens_st, tokens_st, tokens_st, tokens_st),
    st.tuples(prices_st, prices_st, prices_st, prices_st),
    st.fractions(min_value=Fraction(1, 1000), max_value=10, max_denominator=1000),
)
def test_cost_matches_exact_reference(tokens: tuple[int, ...], prices: tuple[int, ...], mult: Fraction) -> None:
    usage = Usage(*tokens)
    price = PriceRow(1, "m", *prices)
    reference = sum(Fraction(t * p, 1_000_000) for t, p in zip(tokens, prices, strict=True)) * mult
    nano, exact = cost(usage, price, mult)
    assert exact == reference
    assert cost_nano(usage, price, mult) == nano
    assert nano == round_nano(reference)
    assert abs(nano - reference) <= Fraction(1, 2)
    # the reservation for the same tokens, all input at the dearest input class, covers it
    reserve = estimate_max_cost(tokens[0] + tokens[2] + tokens[3], tokens[1], price, mult)
    assert reserve >= nano and reserve >= reference


def test_estimate_max_cost_rounds_up() -> None:
    assert estimate_max_cost(1, 0, row(input="0.0005"), ONE) == 1  # 0.5 nano -> 1
    assert estimate_max_cost(1, 0, row(input="0.0000005"), ONE) == 1  # 0.0005 nano -> 1
    assert estimate_max_cost(3, 0, row(input="0.0005"), Fraction(2, 3)) == 1  # exactly 1
    assert estimate_max_cost(0, 0, row(input="1", output="1"), ONE) == 0
    # input priced at the dearest of input / cache read / cache write
    assert estimate_max_cost(1, 0, row(input="1", cache_write="1.25"), ONE) == 1250


def test_explain_lists_classes_and_rounds_once() -> None:
    price = row(input="0.075", output="0.0001", version=42, model="gpt-x")
    out = explain(Usage(input=7, output=1, reasoning=1), price, Fraction(2, 3))
    assert out["model"] == "gpt-x" and out["price_version"] == 42
    by_class = {c["class"]: c for c in out["classes"]}
    assert by_class["input"] == {"class": "input", "tokens": 7, "usd_per_million": "0.075", "subtotal_usd": "0.000000525"}
    assert by_class["output"]["subtotal_usd"] == "0.0000000001"
    assert by_class["cache_read"]["tokens"] == 0
    assert out["subtotal_usd"] == "0.0000005251"
    assert out["multiplier"] == "2/3"
    assert out["exact_total_nano"] == "5251/15"
    assert out["exact_total_usd"] == "5251/15000000000"
    assert out["cost_nano"] == 350 and out["cost_usd"] == "0.00000035"
    assert out["reasoning_tokens"] == 1
    orjson.dumps(out)  # JSON-ready as is


# --- the book -------------------------------------------------------------------------------


def test_book_lookup_exact_then_default_then_unknown() -> None:
    book = PriceBook([row(input="1", model="a", version=1)])
    assert book.lookup("a").input == parse_usd("1")
    with pytest.raises(UnknownPrice, match=r"no price for model 'b' and no \"default\" price") as info:
        book.lookup("b")
    assert info.value.model == "b"
    book.apply([row(input="2", model="default", version=2)])
    assert book.lookup("b").model == "default"
    assert book.lookup("a").model == "a"
    assert book.last_version == 2


def test_book_newer_versions_replace_older_and_old_ones_stay_explainable() -> None:
    v1, v5, v3 = row(input="1", version=1), row(input="5", version=5), row(input="3", version=3)
    book = PriceBook([v1])
    book.apply([v5])
    book.apply([v3])  # arrives late: must not displace the newer version
    assert book.lookup("m") is v5
    assert book.by_version(1) is v1 and book.by_version(3) is v3
    assert book.by_version(99) is None
    assert book.last_version == 5


# --- versions in Postgres ------------------------------------------------------------------


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def test_sync_creates_versions_only_on_change(pg: asyncpg.Connection) -> None:
    a, b = _name("a"), _name("b")
    cfg = [(a, P("0.15", "0.60")), (b, P("3", "15", "0.3", "3.75"))]
    assert await sync_config_prices(pg, cfg) == 2
    assert await sync_config_prices(pg, cfg) == 0  # unchanged config: no version
    # same values spelled differently ("0.150", implicit cache = input) are no change
    assert await sync_config_prices(pg, [(a, P("0.150", "0.6", "0.15", ""))]) == 0
    assert await sync_config_prices(pg, [(a, P("0.15", "0.70")), cfg[1]]) == 1
    hist = await history(pg, a)
    assert [h.row.output for h in hist] == [700_000_000, 600_000_000]  # newest first
    assert hist[0].created_by == "config" and hist[0].row.version > hist[1].row.version
    assert len(await history(pg, b)) == 1


async def test_sync_writes_nothing_when_one_price_is_bad(pg: asyncpg.Connection) -> None:
    a = _name("a")
    with pytest.raises(ValueError, match="decimal"):
        await sync_config_prices(pg, [(a, P("1", "2")), (_name("b"), P("x", "1"))])
    assert await history(pg, a) == []


async def test_set_price_and_load_since(pg: asyncpg.Connection) -> None:
    m = _name("m")
    before = await load_since(pg, 0)
    since = max((r.version for r in before), default=0)
    v1 = await set_price(pg, m, P("1", "2"), "alice")
    assert v1.version > since and v1.model == m and v1.cache_read == v1.input
    assert await set_price(pg, m, P("1.0", "2"), "bob") == v1  # same price: no version
    v2 = await set_price(pg, m, P("1", "2", cache_read="0.1"), "bob")
    assert v2.version > v1.version and v2.cache_read == 100_000_000
    new = [r for r in await load_since(pg, since) if r.model == m]
    assert new == [v1, v2]
    assert await load_version(pg, v1.version) == v1
    assert await load_version(pg, -1) is None
    assert [(h.created_by, h.row) for h in await history(pg, m)] == [("bob", v2), ("alice", v1)]

    book = PriceBook(await load_since(pg, 0))
    assert book.lookup(m) == v2 and book.by_version(v1.version) == v1
    v3 = await set_price(pg, m, P("9", "9"), "carol")
    book.apply(await load_since(pg, book.last_version))
    assert book.lookup(m) == v3 and book.last_version >= v3.version


async def test_versions_are_append_only(pg: asyncpg.Connection) -> None:
    v = await set_price(pg, _name("m"), P("1", "1"), "t")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pg.execute("UPDATE prices SET input = 0 WHERE id = $1", v.version)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pg.execute("DELETE FROM prices WHERE id = $1", v.version)
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("INSERT INTO prices (model, input, output, cache_read, cache_write) VALUES ('x', -1, 0, 0, 0)")


async def test_writers_are_serialised_so_pollers_never_skip_a_version(pg: asyncpg.Connection, pg_dsn: str) -> None:
    """Any insert (plain SQL too) waits for an uncommitted one: ids become visible in order."""
    insert = (
        "INSERT INTO prices (model, input, output, cache_read, cache_write)"
        " VALUES ($1, 1, 1, 1, 1) RETURNING id"
    )
    other = await asyncpg.connect(pg_dsn)
    try:
        first, second = _name("first"), _name("second")
        tx = pg.transaction()
        await tx.start()
        first_id = await pg.fetchval(insert, first)
        late = asyncio.create_task(other.fetchval(insert, second))
        await asyncio.sleep(0.3)
        assert not late.done()  # blocked behind the open transaction, before drawing an id
        assert first not in await other_poll(pg_dsn, first_id - 1)
        await tx.commit()
        second_id = await asyncio.wait_for(late, 5)
        assert second_id > first_id
        assert {first, second} <= await other_poll(pg_dsn, first_id - 1)
    finally:
        await other.close()


async def other_poll(dsn: str, since: int) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r.model for r in await load_since(conn, since)}
    finally:
        await conn.close()


async def test_concurrent_starters_create_one_version(pg_dsn: str) -> None:
    m = _name("m")
    conns = [await asyncpg.connect(pg_dsn) for _ in range(4)]
    try:
        created = await asyncio.gather(*(sync_config_prices(c, [(m, P("1", "2"))]) for c in conns))
        assert sorted(created) == [0, 0, 0, 1]
        assert len(await history(conns[0], m)) == 1
    finally:
        for c in conns:
            await c.close()


async def test_new_version_is_announced(pg: asyncpg.Connection, pg_dsn: str) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    await pg.add_listener("tollway_prices", lambda _c, _pid, _ch, payload: got.put_nowait(payload))
    writer = await asyncpg.connect(pg_dsn)
    try:
        v = await set_price(writer, _name("m"), P("1", "1"), "t")
    finally:
        await writer.close()
    assert await asyncio.wait_for(got.get(), 5) == str(v.version)

"""Long-context price tiers (issue 19, Build item 8): a request whose input (every input
class) exceeds a price's threshold is billed entirely at the tier, admission reserves at
the tier whenever the input bound could exceed it, and the tier is part of the version.

Hostile first: the e2e tests send the priced `anthropic-beta: context-1m-…` flag through
a channel that lists it, with a balance that pays the base price but not the tier, and
check the books through the real worker, the bundled mock upstream and Postgres.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting import pricing, settlement
from accounting.money import parse_usd
from accounting.pricing import PriceRow, cost, cost_nano, estimate_max_cost, explain, tier_for
from accounting.records import Usage
from relay.config import ConfigError, Price, parse
from tests.gateway import Harness

M = 1_000_000_000  # nano-USD per USD
T = 200_000
# Claude Sonnet 4.5 with the 1M-context beta, as Anthropic publishes it.
SONNET = PriceRow(7, "claude-sonnet-4-5", 3 * M, 15 * M, 3 * M // 10, 375 * M // 100, 0.0,
                  T, 6 * M, 225 * M // 10, 6 * M // 10, 75 * M // 10)
BASE = PriceRow(8, "flat", 3 * M, 15 * M, 3 * M // 10, 375 * M // 100)
ONE = Fraction(1)


def by_hand(inp: int, cr: int, cw: int, out: int, tier: bool) -> Fraction:
    """The exact cost in nano-USD, from the published USD prices per 1M tokens, written out."""
    if tier:  # 6, 22.50, 0.60, 7.50
        usd = Fraction(inp * 6) + Fraction(out * 45, 2) + Fraction(cr * 6, 10) + Fraction(cw * 75, 10)
    else:  # 3, 15, 0.30, 3.75
        usd = Fraction(inp * 3) + Fraction(out * 15) + Fraction(cr * 3, 10) + Fraction(cw * 375, 100)
    return usd * M / 1_000_000


# --- the rule, exactly at its edges -----------------------------------------------------------


@pytest.mark.parametrize("total", [T - 1, T, T + 1])
@pytest.mark.parametrize("split", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 1, 1), (1, 5, 3)])
def test_threshold_minus_one_at_and_plus_one_with_all_four_classes(total: int, split: tuple[int, int, int]) -> None:
    # Split `total` input tokens over the three input classes (weights), plus output.
    parts = [total * w // sum(split) for w in split]
    parts[next(i for i, w in enumerate(split) if w)] += total - sum(parts)
    inp, cr, cw = parts
    u = Usage(input=inp, output=1234, cache_read=cr, cache_write=cw)
    tier = total > T  # exactly at the threshold is the base price
    expected = by_hand(inp, cr, cw, 1234, tier)
    nano, exact = cost(u, SONNET, ONE)
    assert exact == expected
    assert nano == (2 * expected.numerator + expected.denominator) // (2 * expected.denominator)
    assert cost_nano(u, SONNET, ONE) == nano
    assert settlement.charge(u, SONNET, ONE, None) == (nano, False)
    bill = explain(u, SONNET, ONE)
    assert bill["tier"] == ("long_context" if tier else "base")
    assert bill["long_context_threshold"] == T and bill["input_tokens_total"] == total
    assert bill["cost_nano"] == nano
    unit = {c["class"]: c["usd_per_million"] for c in bill["classes"]}
    assert unit == ({"input": "6", "output": "22.5", "cache_read": "0.6", "cache_write": "7.5"} if tier
                    else {"input": "3", "output": "15", "cache_read": "0.3", "cache_write": "3.75"})
    # A price without a tier never switches.
    assert cost(u, BASE, ONE)[1] == by_hand(inp, cr, cw, 1234, False)
    assert explain(u, BASE, ONE)["tier"] == "base"


def test_the_whole_request_moves_to_the_tier_output_included() -> None:
    under = cost_nano(Usage(input=T, output=1_000_000), SONNET, ONE)
    over = cost_nano(Usage(input=T + 1, output=1_000_000), SONNET, ONE)
    assert under == 3 * M * T // 1_000_000 + 15 * M
    assert over == 6 * M * (T + 1) // 1_000_000 + 225 * M // 10


def test_a_multiplier_scales_the_tier_too() -> None:
    u = Usage(input=T + 1, output=7, cache_read=3, cache_write=5)
    two_thirds = Fraction(2, 3)
    nano, exact = cost(u, SONNET, two_thirds)
    assert exact == by_hand(T + 1, 3, 5, 7, True) * two_thirds
    assert cost_nano(u, SONNET, two_thirds) == nano


def test_the_tier_row_is_built_once_and_has_no_tier_of_its_own() -> None:
    tier = SONNET.long_context
    assert tier is not None and tier.long_context is None and tier.long_context_threshold == 0
    assert (tier.version, tier.model, tier.input, tier.output) == (7, "claude-sonnet-4-5", 6 * M, 225 * M // 10)
    assert BASE.long_context is None
    assert tier_for(SONNET, T) is SONNET and tier_for(SONNET, T + 1) is tier
    assert tier_for(BASE, 10**9) is BASE
    assert SONNET == PriceRow(*[getattr(SONNET, f) for f in (
        "version", "model", "input", "output", "cache_read", "cache_write", "effective_at",
        "long_context_threshold", *pricing.LONG_CONTEXT_CLASSES)])


# --- reservation --------------------------------------------------------------------------------


def test_a_bound_above_the_threshold_reserves_at_the_tier() -> None:
    # Dearest input class at the tier is cache write (7.50), output 22.50.
    assert estimate_max_cost(T, 1000, SONNET, ONE) == estimate_max_cost(T, 1000, BASE, ONE)
    assert estimate_max_cost(T + 1, 1000, SONNET, ONE) == -(-((T + 1) * 75 * M // 10 + 1000 * 225 * M // 10)
                                                           // 1_000_000)


@settings(max_examples=400, deadline=None)
@given(bound=st.integers(0, 3 * T), max_out=st.integers(0, 200_000),
       weights=st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)),
       used=st.integers(0, 3 * T), out=st.integers(0, 200_000),
       mult=st.sampled_from([Fraction(1), Fraction(2, 3), Fraction(4, 5), Fraction(7, 3)]))
def test_the_reservation_covers_any_bill_its_bounds_allow(
        bound: int, max_out: int, weights: tuple[int, int, int], used: int, out: int,
        mult: Fraction) -> None:
    # Any usage within the bounds (input <= the input bound, output <= the output bound),
    # however the upstream splits the input over its cache classes, costs no more than
    # was reserved: settlement never needs its cap, and nothing overdraws.
    used, out = min(used, bound), min(out, max_out)
    w = sum(weights) or 1
    inp, cr = used * weights[0] // w, used * weights[1] // w
    u = Usage(input=inp, output=out, cache_read=cr, cache_write=used - inp - cr)
    reserve = estimate_max_cost(bound, max_out, SONNET, mult)
    assert cost_nano(u, SONNET, mult) <= reserve
    assert settlement.charge(u, SONNET, mult, reserve) == (cost_nano(u, SONNET, mult), False)


# --- the price model's rules ------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"long_context_input": 6 * M, "long_context_output": 22 * M}, "long_context_threshold: required"),
    ({"long_context_threshold": T, "long_context_input": 2 * M, "long_context_output": 22 * M,
      "long_context_cache_read": M, "long_context_cache_write": 4 * M}, "long_context_input: must be at least"),
    ({"long_context_threshold": T, "long_context_input": 6 * M, "long_context_output": 22 * M,
      "long_context_cache_read": 0, "long_context_cache_write": 4 * M}, "long_context_cache_read: must be at least"),
    ({"long_context_threshold": -1}, "long_context_threshold: expected 0"),
    ({"long_context_threshold": 10**12}, "long_context_threshold: expected 0"),
])
def test_a_tier_that_could_undercut_or_is_half_given_is_refused(fields: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PriceRow(1, "m", 3 * M, 15 * M, 3 * M // 10, 375 * M // 100, 0.0, **fields)


def cfg_price(**kw: Any) -> dict[str, Any]:
    return {"prices": {"claude-sonnet-4-5": {"input": "3", "output": "15", "cache_read": "0.30",
                                             "cache_write": "3.75", **kw}}}


def test_config_round_trip() -> None:
    cfg = parse(cfg_price(long_context_threshold=200000, long_context_input="6",
                          long_context_output="22.50", long_context_cache_read="0.60",
                          long_context_cache_write="7.50"))
    ((model, price),) = cfg.prices
    row = pricing.row_from_price(model, price, 7)
    assert row == SONNET
    # Empty long-context cache prices default to the long-context input price.
    cfg = parse(cfg_price(long_context_threshold=200000, long_context_input="6",
                          long_context_output="22.50"))
    row = pricing.row_from_price(*cfg.prices[0])
    assert (row.long_context_cache_read, row.long_context_cache_write) == (6 * M, 6 * M)
    # No tier: the threshold is 0 and so is every long-context price.
    row = pricing.row_from_price(*parse(cfg_price()).prices[0])
    assert row.long_context is None and row.long_context_threshold == 0


@pytest.mark.parametrize(("kw", "path"), [
    ({"long_context_threshold": 200000}, "prices.claude-sonnet-4-5.long_context_input"),
    ({"long_context_input": "6", "long_context_output": "22.5"}, "prices.claude-sonnet-4-5.long_context_threshold"),
    ({"long_context_threshold": 200000, "long_context_input": "6", "long_context_output": "-1"},
     "prices.claude-sonnet-4-5.long_context_output"),
    ({"long_context_threshold": 200000, "long_context_input": "1", "long_context_output": "22.5"},
     "prices.claude-sonnet-4-5.long_context_input"),
    ({"long_context_threshold": "200000"}, "prices.claude-sonnet-4-5.long_context_threshold"),
    ({"long_context_threshold": 200000, "long_context_input": 6, "long_context_output": "22.5"},
     "prices.claude-sonnet-4-5.long_context_input"),
    ({"long_context_threshold": 200000, "long_context_input": "6", "long_context_output": "22.5",
      "long_context_cache_reed": "1"}, "prices.claude-sonnet-4-5.long_context_cache_reed"),
])
def test_config_errors_name_their_toml_path(kw: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        parse(cfg_price(**kw))


# --- versions keep their tier -----------------------------------------------------------------


async def test_price_versions_keep_their_tier(pg: asyncpg.Connection) -> None:
    model = "claude-versions-lc"
    tiered = Price(input="3", output="15", long_context_threshold=T, long_context_input="6",
                   long_context_output="22.5")
    v1 = await pricing.set_price(pg, model, tiered, "test")
    assert v1.long_context is not None and v1.long_context_threshold == T
    # Only the tier changes: a new version all the same.
    v2 = await pricing.set_price(pg, model, Price(input="3", output="15"), "test")
    assert v2.version > v1.version and v2.long_context is None
    assert (await pricing.set_price(pg, model, Price(input="3", output="15"), "test")).version == v2.version
    # An old request is explained (and would be charged) by its own version: the tier it had.
    old = await pricing.load_version(pg, v1.version)
    assert old == v1 and old is not None and old.long_context == v1.long_context
    u = Usage(input=T + 1, output=10)
    assert explain(u, old, ONE)["tier"] == "long_context"
    assert explain(u, v2, ONE)["tier"] == "base"
    book = pricing.PriceBook(await pricing.load_since(pg, 0))
    assert book.lookup(model).version == v2.version
    by_v1 = book.by_version(v1.version)
    assert by_v1 is not None and cost_nano(u, by_v1, ONE) == (6 * (T + 1) + 225) * M // 1_000_000  # 10 output at 22.50
    # The database refuses a half-given tier too (a writer that is not this module).
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("INSERT INTO prices (model, input, output, cache_read, cache_write,"
                         " long_context_input) VALUES ('x', 1, 1, 1, 1, 5)")


async def test_config_sync_stores_a_new_version_when_only_the_tier_changes(pg: asyncpg.Connection) -> None:
    model = "claude-sync-lc"
    base = Price(input="3", output="15")
    assert await pricing.sync_config_prices(pg, [(model, base)]) == 1
    tiered = Price(input="3", output="15", long_context_threshold=T, long_context_input="6",
                   long_context_output="22.5")
    assert await pricing.sync_config_prices(pg, [(model, tiered)]) == 1
    assert await pricing.sync_config_prices(pg, [(model, tiered)]) == 0
    (cur,) = [r for r in await pricing.current_all(pg) if r.model == model]
    assert cur.long_context_threshold == T


# --- end to end: the worker, the mock, Postgres -------------------------------------------------

LT = 2000  # a small threshold keeps the bodies small; the rule is the same at 200,000
TIER_PRICES = {"input": "3", "output": "15", "cache_read": "0.30", "cache_write": "3.75",
               "long_context_threshold": LT, "long_context_input": "6",
               "long_context_output": "22.50", "long_context_cache_read": "0.60",
               "long_context_cache_write": "7.50"}
MODEL = "claude-sonnet-4-5"
FLAG = "context-1m-2025-08-07"
TOKEN = "admin-test-token-long-context-0123"


@pytest.fixture
async def gw(pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    h = await Harness().start(
        pg_dsn, admin={"token": TOKEN}, prices={MODEL: TIER_PRICES},
        channels=[
            {"name": "mock-openai", "protocol": "openai", "base_url": "http://127.0.0.1:{port}/v1",
             "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["gpt-*"]},
            {"name": "anthropic-1m", "protocol": "anthropic", "base_url": "http://127.0.0.1:{port}",
             "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["claude-*"],
             "anthropic_beta": [FLAG, "interleaved-thinking-2025-05-14"]},
        ])
    yield h
    await h.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


def long_prompt() -> str:
    # About 2,700 tokens of text in 13,500 bytes: above LT by the byte bound and by the
    # tight count (a Claude model's count is raised by half), so no path reserves base.
    return "lorem ipsum dolor sit amet " * 500


async def send(http: aiohttp.ClientSession, gw: Harness, path: str, body: dict[str, Any], secret: str,
               headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    hdrs = {"x-api-key": secret, "authorization": f"Bearer {secret}", "content-type": "application/json",
            "anthropic-version": "2023-06-01", "anthropic-beta": FLAG, **(headers or {})}
    async with http.post(gw.url + path, data=orjson.dumps(body), headers=hdrs) as r:
        raw = await r.read()
        try:
            return r.status, orjson.loads(raw), r.headers["x-request-id"]
        except orjson.JSONDecodeError:
            return r.status, raw, r.headers["x-request-id"]


async def db_fetch(gw: Harness, sql: str, *args: Any) -> list[asyncpg.Record]:
    await gw.flush()
    conn = await asyncpg.connect(gw.dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_context_1m_on_a_balance_for_base_but_not_the_tier_is_402_not_an_overdraft(
        gw: Harness, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "max_tokens": 1000,
            "messages": [{"role": "user", "content": long_prompt()}]}
    # Counted tightly (3,851 tokens: a Claude model's count is raised by half), the
    # reservation at the tier is 0.0514 USD (input at the dearest class, 7.50, and 1,000
    # output at 22.50); at the base prices it is 0.0294. 0.04 USD pays base, not the tier.
    user_id, key_id, secret = await gw.user_and_key(balance="0.04")
    gw.mock.stats.requests_total = 0
    # The mock reports whatever input it is told: a client-chosen figure must not matter.
    status, obj, _ = await send(http, gw, "/v1/messages", body, secret,
                                {"x-mock-input-tokens": str(LT + 1)})
    assert status == 402, obj
    assert obj["error"]["type"] == "billing_error" and "needs" in obj["error"]["message"]
    # Translated route to the same channel: same answer.
    status, obj, _ = await send(http, gw, "/v1/chat/completions", body, secret)
    assert status == 402 and obj["error"]["code"] == "insufficient_quota", obj
    assert gw.mock.stats.requests_total == 0
    # The same body to a model with the same base prices and no tier is affordable, and a
    # short prompt to the tiered model is base-priced and served, with the flag passed.
    status, obj, _ = await send(http, gw, "/v1/messages", {**body, "model": "claude-sonnet-4-6"},
                                secret)
    assert status == 200, obj
    short = {**body, "messages": [{"role": "user", "content": "hi"}]}
    status, obj, _ = await send(http, gw, "/v1/messages", short, secret)
    assert status == 200, obj
    assert FLAG in gw.mock.stats.last_headers["anthropic-beta"]
    (bal,) = await db_fetch(gw, "SELECT balance_nano FROM users WHERE id = $1", user_id)
    assert 0 <= bal["balance_nano"] < parse_usd("0.04")
    rows = await db_fetch(gw, "SELECT status, usage_source, cost_nano FROM usage_log"
                              " WHERE key_id = $1 ORDER BY ts", key_id)
    assert [(r["status"], r["usage_source"]) for r in rows] == [
        (402, "none"), (402, "none"), (200, "upstream"), (200, "upstream")]
    assert rows[0]["cost_nano"] == rows[1]["cost_nano"] == 0


@pytest.mark.parametrize(("path", "stream"), [
    ("/v1/messages", False), ("/v1/messages", True), ("/v1/chat/completions", False),
    ("/v1/chat/completions", True),
])
@pytest.mark.parametrize("total", [LT - 1, LT, LT + 1])
async def test_billed_at_the_tier_only_above_the_threshold_on_every_path(
        gw: Harness, http: aiohttp.ClientSession, path: str, stream: bool, total: int) -> None:
    user_id, key_id, secret = await gw.user_and_key(balance="5")
    cached, written = 500, 300
    body = {"model": MODEL, "max_tokens": 1000, "stream": stream,
            "messages": [{"role": "user", "content": long_prompt()}]}
    if stream and path == "/v1/chat/completions":
        body["stream_options"] = {"include_usage": True}
    status, obj, rid = await send(http, gw, path, body, secret, {
        "x-mock-input-tokens": str(total), "x-mock-cached-tokens": str(cached),
        "x-mock-cache-write-tokens": str(written), "x-mock-chunks": "40"})
    assert status == 200, obj
    (row,) = await db_fetch(gw, "SELECT * FROM usage_log WHERE key_id = $1", key_id)
    inp, cr, cw, out = (row["input_tokens"], row["cache_read_tokens"], row["cache_write_tokens"],
                        row["output_tokens"])
    assert (inp + cr + cw, cr, cw) == (total, cached, written)
    assert row["usage_source"] == "upstream"  # never capped: the reservation covered the tier
    expected = by_hand(inp, cr, cw, out, total > LT)
    assert row["cost_nano"] == (2 * expected.numerator + expected.denominator) // (2 * expected.denominator)
    (bal,) = await db_fetch(gw, "SELECT balance_nano FROM users WHERE id = $1", user_id)
    assert bal["balance_nano"] == parse_usd("5") - row["cost_nano"]
    # The operator's bill (and the key holder's, the same explain) says which tier applied.
    async with http.get(f"{gw.url}/admin/v1/requests/{rid}",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        shown = await r.json()
    assert r.status == 200, shown
    assert shown["bill"]["tier"] == ("long_context" if total > LT else "base")
    assert shown["bill"]["matches_charged"] is True


@pytest.mark.parametrize(("fields", "name"), [
    ({"long_context_threshold": -1}, "long_context_threshold"),
    ({"long_context_threshold": 10**12, "long_context_input": "6", "long_context_output": "22.5"},
     "long_context_threshold"),
    ({"long_context_threshold": True, "long_context_input": "6", "long_context_output": "22.5"},
     "long_context_threshold"),
    ({"long_context_threshold": "200000", "long_context_input": "6", "long_context_output": "22.5"},
     "long_context_threshold"),
    ({"long_context_threshold": 200000.0, "long_context_input": "6", "long_context_output": "22.5"},
     "long_context_threshold"),
    ({"long_context_threshold": 200000}, "long_context_input"),
    ({"long_context_input": "6", "long_context_output": "22.5"}, "long_context_threshold"),
    ({"long_context_threshold": 200000, "long_context_input": 6, "long_context_output": "22.5"},
     "long_context_input"),
    ({"long_context_threshold": 200000, "long_context_input": "-6", "long_context_output": "22.5"},
     "long_context_input"),
    ({"long_context_threshold": 200000, "long_context_input": "6", "long_context_output": "1e30"},
     "long_context_output"),
    ({"long_context_threshold": 200000, "long_context_input": "6", "long_context_output": "22.5",
      "long_context_cache_write": "0.0000000001"}, "long_context_cache_write"),
    ({"long_context_threshold": 200000, "long_context_input": "2", "long_context_output": "22.5"},
     "long_context_input"),
    ({"long_context_threshold": 200000, "long_context_input": "6", "long_context_output": "22.5",
      "long_context_cache_read": "0.1"}, "long_context_cache_read"),
])
async def test_admin_api_refuses_bad_tiers_with_a_400_in_its_error_shape(
        gw: Harness, http: aiohttp.ClientSession, fields: dict[str, Any], name: str) -> None:
    body = {"model": "claude-api-lc", "input": "3", "output": "15", "cache_read": "0.3", **fields}
    async with http.post(f"{gw.url}/admin/v1/prices", data=orjson.dumps(body),
                         headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        obj = await r.json()
    assert r.status == 400, obj
    assert set(obj) == {"error"} and name in obj["error"]["message"], obj
    async with http.get(f"{gw.url}/admin/v1/prices/history?model=claude-api-lc",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert (await r.json())["data"] == []


async def test_admin_api_sets_and_shows_a_tier(gw: Harness, http: aiohttp.ClientSession) -> None:
    hdrs = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "claude-api-ok", "input": "3", "output": "15", "long_context_threshold": 200000,
            "long_context_input": "6", "long_context_output": "22.50"}
    async with http.post(f"{gw.url}/admin/v1/prices", data=orjson.dumps(body), headers=hdrs) as r:
        p = await r.json()
    assert r.status == 201, p
    assert p["long_context_threshold"] == 200000 and p["long_context_output_usd"] == "22.5"
    assert p["long_context_cache_read_nano"] == p["long_context_input_nano"] == 6 * M
    async with http.post(f"{gw.url}/admin/v1/prices", data=orjson.dumps(body), headers=hdrs) as r:
        same = await r.json()
    assert r.status == 200 and same["version"] == p["version"] and same["created"] is False
    async with http.get(f"{gw.url}/admin/v1/prices?model=claude-api-ok", headers=hdrs) as r:
        (cur,) = (await r.json())["data"]
    assert cur["long_context_threshold"] == 200000

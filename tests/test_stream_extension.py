"""Mid-stream reservation extension (relay.credit): an upstream that overruns the bound it
was sent is extended while the key cap and the balance or plan allow it, otherwise ended
with one error event in the client's protocol; no scope ever goes below zero.

Through the real worker, the bundled mock upstream (`x-mock-overrun`: it ignores the
bound) and Postgres; shared mode against the real Redis.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting import plans
from accounting.money import parse_usd
from accounting.pricing import cost_nano
from accounting.records import Usage
from relay.call import ONE
from relay.credit import EXTEND_MIN_TOKENS, MAX_EXTENSIONS, OutputCredit
from tests.gateway import Harness
from tests.test_money_hostile import balance, rows, send

MSG = [{"role": "user", "content": "hi"}]
REDIS = "redis://127.0.0.1:6379/0"

# (path, model, auth header) per client protocol; the mock's text is "hello " per token.
ROUTES = {
    "chat": ("/v1/chat/completions", "gpt-4o-mini"),
    "messages": ("/v1/messages", "claude-sonnet-4-6"),
}


def overrun(chunks: int) -> dict[str, str]:
    return {"x-mock-overrun": "true", "x-mock-chunks": str(chunks), "x-mock-tokens-per-chunk": "1"}


async def stream(http: aiohttp.ClientSession, gw: Harness, route: str, secret: str,
                 chunks: int, max_tokens: int = 30, delay_ms: float = 0) -> tuple[int, bytes]:
    path, model = ROUTES[route]
    body = {"model": model, "max_tokens": max_tokens, "messages": MSG, "stream": True}
    headers = {"x-api-key": secret, **overrun(chunks)}
    if delay_ms:
        headers["x-mock-delay-ms"] = str(delay_ms)
    status, raw, _ = await send(http, gw, path, body, secret, headers)
    assert isinstance(raw, bytes), raw
    return status, raw


def delivered(raw: bytes) -> int:
    """Text deltas the client received (one token each)."""
    return raw.count(b"hello ")


def error_events(raw: bytes, route: str) -> int:
    if route == "messages":
        return raw.count(b"event: error\ndata: ")
    return raw.count(b'data: {"error":')


def exact_cost(gw: Harness, model: str, row: asyncpg.Record) -> int:
    assert gw.worker is not None and gw.worker.gw is not None
    price = gw.worker.gw.pricebook.lookup(model)
    u = Usage(input=row["input_tokens"], output=row["output_tokens"],
              cache_read=row["cache_read_tokens"], cache_write=row["cache_write_tokens"])
    return cost_nano(u, price, ONE)


async def key_spent(gw: Harness, key_id: int) -> int:
    await gw.flush()
    conn = await asyncpg.connect(gw.dsn)
    try:
        return int(await conn.fetchval("SELECT spent_nano FROM keys WHERE id = $1", key_id))
    finally:
        await conn.close()


@pytest.fixture
async def gw(pg_dsn: str):
    h = await Harness().start(pg_dsn)
    yield h
    await h.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


# --- (a) a balance that covers the overrun: extended, completed, billed exactly ----------------


@pytest.mark.parametrize("route", ["chat", "messages"])
async def test_an_overrun_the_balance_covers_completes_billed_exactly(
        gw: Harness, http: aiohttp.ClientSession, route: str) -> None:
    user_id, key_id, secret = await gw.user_and_key(balance="10")
    status, raw = await stream(http, gw, route, secret, chunks=1500)  # 50 x the 30 asked for
    assert status == 200
    assert error_events(raw, route) == 0
    assert delivered(raw) == 1500
    (row,) = await rows(gw, key_id)
    # The mock's own report, not the reservation: the extensions covered it.
    assert row["usage_source"] == "upstream"
    assert row["output_tokens"] == 1500
    assert row["cost_nano"] == exact_cost(gw, ROUTES[route][1], row)
    assert await balance(gw, user_id) == parse_usd("10") - row["cost_nano"]


# --- (b) a balance that does not: cut with one error event, billed what was emitted -----------


@pytest.mark.parametrize("route", ["chat", "messages"])
async def test_an_overrun_past_the_balance_is_cut_with_one_error_event(
        gw: Harness, http: aiohttp.ClientSession, route: str) -> None:
    # gpt-4o-mini: 0.60 USD/M output, sonnet: 15 USD/M; each balance affords about 700
    # output tokens past the admission's reservation, far under the 20,000 sent.
    funds = "0.0005" if route == "chat" else "0.012"
    user_id, key_id, secret = await gw.user_and_key(balance=funds)
    status, raw = await stream(http, gw, route, secret, chunks=20_000)
    assert status == 200
    assert error_events(raw, route) == 1
    tail = raw.rstrip().rsplit(b"\n\n", 1)[-1]
    assert (b"billing_error" if route == "messages" else b"insufficient_quota") in tail
    got = delivered(raw)
    # Extended past the first reservation (30 tokens plus slack), then ended.
    assert 300 < got < 2000
    (row,) = await rows(gw, key_id)
    assert row["usage_source"] in ("estimated", "capped")
    assert abs(row["output_tokens"] - got) <= got // 10 + 8  # billed for what was emitted
    assert 0 < row["cost_nano"] <= parse_usd(funds)
    assert await balance(gw, user_id) >= 0


# --- (c) a key cap blocks the extension the balance would allow ------------------------------


async def test_a_key_cap_blocks_the_extension_the_balance_allows(
        gw: Harness, http: aiohttp.ClientSession) -> None:
    # The admission (about 0.001 USD: the body's bytes and 30 tokens at sonnet's price)
    # fits the cap; a block of 256 more output tokens (0.004 USD) does not.
    user_id, key_id, secret = await gw.user_and_key(balance="10", cap_nano=parse_usd("0.002"))
    status, raw = await stream(http, gw, "messages", secret, chunks=5000)
    assert status == 200 and error_events(raw, "messages") == 1
    assert delivered(raw) < 400  # cut near the first reservation's slack, not extended
    assert await key_spent(gw, key_id) <= parse_usd("0.002")
    # The same user's uncapped key: the balance allows it, the stream completes.
    conn = await asyncpg.connect(gw.dsn)
    try:
        from accounting import store

        _, other = await store.create_key(conn, user_id, name="open")
    finally:
        await conn.close()
    status, raw = await stream(http, gw, "messages", other, chunks=1500)
    assert status == 200 and error_events(raw, "messages") == 0 and delivered(raw) == 1500
    assert await balance(gw, user_id) >= 0


# --- (d) a plan-bound key extends on the plan's credit ---------------------------------------


async def plan_key(gw: Harness, credit: str, user_balance: str) -> tuple[int, int, str]:
    conn = await asyncpg.connect(gw.dsn)
    try:
        from accounting import store

        uid = await store.create_user(conn, f"p_{id(conn):x}", parse_usd(user_balance))
        p = await plans.create_plan(conn, f"plan_{id(conn):x}", parse_usd(credit), "month")
        sub, _, secret = await plans.subscribe(conn, uid, p.id, datetime.now(UTC),
                                               balance_fallback=False)
    finally:
        await conn.close()
    return uid, sub.id, secret


async def plan_used(gw: Harness, sub_id: int) -> int:
    await gw.flush()
    conn = await asyncpg.connect(gw.dsn)
    try:
        return (await plans.get_subscription(conn, sub_id)).used_nano
    finally:
        await conn.close()


async def test_a_plan_bound_key_extends_on_its_plan_and_never_past_it(
        gw: Harness, http: aiohttp.ClientSession) -> None:
    uid, sub_id, secret = await plan_key(gw, credit="1", user_balance="0")
    status, raw = await stream(http, gw, "messages", secret, chunks=1500)
    assert status == 200 and error_events(raw, "messages") == 0 and delivered(raw) == 1500
    used = await plan_used(gw, sub_id)
    assert 1500 * 15_000 < used < parse_usd("1")
    assert await balance(gw, uid) == 0  # the plan paid, not the balance
    # A plan whose credit the overrun outruns: cut, the plan never below zero.
    uid, sub_id, secret = await plan_key(gw, credit="0.012", user_balance="5")
    status, raw = await stream(http, gw, "messages", secret, chunks=20_000)
    assert status == 200 and error_events(raw, "messages") == 1
    assert 300 < delivered(raw) < 2000
    assert 0 < await plan_used(gw, sub_id) <= parse_usd("0.012")
    assert await balance(gw, uid) == parse_usd("5")  # no fallback: the balance is untouched


# --- (e) shared mode: the slice this worker holds -------------------------------------------


async def test_shared_mode_extends_from_the_held_slice_and_never_overdraws(pg_dsn: str) -> None:
    probe = aioredis.from_url(REDIS, socket_connect_timeout=1)
    try:
        await probe.ping()
    except Exception:
        pytest.skip("no Redis at 127.0.0.1:6379")
    finally:
        await probe.aclose()
    h = await Harness().start(pg_dsn, limits={"redis_url": REDIS})
    try:
        async with aiohttp.ClientSession() as http:
            uid, key_id, secret = await h.user_and_key(balance="10")
            # Paced as a provider streams (the mock at full speed sends 1,500 tokens in
            # a few ms): a grant the worker's slice lacks is fetched from Redis in the
            # background while the stream runs on the part of its reservation left.
            status, raw = await stream(http, h, "messages", secret, chunks=800, delay_ms=1)
            assert status == 200 and error_events(raw, "messages") == 0
            (row,) = await rows(h, key_id)
            assert row["usage_source"] == "upstream" and row["output_tokens"] == 800
            assert row["cost_nano"] == exact_cost(h, "claude-sonnet-4-6", row)
            uid, key_id, secret = await h.user_and_key(balance="0.012")
            status, raw = await stream(http, h, "messages", secret, chunks=20_000)
            assert status == 200 and error_events(raw, "messages") == 1
            assert delivered(raw) < 2000
            assert await balance(h, uid) >= 0
    finally:
        await h.stop()


# --- checkpoints (the kill -9 replay's rows) follow the extended reservation -----------------


async def test_checkpoints_of_an_extended_stream_bill_what_it_emitted(pg_dsn: str) -> None:
    from tests.test_checkpoints import Recorder, until

    h = await Harness().start(pg_dsn)
    try:
        _, _, secret = await h.user_and_key(balance="10")
        gw = h.worker.gw  # type: ignore[union-attr]
        rec_ledger = Recorder(gw.ledger)
        gw.ledger = rec_ledger
        gw.checkpoints._ledger = rec_ledger
        gw.checkpoints._interval = 0.05
        async with aiohttp.ClientSession() as http:
            status, raw = await stream(http, h, "messages", secret, chunks=600, delay_ms=1.5)
        assert status == 200 and error_events(raw, "messages") == 0
        await until(lambda: bool(rec_ledger.settled))
        (final,) = rec_ledger.settled
        price = gw.pricebook.lookup("claude-sonnet-4-6")
        marks = rec_ledger.checkpoints
        assert len(marks) >= 5
        slack = 30 + 30 // 4 + 64  # the first reservation's count limit
        past = [c for c in marks if c[15] > slack + 50]
        assert len(past) >= 3
        for c in past:
            # Past the first grant each checkpoint bills its output so far at the price:
            # the grants keep the reservation ahead of it, so none is capped at the
            # first reservation. (Within that reservation's slack an overrun is billed
            # the reservation, as before: relay.credit.)
            u = Usage(input=c[14], output=c[15], cache_read=c[16], cache_write=c[17])
            assert c[19] == "interrupted" and c[20] == cost_nano(u, price, ONE)
        assert [c[20] for c in marks] == sorted(c[20] for c in marks)
        assert final[19] == "upstream" and final[15] == 600
    finally:
        await h.stop()


# --- the bound on extensions ----------------------------------------------------------------


async def test_a_runaway_upstream_is_ended_after_the_last_extension(
        gw: Harness, http: aiohttp.ClientSession) -> None:
    user_id, key_id, secret = await gw.user_and_key(balance="10")
    status, raw = await stream(http, gw, "messages", secret, chunks=50_000)
    assert status == 200 and error_events(raw, "messages") == 1
    most = 30 + 30 // 4 + 64 + (MAX_EXTENSIONS + 1) * EXTEND_MIN_TOKENS
    assert delivered(raw) < most
    (row,) = await rows(gw, key_id)
    assert row["cost_nano"] <= parse_usd("0.05")
    assert await balance(gw, user_id) >= 0


# --- the credit on its own (pure) --------------------------------------------------------------


class FakeLease:
    def __init__(self, room: int) -> None:
        self.room = room
        self.reserve = -1000
        self.calls: list[int] = []

    def extend(self, extra: int) -> bool:
        self.calls.append(extra)
        if extra > self.room:
            return False
        self.room -= extra
        self.reserve -= extra
        return True


def terms(lease: Any, price: Any) -> tuple[Any, Any, Any]:
    """What a credit extends with: the lease, the price, the group multiplier."""
    return (lease, price, ONE)


def events(n: int) -> list[bytes]:
    return [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"hello "}}\n\n'] * n


def price() -> Any:
    from accounting.pricing import PriceRow

    return PriceRow(model="m", version=1, input=0, output=1_000_000_000, cache_read=0, cache_write=0)


def run(credit: OutputCredit, total: int, per: int = 5) -> tuple[int, bool]:
    """Feed `total` events in reads of `per`, checking as the exchange does; (sent, cut)."""
    sent, pending, nxt = 0, [], credit.first_step()
    for _ in range(total // per):
        chunk = b"".join(events(per))
        pending.append(chunk)
        sent += len(chunk)
        if sent > nxt:
            step = credit.count(pending, sent)
            pending = []
            if step < 0:
                step = credit.extend(sent)
                if step < 0:
                    return sent, True
            nxt = sent + step
    return sent, False


def test_without_a_lease_or_price_the_credit_cuts_as_before() -> None:
    credit = OutputCredit("anthropic", "messages", 30)
    _, cut = run(credit, 2000)
    assert cut and credit.counted < 400


def test_grants_are_halved_down_to_the_minimum_when_refused() -> None:
    lease = FakeLease(room=3000 * 1000)  # 1,000 nano-USD per output token: 3,000 tokens
    credit = OutputCredit("anthropic", "messages", 4096, terms(lease, price()))
    _, cut = run(credit, 30_000, per=50)
    assert cut
    # The first count past the limit (about 5,200) asks for what passed the 4,096
    # reserved plus a grant: 4,096 and 2,048 did not fit, 1,024 did.
    asked = [c // 1000 for c in lease.calls]
    assert asked[0] - asked[1] == 2048 and asked[1] - asked[2] == 1024
    # Then, a quarter of a grant before the reservation ran out, a 512-token grant
    # fitted what was left; nothing more did, down to the least grant.
    assert credit.extensions == 2 and asked[3:7] == [4096, 2048, 1024, 512]
    assert lease.room < EXTEND_MIN_TOKENS * 1000
    assert credit.counted <= credit.cut + 64


def test_an_honest_stream_never_asks_for_more() -> None:
    lease = FakeLease(room=10**12)
    credit = OutputCredit("anthropic", "messages", 2000, terms(lease, price()))
    _, cut = run(credit, 2000)
    assert not cut and lease.calls == [] and credit.extensions == 0


def test_a_long_context_price_extends_at_its_tier() -> None:
    from accounting.pricing import PriceRow

    tiered = PriceRow(model="m", version=1, input=0, output=1_000_000_000, cache_read=0,
                      cache_write=0, long_context_threshold=1000,
                      long_context_output=3_000_000_000)
    lease = FakeLease(room=10**12)
    credit = OutputCredit("anthropic", "messages", 300, terms(lease, tiered))
    run(credit, 2000, per=5)
    assert credit.extensions >= 1
    grant = lease.calls[0]
    # 3,000 nano-USD per token (the tier's output), not the base's 1,000.
    assert grant % 3000 == 0 and grant // 3000 >= EXTEND_MIN_TOKENS

"""Redemption codes against a real Postgres: hashed at rest, credited exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from accounting import codes


async def make_user(pg: asyncpg.Connection, balance: int = 0) -> int:
    return int(await pg.fetchval(
        "INSERT INTO users (name, balance_nano) VALUES ($1, $2) RETURNING id",
        f"codes-{uuid.uuid4().hex[:12]}", balance))


async def test_codes_are_stored_hashed_and_redeem_once(pg: asyncpg.Connection) -> None:
    uid = await make_user(pg, 5)
    made = await codes.create_codes(pg, 2_500_000_000, 3)
    assert len(set(made)) == 3 and all(c.startswith("TW-") and len(c) == 22 for c in made)
    stored = await pg.fetch(
        "SELECT code_hash, prefix, batch_id FROM redemption_codes WHERE code_hash = ANY($1)",
        [codes.code_hash(c) for c in made])
    assert len(stored) == 3 and len({r["batch_id"] for r in stored}) == 1
    dump = str([dict(r) for r in await pg.fetch("SELECT * FROM redemption_codes")])
    assert all(c not in dump and c.replace("-", "") not in dump for c in made)
    # Typed back sloppily (lower case, spaces) it is the same code.
    sloppy = " " + made[0].lower().replace("-", " ") + " "
    assert await codes.redeem(pg, sloppy, uid) == 2_500_000_000
    assert await pg.fetchval("SELECT balance_nano FROM users WHERE id = $1", uid) == 2_500_000_005
    with pytest.raises(codes.CodeAlreadyRedeemed):
        await codes.redeem(pg, made[0], uid)
    topups = await pg.fetch("SELECT amount_nano, note FROM topups WHERE user_id = $1", uid)
    assert [t["amount_nano"] for t in topups] == [2_500_000_000]
    assert made[0] not in topups[0]["note"]  # only the display prefix


async def test_unknown_expired_and_bad_user_are_clear_errors(pg: asyncpg.Connection) -> None:
    uid = await make_user(pg)
    with pytest.raises(codes.CodeNotFound):
        await codes.redeem(pg, "TW-AAAA-BBBB-CCCC-DDDD", uid)
    past = datetime.now(UTC) - timedelta(seconds=1)
    (old,) = await codes.create_codes(pg, 10, 1, expires_at=past)
    with pytest.raises(codes.CodeExpired):
        await codes.redeem(pg, old, uid)
    (good,) = await codes.create_codes(pg, 10, 1, expires_at=past + timedelta(days=1))
    with pytest.raises(codes.UnknownUser):
        await codes.redeem(pg, good, 10**15)
    # The failed attempt rolled back: the code is still there for a real user.
    assert await codes.redeem(pg, good, uid) == 10
    with pytest.raises(ValueError):
        await codes.create_codes(pg, 0, 1)


async def test_twenty_concurrent_redeemers_credit_once(pg: asyncpg.Connection, pg_dsn: str) -> None:
    users = [await make_user(pg) for _ in range(20)]
    (code,) = await codes.create_codes(pg, 1_000_000_000, 1)
    conns = [await asyncpg.connect(pg_dsn) for _ in range(20)]
    try:
        async def attempt(conn: asyncpg.Connection, uid: int) -> int | str:
            try:
                return await codes.redeem(conn, code, uid)
            except codes.CodeAlreadyRedeemed:
                return "used"

        results = await asyncio.gather(*(attempt(c, u) for c, u in zip(conns, users, strict=True)))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert sorted(results, key=str) == [1_000_000_000] + ["used"] * 19
    total = await pg.fetchval("SELECT sum(balance_nano) FROM users WHERE id = ANY($1)", users)
    assert total == 1_000_000_000
    assert await pg.fetchval("SELECT count(*) FROM topups WHERE user_id = ANY($1)", users) == 1

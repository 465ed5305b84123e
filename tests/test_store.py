"""accounting.store against the session database: records, journal, change feeds."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from accounting import store
from accounting.db import create_pool
from relay.config import ChannelConfig

USD = 1_000_000_000


def uniq(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def test_user_balance_is_journaled_and_versioned(pg: asyncpg.Connection) -> None:
    name = uniq("alice")
    uid = await store.create_user(pg, name, 5 * USD)
    u = await store.get_user(pg, name)
    assert u is not None and u.id == uid and u.balance_nano == 5 * USD and u.status == "active"
    assert u.version > 0
    journal = await pg.fetch("SELECT amount_nano, note FROM topups WHERE user_id = $1", uid)
    assert [r["amount_nano"] for r in journal] == [5 * USD]

    with pytest.raises(store.Conflict):
        await store.create_user(pg, name)

    balances, cursor = await store.fetch_user_balances(pg, 0)
    assert (uid, 5 * USD, "active") in balances
    assert cursor >= u.version
    assert (await store.fetch_user_balances(pg, cursor))[0] == []

    new = await store.topup(pg, name, 250_000_000, note="card")
    assert new == 5 * USD + 250_000_000
    changed, cursor2 = await store.fetch_user_balances(pg, cursor)
    assert changed == [(uid, new, "active")] and cursor2 > cursor


async def test_topup_idempotent_and_guarded(pg: asyncpg.Connection) -> None:
    name = uniq("bob")
    uid = await store.create_user(pg, name)
    ext = uniq("pay")
    assert await store.topup(pg, uid, 3 * USD, external_id=ext) == 3 * USD
    assert await store.topup(pg, uid, 3 * USD, external_id=ext) == 3 * USD  # provider retry
    assert await pg.fetchval("SELECT count(*) FROM topups WHERE user_id = $1", uid) == 1
    with pytest.raises(store.Conflict):
        await store.topup(pg, uid, 4 * USD, external_id=ext)
    with pytest.raises(store.StoreError):
        await store.topup(pg, uid, -4 * USD)  # would go below zero
    assert await store.topup(pg, uid, -1 * USD, note="refund") == 2 * USD
    with pytest.raises(store.NotFound):
        await store.topup(pg, uniq("nobody"), USD)
    with pytest.raises(store.StoreError):
        await store.topup(pg, uid, 0)
    u = await store.get_user(pg, uid)
    assert u is not None and u.balance_nano == 2 * USD


async def test_concurrent_topups_lose_nothing(pg_dsn: str) -> None:
    pool = await create_pool(pg_dsn, 2, 8)
    try:
        uid = await store.create_user(pool, uniq("carol"))
        await asyncio.gather(*(store.topup(pool, uid, 1_000_000_007) for _ in range(40)))
        u = await store.get_user(pool, uid)
        assert u is not None and u.balance_nano == 40 * 1_000_000_007
        assert await pool.fetchval("SHOW jit") == "off"
    finally:
        await pool.close()


async def test_key_secret_is_stored_hashed_only(pg: asyncpg.Connection) -> None:
    uid = await store.create_user(pg, uniq("dave"))
    key_id, secret = await store.create_key(pg, uid, name="laptop")
    assert re.fullmatch(r"sk-[A-Za-z0-9]{48}", secret)
    row = await pg.fetchrow("SELECT key_hash, key_prefix, row_to_json(keys)::text AS j FROM keys WHERE id = $1", key_id)
    assert bytes(row["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert row["key_prefix"] == secret[:8]
    assert secret not in row["j"] and secret[8:] not in row["j"]

    new = await store.reset_key(pg, key_id)
    assert new != secret
    row2 = await pg.fetchrow("SELECT id, key_hash FROM keys WHERE key_hash = $1", hashlib.sha256(new.encode()).digest())
    assert row2 is not None and row2["id"] == key_id
    assert await pg.fetchval("SELECT count(*) FROM keys WHERE key_hash = $1", hashlib.sha256(secret.encode()).digest()) == 0


async def test_key_states_feed_sees_every_change(pg: asyncpg.Connection) -> None:
    uname = uniq("erin")
    uid = await store.create_user(pg, uname, USD)
    expiry = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    k1, s1 = await store.create_key(
        pg, uname, name="a", models=["gpt-4o-mini", "claude-*"], expires_at=expiry,
        cap_nano=2 * USD, concurrency=3, rpm=60, tpm=1000, allowed_cidrs=["10.1.2.3/8"],
    )
    k2, _ = await store.create_key(pg, uid)

    states, cursor = await store.fetch_key_states(pg, 0)
    by_id = {st.id: (h, st, status) for h, st, status in states}
    h1, st1, status1 = by_id[k1]
    assert h1 == hashlib.sha256(s1.encode()).digest() and status1 == "active"
    assert st1.enabled and st1.user_enabled and st1.user_id == uid and st1.name == "a"
    assert st1.expires_at == expiry.timestamp()
    assert st1.models == frozenset({"gpt-4o-mini", "claude-*"})
    assert (st1.group, st1.cap_nano, st1.concurrency, st1.rpm, st1.tpm) == ("default", 2 * USD, 3, 60, 1000)
    assert st1.allowed_cidrs == ("10.0.0.0/8",)
    assert by_id[k2][1].models is None and by_id[k2][1].expires_at == 0.0

    assert (await store.fetch_key_states(pg, cursor))[0] == []

    await store.set_key_status(pg, k1, "disabled")
    changed, cursor = await store.fetch_key_states(pg, cursor)
    assert [(st.id, st.enabled, status) for _, st, status in changed] == [(k1, False, "disabled")]

    await store.edit_user(pg, uid, status="disabled")  # the user's keys must follow
    changed, cursor = await store.fetch_key_states(pg, cursor)
    assert sorted((st.id, st.user_enabled) for _, st, _ in changed) == [(k1, False), (k2, False)]

    await store.delete_key(pg, k2)
    changed, cursor = await store.fetch_key_states(pg, cursor)
    assert [(st.id, status) for _, st, status in changed] == [(k2, "deleted")]
    with pytest.raises(store.NotFound):
        await store.set_key_status(pg, k2, "active")  # deleted is final
    with pytest.raises(store.NotFound):
        await store.reset_key(pg, k2)


async def test_edit_key_and_listing(pg: asyncpg.Connection) -> None:
    uname = uniq("frank")
    await store.create_user(pg, uname)
    await store.upsert_group(pg, "vip-" + uname, "2/3", ["gpt-*"])
    key_id, _ = await store.create_key(pg, uname, models=["m1"])
    key = await store.edit_key(
        pg, key_id, name="renamed", models=None, group="vip-" + uname, cap_nano=7,
        rpm=5, allowed_cidrs=["::1"], expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    assert (key.name, key.models, key.group, key.cap_nano, key.rpm) == ("renamed", None, "vip-" + uname, 7, 5)
    assert key.allowed_cidrs == ("::1/128",) and key.expires_at is not None
    with pytest.raises(store.NotFound):
        await store.edit_key(pg, key_id, group="no-such-group")
    with pytest.raises(store.StoreError):
        await store.edit_key(pg, key_id, key_hash=b"x")
    with pytest.raises(store.StoreError):
        await store.edit_key(pg, key_id, allowed_cidrs=["not-a-net"])
    with pytest.raises(store.StoreError):
        await store.create_key(pg, uname, expires_at=datetime(2030, 1, 1))  # naive
    with pytest.raises(store.NotFound):
        await store.create_key(pg, uniq("ghost"))

    other, _ = await store.create_key(pg, uname)
    await store.delete_key(pg, other)
    assert [k.id for k in await store.list_keys(pg, uname)] == [key_id]
    assert [k.id for k in await store.list_keys(pg, uname, include_deleted=True)] == [key_id, other]


async def test_groups_feed(pg: asyncpg.Connection) -> None:
    groups, cursor = await store.fetch_groups(pg, 0)
    assert any(g.name == "default" and g.multiplier == "1" and g.models == ("*",) for g in groups)
    name = uniq("grp")
    await store.upsert_group(pg, name, "0.8", ["claude-*"])
    changed, _ = await store.fetch_groups(pg, cursor)
    assert [(g.name, g.multiplier, g.models) for g in changed] == [(name, "0.8", ("claude-*",))]


async def test_sync_config_channels(pg: asyncpg.Connection) -> None:
    a = ChannelConfig(name=uniq("ch-a"), protocol="openai", base_url="http://127.0.0.1:1/v1",
                      api_key_env="A_KEY", models=("gpt-*",), model_map=(("gpt-x", "gpt-x-1"),),
                      headers=(("x-org", "o1"),), priority=2, weight=3, max_concurrency=9)
    b = ChannelConfig(name=uniq("ch-b"), protocol="anthropic", base_url="http://127.0.0.1:2")
    await store.sync_config_channels(pg, [a, b])
    chans = {c.name: c for c in await store.list_channels(pg)}
    ca = chans[a.name]
    assert (ca.protocol, ca.models, ca.model_map, ca.headers, ca.priority, ca.weight, ca.max_concurrency) == (
        "openai", ("gpt-*",), {"gpt-x": "gpt-x-1"}, {"x-org": "o1"}, 2, 3, 9)
    assert ca.source == "config" and ca.enabled

    _, cursor = await store.fetch_channels(pg, 0)
    await store.sync_config_channels(pg, [a, b])  # unchanged config: no change event
    assert (await store.fetch_channels(pg, cursor))[0] == []

    await store.sync_config_channels(pg, [a])  # b removed from the config
    changed, _ = await store.fetch_channels(pg, cursor)
    assert [(c.name, c.enabled) for c in changed] == [(b.name, False)]


async def test_audit_log(pg: asyncpg.Connection) -> None:
    target = uniq("t")
    await store.audit(pg, "tester", "key.create", target, {"key_prefix": "sk-abcde", "when": datetime(2030, 1, 1, tzinfo=UTC)})
    row = await pg.fetchrow("SELECT actor, action, detail::text AS d FROM audit_log WHERE target = $1", target)
    assert row["actor"] == "tester" and row["action"] == "key.create" and "sk-abcde" in row["d"]

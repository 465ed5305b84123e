"""Plans end to end: calendar math, subscription life cycles on a fake clock, plan credit
charged by the real flusher SQL, admission against plan credit with concurrent team keys,
the admin API on a real worker, and the CLI - all on the session's real Postgres."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from accounting import plans, store
from accounting.ledger import prepare, write_batch
from accounting.records import Usage, UsageRecord
from limits.admission import Denial, Lease, Limiter
from limits.keys import KeyState
from relay import cli
from relay.config import LimitsConfig
from tests.gateway import Harness

USD = 1_000_000_000
T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
TOKEN = "plans-admin-token-0123456789abcdef"


def uname() -> str:
    return f"p_{secrets.token_hex(4)}"


def row(sub: plans.Subscription, key_id: int, cost: int, at: datetime, rid: str | None = None) -> UsageRecord:
    return UsageRecord(
        request_id=rid or f"req_{uuid.uuid4().hex}", ts=at.timestamp(), user_id=sub.user_id,
        key_id=key_id, group="default", model="gpt-4o-mini", upstream_model="gpt-4o-mini",
        channel="main", protocol="openai", route="chat", stream=False, status=200, error_code="",
        usage=Usage(input=10, output=10), usage_source="upstream", cost_nano=cost, price_version=1,
        latency_ms=1, ttfb_ms=1, plan_id=sub.id)


async def balance(pg: asyncpg.Connection, uid: int) -> int:
    return int(await pg.fetchval("SELECT balance_nano FROM users WHERE id = $1", uid))


# --- calendar -----------------------------------------------------------------------------


def test_calendar_months_clamp_and_cycles_are_anchored_at_purchase() -> None:
    assert plans.add_months(T0, 1) == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)
    assert plans.add_months(T0, 13) == datetime(2027, 2, 28, 12, 0, tzinfo=UTC)
    assert plans.term_end(T0, "week", 0) == T0 + timedelta(days=7)
    assert plans.term_end(T0, "custom", 90) == T0 + timedelta(seconds=90)
    pi = plans.period_index
    assert pi(T0, T0 + timedelta(hours=23, minutes=59), "daily", 0) == 0
    assert pi(T0, T0 + timedelta(days=1), "daily", 0) == 1
    assert pi(T0, T0 + timedelta(days=13), "weekly", 0) == 1
    assert pi(T0, datetime(2026, 2, 28, 11, 59, tzinfo=UTC), "monthly", 0) == 0
    assert pi(T0, datetime(2026, 2, 28, 12, 0, tzinfo=UTC), "monthly", 0) == 1
    assert pi(T0, datetime(2026, 3, 31, 12, 0, tzinfo=UTC), "monthly", 0) == 2
    assert pi(T0, T0 + timedelta(seconds=250), "custom", 100) == 2
    assert pi(T0, T0 - timedelta(days=3), "daily", 0) == 0


# --- life cycle on a fake clock, charged by the flusher's own SQL ----------------------------


async def test_life_cycle_periodic_reset_fallback_renewal_expiry(pg: asyncpg.Connection) -> None:
    await prepare(pg)
    p = await plans.create_plan(pg, uname(), 10 * USD, "month", price_nano=3 * USD,
                                periodic_nano=1 * USD, reset="daily")
    uid = await store.create_user(pg, uname(), 5 * USD)
    sub, key_id, _ = await plans.subscribe(pg, uid, p.id, T0, pay_from_balance=True)
    assert await balance(pg, uid) == 2 * USD  # the price, debited and journaled
    key = await store.get_key(pg, key_id)
    assert key is not None and key.name == f"Subscription Access - {p.id}" and key.plan_id == sub.id
    assert sub.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)
    assert (await plans.budgets(pg, [sub.id], T0))[sub.id] == 1 * USD  # the daily credit

    # Day 0: 0.6 + 0.6 against 1.0 of periodic credit: the second row splits 0.4 / 0.2.
    day0 = [row(sub, key_id, 600_000_000, T0 + timedelta(minutes=m)) for m in (1, 2)]
    res = await write_batch(pg, day0)
    assert res.plan_deltas == {sub.id: 1_200_000_000} and res.user_deltas == {}
    s = await plans.get_subscription(pg, sub.id)
    assert (s.used_nano, s.period_used_nano, s.period_index) == (1 * USD, 1 * USD, 0)
    assert await balance(pg, uid) == 2 * USD - 200_000_000
    # A replay of the same rows (journal, retry) charges nothing again.
    res = await write_batch(pg, day0)
    assert res.inserted == 0
    assert (await plans.get_subscription(pg, sub.id)).used_nano == 1 * USD
    assert await balance(pg, uid) == 1_800_000_000
    assert (await plans.budgets(pg, [sub.id], T0 + timedelta(hours=5)))[sub.id] == 0

    # Day 1: the cycle reset at the purchase time of day.
    assert (await plans.budgets(pg, [sub.id], T0 + timedelta(days=1)))[sub.id] == 1 * USD
    await write_batch(pg, [row(sub, key_id, 300_000_000, T0 + timedelta(days=1, hours=1))])
    s = await plans.get_subscription(pg, sub.id)
    assert (s.used_nano, s.period_used_nano, s.period_index) == (1_300_000_000, 300_000_000, 1)
    # A late row of day 0 counts to the total only (its cycle is over): no balance spill.
    await write_batch(pg, [row(sub, key_id, 100_000_000, T0 + timedelta(hours=23))])
    s = await plans.get_subscription(pg, sub.id)
    assert (s.used_nano, s.period_used_nano) == (1_400_000_000, 300_000_000)
    assert await balance(pg, uid) == 1_800_000_000

    # The owner turns the periodic limit off: requests draw on the total credit.
    s = await plans.set_options(pg, sub.id, periodic_enabled=False)
    assert s.remaining(T0 + timedelta(days=1, hours=2)) == 10 * USD - 1_400_000_000
    await write_batch(pg, [row(sub, key_id, 2 * USD, T0 + timedelta(days=1, hours=3))])
    s = await plans.get_subscription(pg, sub.id)
    assert s.used_nano == 3_400_000_000 and await balance(pg, uid) == 1_800_000_000

    # Renewal: refused before the window, allowed inside it; same subscription, same keys.
    with pytest.raises(store.Conflict):
        await plans.renew(pg, sub.id, T0 + timedelta(days=20))
    renewed = await plans.renew(pg, sub.id, datetime(2026, 2, 26, tzinfo=UTC))
    assert renewed.id == sub.id and renewed.expires_at == datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    assert renewed.credit_nano == 20 * USD and renewed.renewals == 1
    assert [k.id for k in await plans.subscription_keys(pg, sub.id)] == [key_id]
    states = {st.id: st for _, st, _ in (await store.fetch_key_states(pg))[0]}
    assert states[key_id].plan_expires_at == renewed.expires_at.timestamp()
    assert states[key_id].plan_fallback is True

    # After the term ended a renewal restarts the term at `now`.
    late = datetime(2026, 4, 10, tzinfo=UTC)
    again = await plans.renew(pg, sub.id, late)
    assert again.expires_at == plans.add_months(late, 1)
    # Cancellation ends it now: every key reads as ended.
    team = await plans.create_team_keys(pg, sub.id, "dev", quantity=3, cap_nano=USD)
    assert len({n for _, _, n in team}) == 3 and all(n.startswith("dev-") for _, _, n in team)
    gone = await plans.cancel(pg, sub.id, late + timedelta(days=1))
    states = {st.id: st for _, st, _ in (await store.fetch_key_states(pg))[0]}
    for kid in [key_id, *(k for k, _, _ in team)]:
        assert states[kid].plan_expires_at == gone.cancelled_at.timestamp()  # type: ignore[union-attr]
    with pytest.raises(store.Conflict):
        await plans.renew(pg, sub.id, late + timedelta(days=2))


async def test_without_fallback_the_plan_absorbs_the_whole_row(pg: asyncpg.Connection) -> None:
    await prepare(pg)
    p = await plans.create_plan(pg, uname(), 1 * USD, "week")
    uid = await store.create_user(pg, uname(), 5 * USD)
    sub, key_id, _ = await plans.subscribe(pg, uid, p.id, T0, balance_fallback=False)
    await write_batch(pg, [row(sub, key_id, 1_500_000_000, T0 + timedelta(minutes=1))])
    s = await plans.get_subscription(pg, sub.id)
    assert s.used_nano == 1_500_000_000 and s.remaining(T0) == -500_000_000
    assert await balance(pg, uid) == 5 * USD


async def test_plan_terms_are_validated_and_codes_grant_a_plan_once(pg: asyncpg.Connection) -> None:
    for bad in ({"validity": "year"}, {"validity": "custom"}, {"reset": "hourly"},
                {"periodic_nano": 5, "reset": "none"}, {"groups": ["nope"]}):
        with pytest.raises(store.StoreError):
            await plans.create_plan(pg, uname(), USD, **bad)  # type: ignore[arg-type]
    p = await plans.create_plan(pg, uname(), USD, "day", models=["gpt-4o-mini"])
    batch, made = await plans.create_plan_codes(pg, p.id, 2)
    uid = await store.create_user(pg, uname())
    sub, key_id, _ = await plans.redeem_plan_code(pg, made[0].lower(), uid, T0)
    assert sub.plan_id == p.id and sub.expires_at == T0 + timedelta(days=1)
    key = await store.get_key(pg, key_id)
    assert key is not None and key.models == ("gpt-4o-mini",)
    from accounting import codes

    with pytest.raises(codes.CodeAlreadyRedeemed):
        await plans.redeem_plan_code(pg, made[0], uid, T0)
    with pytest.raises(codes.CodeNotFound):
        await plans.redeem_plan_code(pg, "TW-AAAA-BBBB-CCCC-DDDD", uid, T0)
    listed = await plans.list_plan_codes(pg, p.id)
    assert len(listed) == 2 and {r["batch_id"] for r in listed} == {batch}
    assert sum(r["subscription_id"] == sub.id for r in listed) == 1


# --- admission against plan credit --------------------------------------------------------


def plan_key(kid: int, sub: int = 50, cap: int = 0, fallback: bool = False) -> KeyState:
    return KeyState(id=kid, user_id=7, name="t", enabled=True, user_enabled=True, expires_at=0.0,
                    models=None, group="default", cap_nano=cap, concurrency=1000, rpm=0, tpm=0,
                    plan_id=sub, plan_expires_at=time.time() + 3600, plan_fallback=fallback)


async def test_team_keys_share_plan_credit_and_caps_under_concurrent_use() -> None:
    lim = Limiter(LimitsConfig(key_concurrency=1000))
    lim.apply_user_snapshot(7, 0)
    lim.apply_plan_snapshot(50, 10 * USD)
    for kid in range(1, 5):
        lim.apply_key_snapshot(kid, 0)
    keys = [plan_key(kid, cap=3 * USD) for kid in range(1, 5)]
    leases: list[Lease] = []
    denials: list[Denial] = []

    async def client(k: KeyState) -> None:
        for _ in range(40):
            d = lim.admit(k, "m", 10, 100_000_000, "1.2.3.4", True, time.time())
            if isinstance(d, Lease):
                leases.append(d)
            else:
                assert isinstance(d, Denial)
                denials.append(d)
            await asyncio.sleep(0)

    await asyncio.gather(*(client(k) for k in keys))
    # 4 keys x 3.0 cap = 12 > 10 of plan: the plan is the binding limit, no key past its cap.
    assert len(leases) == 100 and all(ls.plan_id == 50 for ls in leases)
    per_key: dict[int, int] = {}
    for ls in leases:
        per_key[ls._k.id] = per_key.get(ls._k.id, 0) + 1
    assert max(per_key.values()) <= 30
    assert {d.reason for d in denials} <= {"plan_credit", "key_cap"}
    assert any(d.reason == "plan_credit" for d in denials)
    # Settled cheaper than reserved: room again; the flush hands it to the snapshot's domain.
    for ls in leases[:10]:
        ls.release(50_000_000, 20)
    assert isinstance(lim.admit(keys[0], "m", 10, 100_000_000, "1.2.3.4", True, time.time()), Lease)
    lim.on_plan_flushed({50: 500_000_000})
    assert lim.plans[50].unflushed == 0


async def test_plan_first_then_balance_and_denials() -> None:
    lim = Limiter(LimitsConfig())
    lim.apply_user_snapshot(7, 1 * USD)
    lim.apply_plan_snapshot(50, 150_000_000)
    k = plan_key(1, fallback=True)
    first = lim.admit(k, "m", 10, 100_000_000, "ip", True, time.time())
    assert isinstance(first, Lease) and first.plan_id == 50
    second = lim.admit(k, "m", 10, 100_000_000, "ip", True, time.time())
    assert isinstance(second, Lease) and second.plan_id == 0  # the plan cannot cover it
    assert lim.users[7].reserved == 100_000_000 and lim.plans[50].reserved == 100_000_000
    first.release(100_000_000, 1)
    second.release(70_000_000, 1)
    assert lim.plans[50].unflushed == 100_000_000 and lim.users[7].unflushed == 70_000_000
    no_fallback = plan_key(2, sub=51)
    lim.apply_plan_snapshot(51, 0)
    d = lim.admit(no_fallback, "m", 10, 1, "ip", True, time.time())
    assert isinstance(d, Denial) and (d.status, d.reason) == (402, "plan_credit")
    unknown = plan_key(3, sub=52)
    d = lim.admit(unknown, "m", 10, 1, "ip", True, time.time())
    assert isinstance(d, Denial) and d.reason == "quota_unknown"
    ended = KeyState(**{**{f: getattr(unknown, f) for f in KeyState.__slots__},  # type: ignore[arg-type]
                        "plan_expires_at": time.time() - 1})
    d = lim.admit(ended, "m", 10, 1, "ip", True, time.time())
    assert isinstance(d, Denial) and (d.status, d.message) == (401, "plan expired")


async def test_plan_loader_feeds_a_refill(pg: asyncpg.Connection, pg_dsn: str) -> None:
    p = await plans.create_plan(pg, uname(), 2 * USD, "week")
    uid = await store.create_user(pg, uname())
    sub, _, _ = await plans.subscribe(pg, uid, p.id, datetime.now(UTC))
    lim = Limiter(LimitsConfig(), plan_loader=plans.loader(pg, time.time))
    lim.apply_user_snapshot(uid, 0)
    k = plan_key(99, sub=sub.id)
    k = KeyState(**{**{f: getattr(k, f) for f in KeyState.__slots__}, "user_id": uid})  # type: ignore[arg-type]
    assert lim.admit(k, "m", 10, USD, "ip", True, time.time()) is None
    await lim.refill(k)
    assert lim.plans[sub.id].db == 2 * USD
    assert isinstance(lim.admit(k, "m", 10, USD, "ip", True, time.time()), Lease)


# --- the admin API on a real worker ---------------------------------------------------------


@pytest.fixture
async def gw(pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    h = await Harness().start(pg_dsn, admin={"token": TOKEN})
    # The wiring relay/worker.py is asked to add (see accounting.plans): plan snapshots
    # on refill and the flusher's per-plan deltas.
    assert h.worker is not None and h.worker.gw is not None
    lim = h.worker.gw.limiter
    lim.plan_loader = plans.loader(h.worker.db, time.time)
    h.worker.flusher.on_plans_flushed = lim.on_plan_flushed
    yield h
    await h.stop()


class Api:
    def __init__(self, http: aiohttp.ClientSession, h: Harness) -> None:
        self.http, self.h = http, h

    async def __call__(self, method: str, path: str, body: Any = None, ok: int | None = None) -> Any:
        async with self.http.request(method, self.h.url + "/admin/v1" + path,
                                     data=None if body is None else orjson.dumps(body),
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            out = orjson.loads(await r.read())
            if ok is not None:
                assert r.status == ok, (r.status, out)
            return r.status, out


async def chat(http: aiohttp.ClientSession, h: Harness, secret: str) -> tuple[int, Any]:
    async with http.post(h.url + "/v1/chat/completions",
                         data=orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 50,
                                            "messages": [{"role": "user", "content": "hi"}]}),
                         headers={"Authorization": f"Bearer {secret}",
                                  "content-type": "application/json"}) as r:
        return r.status, orjson.loads(await r.read())


async def test_admin_plan_life_cycle_and_plan_keys_on_the_gateway(gw: Harness) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(http, gw)
        name = uname()
        _, p = await api("POST", "/plans", {"name": name, "price": "5", "credit": "2", "validity": "month",
                                            "periodic_credit": "1", "reset": "daily"}, ok=201)
        assert (p["credit_nano"], p["periodic_credit_nano"], p["renewal_window_s"]) == (2 * USD, USD, 3 * 86400)
        await api("POST", "/plans", {"name": name, "credit": "1"}, ok=409)
        await api("POST", "/plans", {"name": uname(), "credit": 1}, ok=400)  # numbers are refused
        _, p = await api("PATCH", f"/plans/{p['id']}", {"price": "4"}, ok=200)
        assert p["price_nano"] == 4 * USD
        _, listed = await api("GET", "/plans", ok=200)
        assert p["id"] in [x["id"] for x in listed["data"]]
        assert (await api("GET", f"/plans/{name}", ok=200))[1]["id"] == p["id"]
        _, user = await api("POST", "/users", {"name": uname(), "balance": "10"}, ok=201)

        _, sub = await api("POST", "/subscriptions", {"user": user["id"], "plan": p["id"],
                                                      "pay_from_balance": True}, ok=201)
        assert sub["state"] == "active" and sub["remaining_nano"] == USD
        assert (await api("GET", f"/users/{user['id']}", ok=200))[1]["balance_nano"] == 6 * USD
        _, team = await api("POST", f"/subscriptions/{sub['id']}/keys",
                            {"name": "team", "quantity": 3, "cap": "0.5"}, ok=201)
        assert len(team["data"]) == 3 and all(k["cap_nano"] == USD // 2 for k in team["data"])
        assert all(k["plan_id"] == sub["id"] for k in team["data"])
        await api("POST", f"/subscriptions/{sub['id']}/keys", {"name": "x", "group": "vip"}, ok=400)
        _, shown = await api("GET", f"/subscriptions/{sub['id']}", ok=200)
        assert len(shown["keys"]) == 4
        assert len((await api("GET", f"/subscriptions/{sub['id']}/keys", ok=200))[1]["data"]) == 4

        # Every plan key works and draws on the plan, not on the balance.
        await gw.worker.gw.keys.refresh(gw.worker.db)  # type: ignore[union-attr]
        for secret in [sub["secret"], *(k["secret"] for k in team["data"])]:
            status, body = await chat(http, gw, secret)
            assert status == 200, body
        await gw.flush()
        _, shown = await api("GET", f"/subscriptions/{sub['id']}", ok=200)
        assert shown["used_nano"] > 0 and shown["period_used_nano"] == shown["used_nano"]
        assert (await api("GET", f"/users/{user['id']}", ok=200))[1]["balance_nano"] == 6 * USD

        _, sub2 = await api("PATCH", f"/subscriptions/{sub['id']}", {"periodic_enabled": False}, ok=200)
        assert sub2["periodic_enabled"] is False and sub2["remaining_nano"] == 2 * USD - shown["used_nano"]
        # Renewal outside the window is a 409 that says when it opens.
        status, err = await api("POST", f"/subscriptions/{sub['id']}/renew", {})
        assert status == 409 and "can be renewed from" in err["error"]["message"]
        _, subs = await api("GET", f"/subscriptions?user={user['id']}", ok=200)
        assert [s["id"] for s in subs["data"]] == [sub["id"]]

        # Cancellation: every key of the plan stops with 401 "plan expired".
        await api("POST", f"/subscriptions/{sub['id']}/cancel", ok=200)
        await api("POST", f"/subscriptions/{sub['id']}/cancel", ok=409)
        await gw.worker.gw.keys.refresh(gw.worker.db)  # type: ignore[union-attr]
        for secret in [sub["secret"], *(k["secret"] for k in team["data"])]:
            status, body = await chat(http, gw, secret)
            assert status == 401 and body["error"]["message"] == "plan expired"


async def test_admin_expired_plan_renewal_inside_window_and_plan_codes(gw: Harness) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(http, gw)
        _, p = await api("POST", "/plans", {"name": uname(), "credit": "1", "validity": "week"}, ok=201)
        _, user = await api("POST", "/users", {"name": uname()}, ok=201)
        past = (datetime.now(UTC) - timedelta(days=8)).isoformat()
        _, sub = await api("POST", "/subscriptions", {"user": user["name"], "plan": p["name"],
                                                      "starts_at": past}, ok=201)
        assert sub["state"] == "expired"
        await gw.worker.gw.keys.refresh(gw.worker.db)  # type: ignore[union-attr]
        status, body = await chat(http, gw, sub["secret"])
        assert status == 401 and body["error"]["message"] == "plan expired"
        _, renewed = await api("POST", f"/subscriptions/{sub['id']}/renew", {}, ok=200)
        assert renewed["state"] == "active" and renewed["credit_nano"] == 2 * USD
        await gw.worker.gw.keys.refresh(gw.worker.db)  # type: ignore[union-attr]
        status, body = await chat(http, gw, sub["secret"])  # the same key works again
        assert status == 200, body
        # Inside the window (a week plan bought 5 days ago): renewed by one more week.
        recent = datetime.now(UTC) - timedelta(days=5)
        _, sub3 = await api("POST", "/subscriptions", {"user": user["id"], "plan": p["id"],
                                                       "starts_at": recent.isoformat()}, ok=201)
        _, r3 = await api("POST", f"/subscriptions/{sub3['id']}/renew", {}, ok=200)
        assert datetime.fromisoformat(r3["expires_at"]) == recent + timedelta(days=14)

        _, made = await api("POST", f"/plans/{p['id']}/codes", {"count": 2}, ok=201)
        _, got = await api("POST", "/plan-codes/redeem", {"code": made["codes"][0], "user": user["id"]}, ok=201)
        assert got["plan_id"] == p["id"] and got["secret"].startswith("sk-")
        await api("POST", "/plan-codes/redeem", {"code": made["codes"][0], "user": user["id"]}, ok=409)
        _, codes_ = await api("GET", f"/plans/{p['id']}/codes", ok=200)
        assert len(codes_["data"]) == 2
        await api("DELETE", f"/plans/{p['id']}", ok=200)
        await api("POST", "/subscriptions", {"user": user["id"], "plan": p["id"]}, ok=400)
        assert p["id"] not in [x["id"] for x in (await api("GET", "/plans", ok=200))[1]["data"]]


# --- the CLI --------------------------------------------------------------------------------


def test_cli_plans_and_subscriptions(tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f'[database]\ndsn = "{pg_dsn}"\n')

    def run(*argv: str) -> Any:
        code = cli.main(["--config", str(conf), *argv, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    name = uname()
    p = run("plans", "create", name, "--credit", "3", "--price", "1.5", "--validity", "week",
            "--periodic-credit", "1", "--reset", "daily")
    assert (p["credit_nano"], p["price_nano"], p["validity_s"]) == (3 * USD, 1_500_000_000, 7 * 86400)
    assert run("plans", "show", name)["id"] == p["id"]
    assert p["id"] in [x["id"] for x in run("plans", "list")]
    user = uname()
    assert cli.main(["--config", str(conf), "users", "create", user, "--balance", "5"]) == 0
    capsys.readouterr()
    sub = run("subscriptions", "create", "--user", user, "--plan", str(p["id"]))  # paid: 1.5
    assert sub["key"].startswith("sk-") and sub["state"] == "active"
    made = run("subscriptions", "keys", "create", str(sub["id"]), "--name", "ci", "--quantity", "2",
               "--cap", "0.25")
    assert len(made) == 2
    shown = run("subscriptions", "show", str(sub["id"]))
    assert len(shown["keys"]) == 3
    assert sorted(k["cap_nano"] for k in shown["keys"]) == [0, USD // 4, USD // 4]
    assert [s["id"] for s in run("subscriptions", "list", "--user", user)] == [sub["id"]]
    # A week plan renews only in its last 3 days: refused now, with the reason.
    code = cli.main(["--config", str(conf), "subscriptions", "renew", str(sub["id"])])
    _, err = capsys.readouterr()
    assert code == 2 and "can be renewed from" in err

    async def backdate() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("UPDATE subscriptions SET expires_at = now() + interval '1 day'"
                               " WHERE id = $1", sub["id"])
        finally:
            await conn.close()

    asyncio.run(backdate())
    renewed = run("subscriptions", "renew", str(sub["id"]))
    assert renewed["renewals"] == 1 and renewed["credit_nano"] == 6 * USD


async def test_shared_mode_leases_plan_credit_from_redis(pg: asyncpg.Connection) -> None:
    p = await plans.create_plan(pg, uname(), 1 * USD, "week")
    uid = await store.create_user(pg, uname())
    sub, _, _ = await plans.subscribe(pg, uid, p.id, datetime.now(UTC))

    async def load(user_id: int, key_id: int) -> tuple[int, int]:
        return 0, 0

    lim = Limiter(LimitsConfig(redis_url="redis://127.0.0.1:6379/0"), loader=load,
                  plan_loader=plans.loader(pg, time.time), redis_prefix=f"t{uuid.uuid4().hex[:8]}:")
    await lim.start()
    try:
        k = KeyState(**{**{f: getattr(plan_key(5, sub=sub.id), f) for f in KeyState.__slots__},  # type: ignore[arg-type]
                        "user_id": uid})
        got: Lease | Denial | None = None
        for _ in range(5):
            got = lim.admit(k, "m", 10, 100_000_000, "ip", True, time.time())
            if got is not None:
                break
            await lim.refill(k)
        assert isinstance(got, Lease) and got.plan_id == sub.id
        assert lim.plans[sub.id].held >= 100_000_000  # leased from the plan's Redis scope
        got.release(100_000_000, 10)
    finally:
        await lim.close()

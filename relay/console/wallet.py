"""Wallet (redeem a code, send balance to another user, the purchase link, the balance's
history), plans (buy from the balance, renew, team keys) and invite (link, QR, invitees).

Redemption goes through accounting.codes.redeem (as /v1/redeem does), plans through
accounting.plans (as the admin API does), transfers through accounting.wallet; each is
audited as `user:<id>`. A subscription of another user answers 404.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, time, timedelta
from typing import Any

import segno

from accounting import accounts, codes, growth, plans, store, wallet
from accounting.money import parse_usd
from accounting.store import StoreError
from relay.console import back
from relay.console.keys import snippets
from relay.console.web import USER, Page, Refused, Response


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/console/wallet", lambda p: wallet_page(c, p), USER)
    r.add("POST", "/console/wallet/redeem", lambda p: redeem(c, p), USER)
    r.add("POST", "/console/wallet/transfer", lambda p: transfer(c, p), USER)
    r.add("GET", "/console/plans", lambda p: plans_page(c, p), USER)
    r.add("POST", "/console/plans/{plan}/buy", lambda p: buy(c, p), USER)
    r.add("POST", "/console/subscriptions/{sub}/renew", lambda p: renew(c, p), USER)
    r.add("POST", "/console/subscriptions/{sub}/keys", lambda p: team_keys(c, p), USER)
    r.add("GET", "/console/invite", lambda p: invite(c, p), USER)


# --- wallet --------------------------------------------------------------------------------


async def wallet_page(c: Any, p: Page, *, error: str = "", status: int = 200) -> Response:
    before = None
    if p.query.get("before"):
        try:
            before = int(p.query["before"])
        except ValueError:
            before = None
    now = c.now()
    async with c.db.acquire() as conn:
        acct = await accounts.get(conn, p.user_id)
        rows, nxt = await wallet.history(conn, p.user_id, before_id=before)
        days = await wallet.usage_by_day(conn, p.user_id, now - timedelta(days=30),
                                         now + timedelta(hours=1), p.tz)
    assert acct is not None
    return c.render(p, "wallet.html", status, acct=acct, rows=rows, nxt=nxt, error=error,
                    days=[d for d in reversed(days) if d["cost_nano"]],
                    purchase_url=c.cfg.purchase_url, idem=secrets.token_urlsafe(16),
                    min_transfer=c.cfg.min_transfer)


async def redeem(c: Any, p: Page) -> Response:
    await c.throttled(p, "redeem", str(p.user_id))
    code = p.form.get("code", "").strip()
    try:
        if not code:
            raise codes.CodeNotFound("Enter a code")
        async with c.db.acquire() as conn, conn.transaction():
            amount = await codes.redeem(conn, code, p.user_id)
            await store.audit(conn, f"user:{p.user_id}", "code.redeem", str(p.user_id),
                              {"code_prefix": codes.normalize(code)[:4], "amount_nano": amount})
    except codes.CodeError as exc:
        return await wallet_page(c, p, error=c._(p, _code_message(exc)), status=400)
    return back("/console/wallet", ok="redeemed")


def _code_message(exc: Exception) -> str:
    if isinstance(exc, codes.CodeAlreadyRedeemed):
        return "This code was already redeemed."
    if isinstance(exc, codes.CodeExpired):
        return "This code has expired."
    return "This code is not valid."


async def transfer(c: Any, p: Page) -> Response:
    try:
        amount = parse_usd(p.form.get("amount", "").strip() or "0", what="amount")
        async with c.db.acquire() as conn:
            await wallet.transfer(conn, p.user_id, p.form.get("email", ""), amount,
                                  p.form.get("idem", ""),
                                  min_nano=parse_usd(c.cfg.min_transfer))
    except (StoreError, ValueError) as exc:
        return await wallet_page(c, p, error=c._(p, str(exc)), status=400)
    return back("/console/wallet", ok="sent_money")


# --- plans ---------------------------------------------------------------------------------


async def _own_sub(c: Any, p: Page, conn: Any) -> plans.Subscription:
    try:
        sub = await plans.get_subscription(conn, int(p.params["sub"]))
    except (ValueError, StoreError):
        raise Refused(404, c._(p, "No such subscription."))
    if sub.user_id != p.user_id:
        raise Refused(404, c._(p, "No such subscription."))
    return sub


async def plans_page(c: Any, p: Page, *, error: str = "", status: int = 200,
                     created: list[dict[str, Any]] | None = None) -> Response:
    now = c.now()
    async with c.db.acquire() as conn:
        on_sale = await plans.list_plans(conn)
        by_id = {pl.id: pl for pl in await plans.list_plans(conn, include_archived=True)}
        subs = await plans.list_subscriptions(conn, user=p.user_id)
        sub_keys = {s.id: await plans.subscription_keys(conn, s.id) for s in subs}
    rows = []
    for s in subs:
        pl = by_id.get(s.plan_id)
        nxt = None
        if s.periodic() and s.active(now):
            idx = plans.period_index(s.started_at, now, s.reset, s.reset_s)
            nxt = plans.period_start(s.started_at, idx + 1, s.reset, s.reset_s)
        window = timedelta(seconds=pl.renewal_window_s) if pl else timedelta(0)
        rows.append({"sub": s, "plan": pl, "left": s.remaining(now), "next_reset": nxt,
                     "active": s.active(now), "keys": sub_keys.get(s.id, []),
                     "renewable": pl is not None and pl.status == "active"
                     and s.status == "active" and now >= s.expires_at - window})
    return c.render(p, "plans.html", status, on_sale=[pl for pl in on_sale if pl.status == "active"],
                    subs=rows, error=error, created=created, now=now)


async def buy(c: Any, p: Page) -> Response:
    try:
        async with c.db.acquire() as conn, conn.transaction():
            sub, key_id, secret = await plans.subscribe(conn, p.user_id, int(p.params["plan"]),
                                                        c.now(), pay_from_balance=True)
            await store.audit(conn, f"user:{p.user_id}", "plan.buy", str(sub.id),
                              {"plan_id": sub.plan_id})
            key = await store.get_key(conn, key_id)
    except (StoreError, ValueError) as exc:
        return await plans_page(c, p, error=c._(p, str(exc)), status=400)
    assert key is not None
    return await plans_page(c, p, created=[_created(c, p, key.id, key.name, secret)])


def _created(c: Any, p: Page, key_id: int, name: str, secret: str) -> dict[str, Any]:
    from relay.console import catalog

    base = c.base_url(p)
    return {"id": key_id, "name": name, "secret": secret, "base": base,
            "snippets": snippets(base, secret, catalog.known_models(c.gw))}


async def renew(c: Any, p: Page) -> Response:
    try:
        async with c.db.acquire() as conn, conn.transaction():
            sub = await _own_sub(c, p, conn)
            await plans.renew(conn, sub.id, c.now(), pay_from_balance=True)
            await store.audit(conn, f"user:{p.user_id}", "plan.renew", str(sub.id), {})
    except StoreError as exc:
        return await plans_page(c, p, error=c._(p, str(exc)), status=400)
    return back("/console/plans", ok="renewed")


async def team_keys(c: Any, p: Page) -> Response:
    f = p.form
    try:
        quantity = int(f.get("quantity", "1") or "1")
        cap = f.get("cap", "").strip()
        expires = None
        if f.get("expires"):
            day = datetime.fromisoformat(f["expires"]).date()
            expires = datetime.combine(day, time(23, 59, 59), tzinfo=c.zone(p)).astimezone(UTC)
        async with c.db.acquire() as conn, conn.transaction():
            sub = await _own_sub(c, p, conn)
            made = await plans.create_team_keys(
                conn, sub.id, f.get("name", ""), quantity=quantity, group=f.get("group") or None,
                expires_at=expires, cap_nano=parse_usd(cap, what="cap") if cap else 0)
            await store.audit(conn, f"user:{p.user_id}", "plan.team_keys", str(sub.id),
                              {"count": len(made)})
    except (StoreError, ValueError) as exc:
        return await plans_page(c, p, error=c._(p, str(exc)), status=400)
    return await plans_page(c, p, created=[_created(c, p, k, n, s) for k, s, n in made])


# --- invite ----------------------------------------------------------------------------------


async def invite(c: Any, p: Page) -> Response:
    async with c.db.acquire() as conn:
        mine = await growth.list_invite_codes(conn, p.user_id)
        if not mine:
            await growth.create_invite_code(conn, p.user_id)
            mine = await growth.list_invite_codes(conn, p.user_id)
        invited = await conn.fetch(
            "SELECT u.email, u.name, u.email_verified, i.created_at, i.reward_nano"
            " FROM invites i JOIN users u ON u.id = i.invitee_id WHERE i.inviter_id = $1"
            " ORDER BY i.created_at DESC LIMIT 200", p.user_id)
    code = mine[0]["code"]
    link = f"{c.base_url(p)}/console/register?aff={code}"
    qr = segno.make(link, error="m").svg_data_uri(scale=4, dark="#111", light="#fff")
    people = [{"who": accounts.mask_email(r["email"] or r["name"]), "at": r["created_at"],
               "verified": r["email_verified"], "reward": int(r["reward_nano"] or 0)} for r in invited]
    return c.render(p, "invite.html", code=code, link=link, qr=qr, people=people,
                    rewards=sum(x["reward"] for x in people), uses=mine[0]["uses"],
                    share=c.gw.cfg.growth.invite_share, credit=c.gw.cfg.growth.invite_credit)

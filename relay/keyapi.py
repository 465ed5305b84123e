"""The key holder's own views, authenticated by the API key itself: usage, one request's
bill, redemption of a code, the key's balance and cap, and the OpenAI-style billing
endpoints chat apps poll (/v1/dashboard/billing/subscription and .../usage).

Every query is scoped to the calling key's id inside this module (never taken from
the request), so a key holder cannot see another key's rows; a request id of another
key answers 404 exactly like an unknown one. Channel names and client IPs stay out of
the key holder's view. No route here is on a model path (/v1/chat/completions...).
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from accounting import codes, reports, store
from accounting.money import format_usd
from relay import errors as E
from relay.httpserver import Request
from relay.ops.parse import (
    decode_cursor,
    encode_cursor,
    mapped,
    parse_time,
    q_int,
    window,
)
from relay.ops.usage import explain_row
from relay.ops.views import money
from relay.webapi import Api, ApiError, Call, Reply

# The columns of a usage row a key holder sees: what they sent and what it cost.
_OWN_COLS = (
    "request_id", "ts", "key_id", "group", "model", "protocol", "route", "stream", "status",
    "error_code", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "usage_source", "cost_nano", "price_version", "latency_ms", "ttfb_ms",
    "client_request_id", "response_id",
)
REDEEM_FAILURES_PER_MINUTE = 10  # per key: guessing 80-bit codes is hopeless, but cheap to bound
MAX_BILLING_DAYS = 100


def _own(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row[c] for c in _OWN_COLS}
    out["cost_usd"] = format_usd(row["cost_nano"])
    return out


def _usd_number(nano: int, scale: int = 1) -> orjson.Fragment:
    """An exact decimal JSON number (chat apps expect numbers here, not strings); built
    from integers, so no float ever holds the amount."""
    return orjson.Fragment(format_usd(nano * scale).encode())


class KeyApi(Api):
    """Routes for key holders; matches only its own paths so a stray /v1/messages/...
    still gets the gateway's Anthropic-shaped 404."""

    PATHS = (b"/v1/usage", b"/v1/redeem", b"/v1/me", b"/v1/dashboard/billing/",
             b"/dashboard/billing/")

    def matches(self, path: bytes) -> bool:
        return path == b"/v1/me" or path == b"/v1/redeem" or path == b"/v1/usage" or \
            path.startswith((b"/v1/usage/", b"/v1/dashboard/billing/", b"/dashboard/billing/"))


class KeyViews:
    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self._redeem_failures: dict[int, list[float]] = {}

    async def guard(self, req: Request) -> Any:
        key = await self.gw.authguard.key(self.gw.keys, req)
        if not key.enabled or not key.user_enabled:
            raise E.InvalidKey("Invalid API key")
        if key.expires_at and key.expires_at <= time.time():
            raise E.InvalidKey("This API key has expired")
        return key

    # --- usage --------------------------------------------------------------------------

    async def usage(self, call: Call) -> Any:
        key = call.ctx
        q = call.query
        bucket = q.get("bucket") or "day"
        if bucket not in reports.BUCKETS:
            raise E.InvalidRequest(f"bucket: expected hour or day, got {bucket!r}")
        start, end = window(q, timedelta(days=30) if bucket == "day" else timedelta(hours=24))
        floor = start.replace(minute=0, second=0, microsecond=0)
        model = q.get("model") or None
        async with self.gw.db.acquire() as conn:
            series = await reports.spend_series(conn, floor, end, bucket, key_id=key.id, model=model)
            models = await reports.per_model(conn, floor, end, key_id=key.id)
            rows, nxt = await reports.request_log(
                conn, start=start, end=end, key_id=key.id, model=model,
                limit=q_int(q, "limit", 50, lo=1, hi=500) or 50,
                before_cursor=decode_cursor(q.get("cursor")))
        for r in (*series, *models):
            r["cost_usd"] = format_usd(r["cost_nano"])
        if model:
            models = [m for m in models if m["model"] == model]
        return {"key_id": key.id, "start": start, "end": end, "bucket": bucket,
                **money("total_cost", sum(r["cost_nano"] for r in models)),
                "series": series, "models": models,
                "requests": {"data": [_own(r) for r in rows], "next": encode_cursor(nxt)}}

    async def usage_one(self, call: Call) -> Any:
        key = call.ctx
        rid = call.params["request_id"]
        async with self.gw.db.acquire() as conn:
            row = await reports.usage_row(conn, rid, key_id=key.id)
            if row is None or row["key_id"] != key.id:
                raise E.NotFound(f"no request {rid!r} for this key")
            bill = await explain_row(self.gw, conn, row)
        return {"usage": _own(row), "bill": bill}

    # --- redemption -----------------------------------------------------------------------

    async def redeem(self, call: Call) -> Any:
        key = call.ctx
        now = time.monotonic()
        recent = [t for t in self._redeem_failures.get(key.id, ()) if now - t < 60]
        if len(recent) >= REDEEM_FAILURES_PER_MINUTE:
            raise E.RateLimited("Too many failed redemptions; try again in a minute",
                                retry_after=60 - (now - recent[0]))
        code = call.body().get("code")
        if not isinstance(code, str) or not code.strip():
            raise E.InvalidRequest("code: required (the redemption code, e.g. TW-XXXX-XXXX-XXXX-XXXX)")
        try:
            async with self.gw.db.acquire() as conn, conn.transaction():
                amount = await codes.redeem(conn, code, key.user_id)
                balance = await conn.fetchval("SELECT balance_nano FROM users WHERE id = $1",
                                              key.user_id)
                await store.audit(conn, f"key:{key.id}", "code.redeem", str(key.user_id),
                                  {"key_id": key.id, "code_prefix": codes.normalize(code)[:4],
                                   "amount_nano": amount})
        except codes.CodeError:
            recent.append(now)
            self._redeem_failures[key.id] = recent
            raise
        self._redeem_failures.pop(key.id, None)
        return {**money("amount", amount), **money("balance", int(balance))}

    # --- me and the billing endpoints chat apps use ----------------------------------------

    async def _records(self, key_id: int) -> tuple[store.Key, store.User]:
        async with self.gw.db.acquire() as conn:
            k = await store.get_key(conn, key_id)
            u = None if k is None else await store.get_user(conn, k.user_id)
        if k is None or u is None:
            raise E.InvalidKey("Invalid API key")
        return k, u

    async def me(self, call: Call) -> Any:
        k, u = await self._records(call.ctx.id)
        remaining = u.balance_nano if not k.cap_nano else min(u.balance_nano,
                                                              max(0, k.cap_nano - k.spent_nano))
        return {
            "key": {"id": k.id, "name": k.name, "key_prefix": k.key_prefix, "group": k.group,
                    "models": None if k.models is None else list(k.models),
                    "expires_at": k.expires_at, **money("cap", k.cap_nano),
                    **money("spent", k.spent_nano), "rpm": k.rpm, "tpm": k.tpm,
                    "concurrency": k.concurrency},
            "user": {"name": u.name, **money("balance", u.balance_nano)},
            **money("remaining", remaining),
        }

    async def billing_subscription(self, call: Call) -> Reply:
        # A capped key's limit is its cap; an uncapped key can spend the account's balance
        # on top of what it has spent, so its "hard limit" is the sum.
        k, u = await self._records(call.ctx.id)
        limit = k.cap_nano if k.cap_nano else u.balance_nano + k.spent_nano
        access_until = int(k.expires_at.timestamp()) if k.expires_at else 0
        body = {
            "object": "billing_subscription", "has_payment_method": True,
            "canceled": False, "canceled_at": None, "delinquent": None,
            "access_until": access_until, "soft_limit": 0, "hard_limit": 0, "system_hard_limit": 0,
            "soft_limit_usd": _usd_number(limit), "hard_limit_usd": _usd_number(limit),
            "system_hard_limit_usd": _usd_number(limit),
            "plan": {"title": k.group, "id": f"group-{k.group}"},
            "account_name": u.name, "po_number": None, "billing_email": None, "tax_ids": None,
            "billing_address": None, "business_address": None,
        }
        return Reply(200, body)

    async def billing_usage(self, call: Call) -> Reply:
        q = call.query
        today = datetime.now(UTC).date()
        start_d = _date(q.get("start_date"), "start_date", today - timedelta(days=99))
        end_d = _date(q.get("end_date"), "end_date", today + timedelta(days=1))
        if end_d <= start_d:
            raise E.InvalidRequest("end_date: must be after start_date")
        if (end_d - start_d).days > MAX_BILLING_DAYS:
            raise E.InvalidRequest(f"Usage can be queried for at most {MAX_BILLING_DAYS} days")
        start = datetime(start_d.year, start_d.month, start_d.day, tzinfo=UTC)
        end = datetime(end_d.year, end_d.month, end_d.day, tzinfo=UTC)  # exclusive, as OpenAI's
        async with self.gw.db.acquire() as conn:
            rows = await reports.daily_model_costs(conn, start, end, key_id=call.ctx.id)
        days: dict[datetime, list[dict[str, Any]]] = {}
        total = 0
        for r in rows:
            days.setdefault(r["day"], []).append(
                {"name": r["model"], "cost": _usd_number(r["cost_nano"], 100)})
            total += r["cost_nano"]
        body = {
            "object": "list",
            "daily_costs": [{"timestamp": int(d.timestamp()), "line_items": items}
                            for d, items in sorted(days.items())],
            "total_usage": _usd_number(total, 100),  # cents, as OpenAI reported it
        }
        return Reply(200, body)


def _date(text: str | None, what: str, default: date) -> date:
    if not text:
        return default
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        try:
            return parse_time(text, what).date()
        except E.GatewayError:
            raise ApiError(400, "invalid_request", f"{what}: expected YYYY-MM-DD, got {text!r}")


ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v1/usage", "usage"),
    ("GET", "/v1/usage/{request_id}", "usage_one"),
    ("POST", "/v1/redeem", "redeem"),
    ("GET", "/v1/me", "me"),
    ("GET", "/v1/dashboard/billing/subscription", "billing_subscription"),
    ("GET", "/v1/dashboard/billing/usage", "billing_usage"),
    # Chat apps configured with a base URL without /v1 ask here.
    ("GET", "/dashboard/billing/subscription", "billing_subscription"),
    ("GET", "/dashboard/billing/usage", "billing_usage"),
)


def build(gw: Any, worker: Any = None) -> Api:
    views = KeyViews(gw)
    api = KeyApi()
    api.prefixes = set(KeyApi.PATHS)
    for method, path, name in ROUTES:
        api.route(method, path, guard=views.guard)(mapped(getattr(views, name)))
    return api

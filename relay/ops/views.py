"""The JSON shape of each record, one per resource: what the admin API answers, what
the CLI prints with --json, and what the operator pages render from. Money is given
both ways (`*_usd` exact string, `*_nano` integer). No I/O here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from accounting import plans, pricing, store, topups
from accounting.money import format_usd

_VALIDITY_S = {"day": 86_400, "week": 7 * 86_400}


def money(prefix: str, nano: int) -> dict[str, Any]:
    """`{prefix}_usd` (exact string) and `{prefix}_nano` (int) for JSON output."""
    return {f"{prefix}_usd": format_usd(nano), f"{prefix}_nano": nano}



def user_json(u: store.User) -> dict[str, Any]:
    return {
        "id": u.id, "name": u.name, "status": u.status, **money("balance", u.balance_nano),
        "concurrency": u.concurrency, "rpm": u.rpm, "tpm": u.tpm, "max_ips": u.max_ips,
        "created_at": u.created_at,
    }


def key_json(k: store.Key) -> dict[str, Any]:
    return {
        "id": k.id, "user_id": k.user_id, "user": k.user_name, "name": k.name,
        "key_prefix": k.key_prefix, "status": k.status, "expires_at": k.expires_at,
        "models": None if k.models is None else list(k.models), "group": k.group,
        **money("cap", k.cap_nano), **money("spent", k.spent_nano),
        "concurrency": k.concurrency, "rpm": k.rpm, "tpm": k.tpm,
        "allowed_cidrs": list(k.allowed_cidrs), "plan_id": k.plan_id, "created_at": k.created_at,
    }


def channel_json(c: store.Channel) -> dict[str, Any]:
    return {
        "id": c.id, "name": c.name, "protocol": c.protocol, "base_url": c.base_url,
        "api_key_env": c.api_key_env, "models": list(c.models), "model_map": c.model_map,
        "headers": c.headers, "priority": c.priority, "weight": c.weight,
        "max_concurrency": c.max_concurrency, "enabled": c.enabled, "source": c.source,
    }


def plan_json(p: plans.Plan) -> dict[str, Any]:
    return {
        "id": p.id, "name": p.name, **money("price", p.price_nano), **money("credit", p.credit_nano),
        "validity": p.validity, "validity_s": p.validity_s or _VALIDITY_S.get(p.validity),
        **money("periodic_credit", p.periodic_nano), "reset": p.reset, "reset_s": p.reset_s,
        "models": None if p.models is None else list(p.models), "groups": list(p.groups),
        "renewal_window_s": p.renewal_window_s, "status": p.status, "created_at": p.created_at,
    }


def subscription_json(s: plans.Subscription, now: datetime) -> dict[str, Any]:
    state = ("cancelled" if s.status == "cancelled" else "active" if now < s.expires_at else "expired")
    return {
        "id": s.id, "user_id": s.user_id, "plan_id": s.plan_id, "state": state,
        "started_at": s.started_at, "expires_at": s.expires_at, "cancelled_at": s.cancelled_at,
        **money("credit", s.credit_nano), **money("used", s.used_nano),
        **money("periodic_credit", s.periodic_nano), "reset": s.reset,
        **money("period_used", s.period_used(now)), **money("remaining", max(s.remaining(now), 0)),
        "periodic_enabled": s.periodic_enabled, "balance_fallback": s.balance_fallback,
        "renewals": s.renewals, "created_at": s.created_at,
    }


def with_usd(row: dict[str, Any], *names: str) -> dict[str, Any]:
    for n in names:
        if n in row and row[n] is not None:
            row[n.removesuffix("_nano") + "_usd"] = format_usd(row[n])
    return row


def price_json(row: pricing.PriceRow) -> dict[str, Any]:
    """A price version; `long_context_threshold` 0 (and long-context prices 0): no tier."""
    return {"model": row.model, "version": row.version, **money("input", row.input),
            **money("output", row.output), **money("cache_read", row.cache_read),
            **money("cache_write", row.cache_write), "unit": "USD per 1M tokens",
            "effective_at": (datetime.fromtimestamp(row.effective_at, UTC)
                             if row.effective_at else None),
            "long_context_threshold": row.long_context_threshold,
            **money("long_context_input", row.long_context_input),
            **money("long_context_output", row.long_context_output),
            **money("long_context_cache_read", row.long_context_cache_read),
            **money("long_context_cache_write", row.long_context_cache_write)}


def group_json(g: store.Group) -> dict[str, Any]:
    return {"name": g.name, "multiplier": g.multiplier, "models": list(g.models)}


def code_json(r: dict[str, Any]) -> dict[str, Any]:
    state = ("redeemed" if r["redeemed_by"] is not None else
             "void" if r.get("voided_at") is not None else
             "expired" if r["expires_at"] is not None and r["expires_at"] <= datetime.now(UTC)
             else "unused")
    return {"prefix": r["prefix"], "batch_id": r["batch_id"], **money("amount", r["amount_nano"]),
            "state": state, "expires_at": r["expires_at"], "redeemed_by": r["redeemed_by"],
            "redeemed_at": r["redeemed_at"], "created_at": r["created_at"]}


def credit_json(c: topups.Credit) -> dict[str, Any]:
    return {"topup_id": c.topup_id, "user_id": c.user_id, **money("amount", c.amount_nano),
            "external_id": c.external_id, "duplicate": c.duplicate,
            **money("balance", c.balance_nano), "created_at": c.created_at}



"""The admin API under /admin/v1: users, balances, keys, groups, channels, prices, codes,
plans, subscriptions and their team keys, plan codes, sign-up and invite codes, audit,
usage and health, as JSON over the gateway's own listener.

This module is only the HTTP face: the token guard, the route table and the OpenAPI
document. Each route calls one action of a resource module in relay.ops, the same
function the operator pages (relay.console.admin) and the CLI call, so an action has
one code path whichever door it came through.

Every route but the OpenAPI document needs the admin token (`Authorization: Bearer`,
compared in constant time); with no token configured every route answers 403 and says
how to set one. Each mutating call writes its change and its audit row in one
transaction, so the log never claims a change that rolled back. Money goes in as exact
USD strings ("5.00", or `*_nano` integers) and comes out as both. Workers see a change
through their version polling within a second. Nothing here logs or audits a secret
(key secrets and codes are returned once, in the response that creates them). The route
table is `ROUTES`; relay/openapi.yaml documents exactly those routes
(tests/test_openapi.py keeps them in step).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.httpserver import Request
from relay.ops import audit, channels, codes, groups, invites, keys, plans, prices, usage, users
from relay.ops.base import Env, Op
from relay.ops.parse import mapped
from relay.webapi import Api, ApiError, Call, Reply

PREFIX = "/admin/v1"
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
_ACTOR = re.compile(r"[A-Za-z0-9._@:+\-]{1,64}")

Action = Callable[[Op], Awaitable[Any]]


class Admin:
    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self._openapi: bytes | None = None

    async def guard(self, req: Request) -> str:
        """The acting admin's name for the audit log, or 401/403."""
        cfg = self.gw.cfg
        token = cfg.admin_token()
        if not token:
            raise ApiError(403, "admin_disabled",
                           f"The admin API is disabled: set the {cfg.admin.token_env} environment"
                           " variable (or token in the [admin] section of config.toml) to a long"
                           " random string and restart")
        self.gw.authguard.admin(token, req)
        raw = req.header(b"x-admin-actor")
        if raw is not None:
            name = raw.decode("latin-1").strip()
            if _ACTOR.fullmatch(name):
                return name
        return "admin"

    def env(self) -> Env:
        return Env(self.gw.cfg, self.gw.db, self.gw, getattr(self.gw, "settings", None))

    def handler(self, action: Action) -> Callable[[Call], Awaitable[Any]]:
        async def run(call: Call) -> Any:
            live = getattr(self.gw, "settings", None)
            if live is not None:
                await live.refresh(self.gw.db)
            return await action(Op(self.env(), call.ctx, call.params, call.query, call.body))

        run.__name__ = getattr(action, "__name__", "handler")
        return mapped(run)

    async def openapi(self, call: Call) -> Reply:
        if self._openapi is None:
            self._openapi = OPENAPI_PATH.read_bytes()
        return Reply(200, None, raw=self._openapi, content_type=b"application/yaml")


# (method, path, action). The OpenAPI document lists exactly these.
ROUTES: tuple[tuple[str, str, Action], ...] = (
    ("GET", "/admin/v1/users", users.users_list),
    ("POST", "/admin/v1/users", users.users_create),
    ("GET", "/admin/v1/users/{user}", users.users_show),
    ("PATCH", "/admin/v1/users/{user}", users.users_edit),
    ("DELETE", "/admin/v1/users/{user}", users.users_delete),
    ("GET", "/admin/v1/users/{user}/topups", users.topups_list),
    ("POST", "/admin/v1/users/{user}/topups", users.topups_create_for_user),
    ("POST", "/admin/v1/topups", users.topups_create),
    ("GET", "/admin/v1/keys", keys.keys_list),
    ("POST", "/admin/v1/keys", keys.keys_create),
    ("POST", "/admin/v1/keys/batch", keys.keys_batch),
    ("GET", "/admin/v1/keys/{key}", keys.keys_show),
    ("PATCH", "/admin/v1/keys/{key}", keys.keys_edit),
    ("DELETE", "/admin/v1/keys/{key}", keys.keys_delete),
    ("POST", "/admin/v1/keys/{key}/disable", keys.keys_disable),
    ("POST", "/admin/v1/keys/{key}/enable", keys.keys_enable),
    ("POST", "/admin/v1/keys/{key}/reset", keys.keys_reset),
    ("GET", "/admin/v1/groups", groups.groups_list),
    ("POST", "/admin/v1/groups", groups.groups_create),
    ("GET", "/admin/v1/groups/{group}", groups.groups_show),
    ("PATCH", "/admin/v1/groups/{group}", groups.groups_edit),
    ("GET", "/admin/v1/channels", channels.channels_list),
    ("POST", "/admin/v1/channels", channels.channels_create),
    ("GET", "/admin/v1/channels/{channel}", channels.channels_show),
    ("PATCH", "/admin/v1/channels/{channel}", channels.channels_edit),
    ("GET", "/admin/v1/channels/{channel}/health", channels.channels_health),
    ("POST", "/admin/v1/channels/{channel}/disable", channels.channels_disable),
    ("POST", "/admin/v1/channels/{channel}/enable", channels.channels_enable),
    ("GET", "/admin/v1/prices", prices.prices_list),
    ("POST", "/admin/v1/prices", prices.prices_set),
    ("GET", "/admin/v1/prices/history", prices.prices_history),
    ("GET", "/admin/v1/codes", codes.codes_list),
    ("POST", "/admin/v1/codes", codes.codes_create),
    ("GET", "/admin/v1/codes/{prefix}", codes.codes_show),
    ("GET", "/admin/v1/plans", plans.plans_list),
    ("POST", "/admin/v1/plans", plans.plans_create),
    ("GET", "/admin/v1/plans/{plan}", plans.plans_show),
    ("PATCH", "/admin/v1/plans/{plan}", plans.plans_edit),
    ("DELETE", "/admin/v1/plans/{plan}", plans.plans_delete),
    ("GET", "/admin/v1/plans/{plan}/codes", plans.plan_codes_list),
    ("POST", "/admin/v1/plans/{plan}/codes", plans.plan_codes_create),
    ("POST", "/admin/v1/plan-codes/redeem", plans.plan_codes_redeem),
    ("GET", "/admin/v1/subscriptions", plans.subscriptions_list),
    ("POST", "/admin/v1/subscriptions", plans.subscriptions_create),
    ("GET", "/admin/v1/subscriptions/{subscription}", plans.subscriptions_show),
    ("PATCH", "/admin/v1/subscriptions/{subscription}", plans.subscriptions_edit),
    ("POST", "/admin/v1/subscriptions/{subscription}/renew", plans.subscriptions_renew),
    ("POST", "/admin/v1/subscriptions/{subscription}/cancel", plans.subscriptions_cancel),
    ("GET", "/admin/v1/subscriptions/{subscription}/keys", plans.subscription_keys_list),
    ("POST", "/admin/v1/subscriptions/{subscription}/keys", plans.subscription_keys_create),
    ("POST", "/admin/v1/signup", invites.signup),
    ("GET", "/admin/v1/users/{user}/invite-codes", invites.invite_codes_list),
    ("POST", "/admin/v1/users/{user}/invite-codes", invites.invite_codes_create),
    ("GET", "/admin/v1/audit", audit.audit_list),
    ("GET", "/admin/v1/usage/series", usage.usage_series),
    ("GET", "/admin/v1/usage/models", usage.usage_models),
    ("GET", "/admin/v1/requests", usage.requests_list),
    ("GET", "/admin/v1/requests/{request_id}", usage.requests_show),
    ("GET", "/admin/v1/health", usage.health_view),
)
PUBLIC_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/admin/v1/openapi.yaml", "openapi"),
)


def build(gw: Any, worker: Any = None) -> Api:
    admin = Admin(gw)
    api = Api()
    api.prefixes = {PREFIX.encode() + b"/"}
    for method, path, name in PUBLIC_ROUTES:
        api.route(method, path)(mapped(getattr(admin, name)))
    for method, path, action in ROUTES:
        api.route(method, path, guard=admin.guard)(admin.handler(action))
    return api

"""`tollway plans ...` and `tollway subscriptions ...`: plans, subscriptions and team keys.

Command-line surface only: argument parsing and output (and the JSON shapes the admin
API shares). The work is done by accounting.plans; the connection comes from relay.cli.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import asyncpg

from accounting import plans, store
from accounting.money import format_usd
from relay.cli import (
    EXIT_OK,
    CliError,
    actor,
    db_command,
    print_json,
    print_table,
    usd,
)
from relay.ops.views import key_json, money, plan_json, subscription_json


def _now() -> datetime:
    return datetime.now(UTC)


def _user_ref(text: str) -> int | str:
    return int(text) if text.isdigit() else text


async def _plan_ref(conn: asyncpg.Connection, text: str) -> plans.Plan:
    return await plans.get_plan(conn, int(text) if text.isdigit() else text)


# --- plans ------------------------------------------------------------------------------


@db_command
async def _plans_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    p = await plans.create_plan(
        conn, args.name, usd(args.credit, "--credit"), args.validity,
        price_nano=usd(args.price, "--price"), validity_s=args.validity_seconds,
        periodic_nano=usd(args.periodic_credit, "--periodic-credit"), reset=args.reset,
        reset_s=args.reset_seconds,
        models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
        groups=[g.strip() for g in args.groups.split(",") if g.strip()],
        renewal_window_s=int(args.renewal_window_days * 86_400),
    )
    await store.audit(conn, actor(), "plan.create", str(p.id), {"name": p.name})
    if args.json:
        print_json(plan_json(p))
    else:
        print(f"created plan {p.id} ({p.name})")
    return EXIT_OK


@db_command
async def _plans_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    rows = await plans.list_plans(conn, include_archived=args.all)
    if args.json:
        print_json([plan_json(p) for p in rows])
        return EXIT_OK
    print_table([(p.id, p.name, plan_json(p)["price_usd"], plan_json(p)["credit_usd"], p.validity,
                  plan_json(p)["periodic_credit_usd"], p.reset, p.status) for p in rows],
                ("ID", "NAME", "PRICE_USD", "CREDIT_USD", "VALIDITY", "PERIODIC_USD", "RESET", "STATUS"))
    return EXIT_OK


@db_command
async def _plans_show(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    p = await _plan_ref(conn, args.plan)
    out = plan_json(p)
    if args.json:
        print_json(out)
    else:
        for k, v in out.items():
            sys.stdout.write(f"{k:<18}{'-' if v is None else v}\n")
    return EXIT_OK


# --- subscriptions ----------------------------------------------------------------------


def _payment_options(p: Any) -> None:
    # An operator selling a plan expects it paid: the price is debited from the user's
    # balance unless --free grants it (a gift, a trial, a payment taken elsewhere).
    p.add_argument("--free", action="store_true",
                   help="grant the plan without debiting its price from the user's balance")
    p.add_argument("--pay-from-balance", action="store_true", help=argparse.SUPPRESS)  # the default now


async def _unpaid(conn: asyncpg.Connection, exc: Exception, user: str, price: int) -> str:
    """A refused debit said in the operator's terms: the price, the balance, the way out."""
    if "below zero" not in str(exc):
        return str(exc)
    ref = _user_ref(user)
    col = "id" if isinstance(ref, int) else "name"
    bal = await conn.fetchval(f"SELECT balance_nano FROM users WHERE {col} = $1", ref)
    return (f"the plan costs {format_usd(price)} USD and the user's balance is"
            f" {format_usd(int(bal or 0))} USD: top up first, or pass --free to grant it without charge")


@db_command
async def _subs_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    p = await _plan_ref(conn, args.plan)
    try:
        sub, key_id, secret = await plans.subscribe(conn, _user_ref(args.user), p.id, _now(),
                                                    pay_from_balance=not args.free)
    except store.StoreError as exc:
        raise CliError(await _unpaid(conn, exc, args.user, p.price_nano))
    await store.audit(conn, actor(), "subscription.create", str(sub.id),
                      {"user_id": sub.user_id, "plan_id": p.id, "key_id": key_id})
    if args.json:
        print_json({**subscription_json(sub, _now()), "key_id": key_id, "key": secret})
    else:
        print(f"subscription {sub.id} until {sub.expires_at.isoformat()}; key {key_id}, secret shown only now:")
        print(secret)
    return EXIT_OK


@db_command
async def _subs_renew(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    try:
        sub = await plans.renew(conn, args.subscription, _now(), pay_from_balance=not args.free)
    except store.Conflict as exc:
        raise CliError(str(exc))
    except store.StoreError as exc:
        row = await conn.fetchrow("SELECT s.user_id, p.price_nano FROM subscriptions s"
                                  " JOIN plans p ON p.id = s.plan_id WHERE s.id = $1", args.subscription)
        if row is None:
            raise
        raise CliError(await _unpaid(conn, exc, str(row["user_id"]), int(row["price_nano"])))
    await store.audit(conn, actor(), "subscription.renew", str(sub.id), {"expires_at": sub.expires_at})
    if args.json:
        print_json(subscription_json(sub, _now()))
    else:
        print(f"subscription {sub.id} renewed until {sub.expires_at.isoformat()}")
    return EXIT_OK


@db_command
async def _subs_show(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    sub = await plans.get_subscription(conn, args.subscription)
    keys = await plans.subscription_keys(conn, sub.id)
    out = {**subscription_json(sub, _now()), "keys": [key_json(k) for k in keys]}
    if args.json:
        print_json(out)
        return EXIT_OK
    for k, v in out.items():
        if k != "keys":
            sys.stdout.write(f"{k:<22}{'-' if v is None else v}\n")
    print_table([(k.id, k.name, k.status, k.group, money("cap", k.cap_nano)["cap_usd"],
                  money("spent", k.spent_nano)["spent_usd"]) for k in keys],
                ("KEY", "NAME", "STATUS", "GROUP", "CAP_USD", "SPENT_USD"))
    return EXIT_OK


@db_command
async def _subs_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    subs = await plans.list_subscriptions(conn, _user_ref(args.user) if args.user else None)
    now = _now()
    rows = [subscription_json(s, now) for s in subs]
    if args.json:
        print_json(rows)
        return EXIT_OK
    print_table([(r["id"], r["user_id"], r["plan_id"], r["state"], r["expires_at"].isoformat(),
                  r["remaining_usd"]) for r in rows],
                ("ID", "USER", "PLAN", "STATE", "EXPIRES_AT", "REMAINING_USD"))
    return EXIT_OK


@db_command
async def _subs_keys_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    expires = None
    if args.expires:
        try:
            expires = datetime.fromisoformat(args.expires)
        except ValueError:
            raise CliError(f"--expires: expected an ISO date, got {args.expires!r}")
        expires = expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)
    made = await plans.create_team_keys(
        conn, args.subscription, args.name, quantity=args.quantity, group=args.group,
        expires_at=expires, cap_nano=usd(args.cap, "--cap") if args.cap else 0)
    await store.audit(conn, actor(), "subscription.keys", str(args.subscription),
                      {"key_ids": [k for k, _, _ in made]})
    if args.json:
        print_json([{"id": k, "name": n, "key": s} for k, s, n in made])
    else:
        sys.stderr.write(f"{len(made)} keys for subscription {args.subscription}; secrets shown only now\n")
        for k, s, n in made:
            print(f"{k}\t{n}\t{s}")
    return EXIT_OK


def register(subparsers: Any) -> None:
    grp = subparsers.add_parser("plans", help="subscription plans").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = grp.add_parser("create", help="create a plan")
    p.add_argument("name")
    p.add_argument("--price", default="0", metavar="USD")
    p.add_argument("--credit", required=True, metavar="USD", help="credit per term")
    p.add_argument("--validity", choices=plans.VALIDITIES, default="month")
    p.add_argument("--validity-seconds", type=int, default=0, help="with --validity custom")
    p.add_argument("--periodic-credit", default="0", metavar="USD", help="credit per reset cycle")
    p.add_argument("--reset", choices=plans.RESETS, default="none")
    p.add_argument("--reset-seconds", type=int, default=0, help="with --reset custom")
    p.add_argument("--models", help="comma-separated; default: every model")
    p.add_argument("--groups", default="default", help="comma-separated groups the plan covers")
    p.add_argument("--renewal-window-days", type=float, default=3.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plans_create)
    p = grp.add_parser("list", help="list plans")
    p.add_argument("--all", action="store_true", help="include archived plans")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plans_list)
    p = grp.add_parser("show", help="show one plan")
    p.add_argument("plan", help="id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plans_show)

    grp = subparsers.add_parser("subscriptions", help="users' subscriptions and their keys").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = grp.add_parser("create", help="subscribe a user to a plan (prints the key once)")
    p.add_argument("--user", required=True, help="id or name")
    p.add_argument("--plan", required=True, help="id or name")
    _payment_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_subs_create)
    p = grp.add_parser("renew", help="extend a subscription by one term (inside its renewal window)")
    p.add_argument("subscription", type=int)
    _payment_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_subs_renew)
    p = grp.add_parser("show", help="show a subscription and its keys")
    p.add_argument("subscription", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_subs_show)
    p = grp.add_parser("list", help="list subscriptions")
    p.add_argument("--user", help="id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_subs_list)
    keys = grp.add_parser("keys", help="team keys of a subscription").add_subparsers(
        dest="keys_action", metavar="ACTION", required=True)
    p = keys.add_parser("create", help="create team keys (secrets printed once)")
    p.add_argument("subscription", type=int, metavar="SUB_ID")
    p.add_argument("--name", required=True)
    p.add_argument("--quantity", type=int, default=1, help="more than 1: random name suffixes")
    p.add_argument("--cap", metavar="USD", help="how much plan credit each key may consume")
    p.add_argument("--group", help="one of the plan's groups (default: its first)")
    p.add_argument("--expires", metavar="ISO-DATE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_subs_keys_create)

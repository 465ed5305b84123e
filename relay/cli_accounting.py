"""`tollway codes ...` and `tollway usage ...`: redemption codes and usage lookups.

Command-line surface only: argument parsing and output. The work is done by
accounting.codes and accounting.reports; the connection comes from relay.cli.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import asyncpg

from accounting import codes, pricing, reports
from accounting.money import format_usd, parse_multiplier
from relay.cli import CliError, db_command, money, print_json, print_table, usd


def _iso(text: str, what: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{what}: expected an ISO date such as 2026-12-31 or 2026-12-31T18:00+02:00, got {text!r}")
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# --- codes --------------------------------------------------------------------------------


@db_command
async def _codes_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    amount = usd(args.amount, "--amount")
    expires = _iso(args.expires, "--expires") if args.expires else None
    try:
        made = await codes.create_codes(conn, amount, args.count, expires)
    except ValueError as exc:
        raise CliError(str(exc))
    if args.json:
        print_json({"codes": made, **money("amount", amount), "expires_at": expires})
    else:
        for c in made:
            sys.stdout.write(c + "\n")
        sys.stderr.write(f"{len(made)} codes of {format_usd(amount)} USD (shown once: store them now)\n")
    return 0


@db_command
async def _codes_redeem(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    uid = await conn.fetchval("SELECT id FROM users WHERE name = $1", args.user)
    if uid is None:
        raise CliError(f"user {args.user!r} not found")
    try:
        amount = await codes.redeem(conn, args.code, int(uid))
    except codes.CodeError as exc:
        raise CliError(str(exc))
    bal = int(await conn.fetchval("SELECT balance_nano FROM users WHERE id = $1", uid))
    if args.json:
        print_json({"user": args.user, **money("amount", amount), **money("balance", bal)})
    else:
        print(f"{args.user}: {format_usd(amount)} USD credited, balance {format_usd(bal)} USD")
    return 0


@db_command
async def _codes_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from relay.ops.views import code_json  # the admin API's view of a code: one shape for both

    if args.state is not None and args.state not in ("unused", "redeemed", "expired"):
        raise CliError(f"--state: expected unused, redeemed or expired, got {args.state!r}")
    rows = await reports.list_codes(conn, batch_id=args.batch,
                                    prefix=args.prefix.upper() if args.prefix else None,
                                    state=args.state, limit=max(1, min(args.limit, 10_000)))
    out = [code_json(r) for r in rows]
    if args.json:
        print_json({"data": out})
        return 0
    if not out:
        sys.stdout.write("no redemption codes\n")
        return 0
    sys.stdout.write(f"{'prefix':<10} {'batch':>6} {'amount USD':>12} {'state':<9} {'expires':<26}"
                     f" {'redeemed by':>11}\n")
    for c in out:
        exp = c["expires_at"].isoformat() if c["expires_at"] else "-"
        sys.stdout.write(f"{c['prefix']:<10} {c['batch_id']:>6} {c['amount_usd']:>12} {c['state']:<9}"
                         f" {exp:<26} {c['redeemed_by'] if c['redeemed_by'] is not None else '-':>11}\n")
    return 0


# --- usage --------------------------------------------------------------------------------


def _usage_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, **money("cost", row["cost_nano"])}


async def _multiplier(conn: asyncpg.Connection, group: str) -> Fraction:
    text = await conn.fetchval("SELECT multiplier FROM groups WHERE name = $1", group)
    try:
        return parse_multiplier(text) if text else Fraction(1)
    except ValueError:
        return Fraction(1)


@db_command
async def _usage_show(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    row = await reports.usage_row(conn, args.request_id)
    if row is None:
        raise CliError(f"no usage row for request {args.request_id!r}")
    out = _usage_json(row)
    price = await pricing.load_version(conn, row["price_version"]) if row["price_version"] else None
    if price is not None:
        out["bill"] = reports.explain(row, price, fallback=await _multiplier(conn, row["group"]))
    if args.json:
        print_json(out)
        return 0
    width = max(len(k) for k in out)
    for k, v in out.items():
        if k == "bill":
            continue
        sys.stdout.write(f"{k.ljust(width)}  {v.isoformat() if isinstance(v, datetime) else v}\n")
    bill = out.get("bill")
    if bill is not None:
        sys.stdout.write(f"\nbill (price version {bill['price_version']}, multiplier {bill['multiplier']}):\n")
        if bill["tier"] == "long_context":
            sys.stdout.write(f"  long-context prices: input {bill['input_tokens_total']} tokens is above"
                             f" the version's threshold of {bill['long_context_threshold']}\n")
        for c in bill["classes"]:
            sys.stdout.write(f"  {c['class']:<12} {c['tokens']:>10} x {c['usd_per_million']} USD/1M"
                             f" = {c['subtotal_usd']} USD\n")
        sys.stdout.write(f"  exact {bill['exact_total_usd']} USD, rounded {bill['rounding']}:"
                         f" {bill['cost_usd']} USD"
                         f"{'' if bill['matches_charged'] else ' (differs from the amount charged)'}\n")
    return 0


@db_command
async def _usage_log(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    user_id = None
    if args.user:
        user_id = await conn.fetchval("SELECT id FROM users WHERE name = $1", args.user)
        if user_id is None:
            raise CliError(f"user {args.user!r} not found")
    try:
        rows, cursor = await reports.request_log(
            conn, start=_iso(args.since, "--since") if args.since else None,
            end=_iso(args.until, "--until") if args.until else None,
            user_id=user_id, key_id=args.key, model=args.model, group=args.group,
            status=args.status, errors_only=args.errors, limit=args.limit,
            before_cursor=args.before,
        )
    except ValueError as exc:
        raise CliError(str(exc))
    if args.json:
        print_json({"rows": [_usage_json(r) for r in rows], "next_cursor": cursor})
        return 0
    print_table(
        [(r["ts"].isoformat(timespec="seconds"), r["request_id"], r["user_id"], r["key_id"],
          r["model"], r["status"], r["input_tokens"] + r["cache_read_tokens"] + r["cache_write_tokens"],
          r["output_tokens"], format_usd(r["cost_nano"]), r["latency_ms"]) for r in rows],
        ("TS", "REQUEST_ID", "USER", "KEY", "MODEL", "STATUS", "IN", "OUT", "COST_USD", "MS"),
    )
    if cursor:
        sys.stderr.write(f"more: --before '{cursor}'\n")
    return 0


def register(subparsers: Any) -> None:
    grp = subparsers.add_parser("codes", help="redemption codes").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = grp.add_parser("create", help="create a batch of codes (printed once)")
    p.add_argument("--amount", required=True, metavar="USD", help="value of each code")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--expires", metavar="ISO-DATE", help="expiry (UTC unless an offset is given)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_codes_create)
    p = grp.add_parser("list", help="list codes (their prefixes and state; never the code)")
    p.add_argument("--batch", type=int, help="only this batch")
    p.add_argument("--state", metavar="STATE", help="unused, redeemed or expired")
    p.add_argument("--prefix", help="codes starting with this")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_codes_list)
    p = grp.add_parser("redeem", help="credit a code to a user")
    p.add_argument("code")
    p.add_argument("--user", required=True, help="user name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_codes_redeem)

    grp = subparsers.add_parser("usage", help="usage rows and bills").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = grp.add_parser("show", help="one request's usage row and its bill")
    p.add_argument("request_id", metavar="ID",
                   help="the gateway's request id (x-request-id), the client's own x-request-id,"
                        " or the response body's id (chatcmpl-…, msg_…, resp_…)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_usage_show)
    p = grp.add_parser("log", help="recent requests, newest first")
    p.add_argument("--user", help="user name")
    p.add_argument("--key", type=int, help="key id")
    p.add_argument("--model")
    p.add_argument("--group")
    p.add_argument("--status", type=int)
    p.add_argument("--errors", action="store_true", help="only failed requests")
    p.add_argument("--since", metavar="ISO-DATE")
    p.add_argument("--until", metavar="ISO-DATE")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", metavar="CURSOR", help="next page: the cursor a previous page printed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_usage_log)

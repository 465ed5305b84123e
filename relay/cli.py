"""The `tollway` operator command: serve, migrate, users, keys, channels.

Each command reads the config, opens one short-lived database connection (joining the
embedded server a running gateway already uses, or starting it), does its work and
exits. Every read command prints stable JSON with `--json`: money as exact USD strings
beside `*_nano` integers. Errors print one line to stderr and exit 2, never a
traceback. Other modules add commands through `COMMAND_MODULES` (each exposes
`register(subparsers)`); this module does not serve traffic itself (`serve` hands the
config to relay.server).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import importlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson

from accounting import migrate, store
from accounting.db import EmbeddedPostgresError, resolve_dsn
from accounting.money import format_usd, parse_usd
from relay.config import Config, ConfigError, load
from relay.ops.views import channel_json, key_json, money, user_json

COMMAND_MODULES = ["relay.cli_accounting", "relay.cli_limits", "relay.cli_admin", "relay.cli_plans"]

EXIT_OK = 0
EXIT_ERROR = 2


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# --- helpers shared with the command modules ----------------------------------------------


def load_config(path: str | None) -> Config:
    """`path`, else ./config.toml when present, else the built-in defaults."""
    if path:
        return load(path)
    if Path("config.toml").is_file():
        return load("config.toml")
    return Config()


def usd(text: str, what: str = "amount", *, allow_negative: bool = False) -> int:
    """Exact nano-USD from a command-line USD string, or a CliError naming the option."""
    try:
        return parse_usd(text, allow_negative=allow_negative, what=what)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CliError(str(exc))


def print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2, default=_json_default).decode() + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, tuple | frozenset | set):
        return list(obj)
    raise TypeError(type(obj).__name__)


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return f"cli:uid{os.getuid()}"


@asynccontextmanager
async def open_db(cfg: Config) -> AsyncIterator[asyncpg.Connection]:
    """One connection for one command. The embedded server is joined (or started, then
    stopped if no one else holds it) and its schema brought up to date."""
    dsn, embedded = await asyncio.to_thread(resolve_dsn, cfg)
    try:
        conn = await asyncpg.connect(dsn, timeout=10, server_settings={"jit": "off", "application_name": "tollway-cli"})
        try:
            if embedded is not None:
                await migrate.apply(conn)  # the quick start needs no separate step
            yield conn
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


DbHandler = Callable[[asyncpg.Connection, argparse.Namespace], Awaitable[int | None]]


def db_command(fn: DbHandler) -> Callable[[argparse.Namespace], int]:
    """Turn `async fn(conn, args)` into a `func(args) -> int` handler with its own connection."""

    def handler(args: argparse.Namespace) -> int:
        async def run() -> int:
            async with open_db(args.cfg) as conn:
                return (await fn(conn, args)) or EXIT_OK

        return asyncio.run(run())

    handler.__name__ = fn.__name__
    return handler


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _expiry(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--expires: expected an ISO date such as 2026-12-31 or 2026-12-31T18:00+02:00, got {text!r}")
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# --- records as output -------------------------------------------------------------------


def _print_record(obj: dict[str, Any]) -> None:
    width = max(len(k) for k in obj)
    for k, v in obj.items():
        if isinstance(v, datetime):
            v = v.isoformat()
        elif isinstance(v, list | tuple):
            v = ",".join(v) if v else "-"
        elif v is None:
            v = "-"
        sys.stdout.write(f"{k.ljust(width)}  {v}\n")


# --- serve / migrate ---------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg: Config = args.cfg
    changes: dict[str, Any] = {}
    if args.host is not None:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    if args.workers is not None:
        changes["workers"] = args.workers
    if changes:
        # cast: mypy does not see through config's partial(dataclass) decorator
        server_cfg = dataclasses.replace(cast(Any, cfg.server), **changes)
        cfg = dataclasses.replace(cast(Any, cfg), server=server_cfg)
    from relay import server  # heavy: only the serve command needs it

    return int(server.run(cfg) or 0)


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected \"auto\" or an integer >= 1, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}")
    return int(text)


def _cmd_migrate(args: argparse.Namespace) -> int:
    async def run() -> list[str]:
        dsn, embedded = await asyncio.to_thread(resolve_dsn, args.cfg)
        try:
            return await migrate.apply_dsn(dsn)
        finally:
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)

    applied = asyncio.run(run())
    if args.json:
        print_json({"applied": applied})
    else:
        print("\n".join(f"applied {name}" for name in applied) or "schema is up to date")
    return EXIT_OK


# --- users -------------------------------------------------------------------------------


def _op(conn: asyncpg.Connection, args: argparse.Namespace, fields: dict[str, Any],
        params: dict[str, str] | None = None) -> Any:
    """An operator action run from the shell: the same relay.ops function the admin API
    and the operator pages call, over this command's one connection."""
    from relay.ops.base import Env, OneConnection, Op

    return Op(Env(args.cfg, OneConnection(conn)), actor(), params or {}, {}, fields)


async def _run_op(action: Any, op: Any) -> Any:
    from relay.errors import GatewayError
    from relay.ops.parse import mapped

    try:
        return await mapped(action)(op)
    except GatewayError as exc:
        raise CliError(exc.message)


@db_command
async def _users_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from relay.ops import users

    if args.email is None and args.role not in (None, "user"):
        raise CliError("--role needs --email: an operator signs in to the console")
    if args.email is None:
        fields: dict[str, Any] = {"name": args.name}
        if args.balance:
            fields["balance_nano"] = usd(args.balance, "--balance")
        made = await _run_op(users.users_create, _op(conn, args, fields))
        if args.json:
            print_json(made.body)
        else:
            print(f"created user {made.body['name']} (id {made.body['id']}),"
                  f" balance {made.body['balance_usd']} USD")
        return EXIT_OK
    made = await _run_op(users.users_invite, _op(
        conn, args, {"name": args.name, "email": args.email, "role": args.role or "user"}))
    out = dict(made.body)
    if args.balance:
        await _run_op(users.users_adjust, _op(conn, args, {"amount": args.balance,
                                                           "note": "opening balance"},
                                              {"user": str(out["id"])}))
    base = (args.cfg.accounts.public_url
            or f"http://{args.cfg.server.host}:{args.cfg.server.port}").rstrip("/")
    url = f"{base}/console/set-password?token={out.pop('setup_token')}"
    if args.json:
        print_json({**out, "setup_url": url})
    else:
        print(f"created {out['role']} {out['name']} (id {out['id']}, {out['email']});"
              " the one-time link to set the password (valid 7 days):")
        print(url)
    return EXIT_OK


@db_command
async def _users_topup(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    amount = usd(args.amount, "amount", allow_negative=True)
    duplicate = False
    if amount > 0:
        # The admin API's path (accounting.topups): it tells a repeat of an external id,
        # which credits nothing, from a credit.
        from accounting import growth, topups

        async with conn.transaction():
            user = await store.get_user(conn, args.name)
            if user is None:
                raise CliError(f"user {args.name!r} not found")
            c = await topups.credit(conn, user.id, amount, args.external_id, args.note)
            duplicate, balance = c.duplicate, c.balance_nano
            if not duplicate:
                await store.audit(conn, actor(), "user.topup", args.name,
                                  {"amount_nano": amount, "external_id": args.external_id,
                                   "note": args.note, "topup_id": c.topup_id})
                await growth.reward_inviter(conn, user.id, c.topup_id, amount,
                                            growth.Terms.of(args.cfg.growth).share)
    else:
        balance = await store.topup(conn, args.name, amount, note=args.note)
        await store.audit(conn, actor(), "user.topup", args.name,
                          {"amount_nano": amount, "note": args.note})
    if args.json:
        print_json({"name": args.name, **money("amount", amount), "duplicate": duplicate,
                    **money("credited", 0 if duplicate else amount), **money("balance", balance)})
    elif duplicate:
        print(f"{args.name}: nothing credited: external id {args.external_id!r} was already applied;"
              f" balance {format_usd(balance)} USD")
    else:
        verb = "credited" if amount > 0 else "debited"
        print(f"{args.name}: {format_usd(abs(amount))} USD {verb}, balance {format_usd(balance)} USD")
    return EXIT_OK


@db_command
async def _users_show(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    u = await store.get_user(conn, args.name)
    if u is None:
        raise CliError(f"user {args.name!r} not found")
    if args.json:
        print_json(user_json(u))
    else:
        _print_record(user_json(u))
    return EXIT_OK


@db_command
async def _users_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    users = await store.list_users(conn)
    if args.json:
        print_json([user_json(u) for u in users])
    else:
        print_table([(u.id, u.name, u.status, format_usd(u.balance_nano)) for u in users],
                    ("ID", "NAME", "STATUS", "BALANCE_USD"))
    return EXIT_OK


# --- keys --------------------------------------------------------------------------------


def _key_options(p: argparse.ArgumentParser, *, edit: bool) -> None:
    p.add_argument("--name", help="label shown in listings")
    p.add_argument("--models", type=_csv, help="comma-separated models or patterns (default: all of the group)")
    p.add_argument("--expires", metavar="ISO-DATE", help="expiry, e.g. 2026-12-31 (UTC unless an offset is given)")
    p.add_argument("--group", help="pricing/model group (default: default)")
    p.add_argument("--cap", metavar="USD", help="spending cap in USD (0: none)")
    p.add_argument("--concurrency", type=int, help="parallel requests (0: configured default)")
    p.add_argument("--rpm", type=int, help="requests per minute (0: configured default)")
    p.add_argument("--tpm", type=int, help="tokens per minute (0: configured default)")
    p.add_argument("--cidrs", type=_csv, help="comma-separated client networks allowed (empty: any)")
    if edit:
        p.add_argument("--all-models", action="store_true", help="allow every model of the group")
        p.add_argument("--never-expires", action="store_true", help="remove the expiry")
    p.add_argument("--json", action="store_true")


def _key_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.name is not None:
        fields["name"] = args.name
    if args.models is not None:
        fields["models"] = args.models
    if getattr(args, "all_models", False):
        if args.models is not None:
            raise CliError("--models and --all-models exclude each other")
        fields["models"] = None
    if args.expires is not None:
        fields["expires_at"] = _expiry(args.expires)
    if getattr(args, "never_expires", False):
        if args.expires is not None:
            raise CliError("--expires and --never-expires exclude each other")
        fields["expires_at"] = None
    if args.group is not None:
        fields["group"] = args.group
    if args.cap is not None:
        fields["cap_nano"] = usd(args.cap, "--cap")
    for name in ("concurrency", "rpm", "tpm"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.cidrs is not None:
        fields["allowed_cidrs"] = args.cidrs
    return fields


@db_command
async def _keys_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from relay.ops import keys

    made = await _run_op(keys.keys_create, _op(conn, args, {"user": args.user,
                                                             **_key_body(_key_fields(args))}))
    out = dict(made.body)
    secret = out.pop("secret")
    if args.json:
        print_json({**out, "key": secret})
    else:
        print(f"created key {out['id']} for {out['user']}; the secret is shown only now:")
        print(secret)
    return EXIT_OK


def _key_body(fields: dict[str, Any]) -> dict[str, Any]:
    """The command's parsed options as the admin API's JSON fields (relay.ops.keys)."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in fields.items()}


@db_command
async def _keys_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    keys = await store.list_keys(conn, args.user, include_deleted=args.all)
    if args.json:
        print_json([key_json(k) for k in keys])
    else:
        print_table(
            [(k.id, k.user_name, k.name, k.key_prefix + "...", k.status, k.group,
              ",".join(k.models) if k.models is not None else "*",
              format_usd(k.cap_nano) if k.cap_nano else "-", format_usd(k.spent_nano),
              k.expires_at.date().isoformat() if k.expires_at else "-")
             for k in keys],
            ("ID", "USER", "NAME", "KEY", "STATUS", "GROUP", "MODELS", "CAP_USD", "SPENT_USD", "EXPIRES"),
        )
    return EXIT_OK


@db_command
async def _keys_show(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    key = await store.get_key(conn, args.id)
    if key is None:
        raise CliError(f"key {args.id} not found")
    if args.json:
        print_json(key_json(key))
    else:
        _print_record(key_json(key))
    return EXIT_OK


@db_command
async def _keys_edit(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from relay.ops import keys

    fields = _key_fields(args)
    if not fields:
        raise CliError("keys edit: nothing to change (see tollway keys edit --help)")
    out = await _run_op(keys.keys_edit, _op(conn, args, _key_body(fields), {"key": str(args.id)}))
    if args.json:
        print_json(out)
    else:
        print(f"key {out['id']} updated")
    return EXIT_OK


def _key_action(action: str) -> Callable[[argparse.Namespace], int]:
    @db_command
    async def run(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
        # The admin API's and the operator pages' action (relay.ops.keys): same checks,
        # same audit row.
        from relay.ops import keys

        fn = {"disable": keys.keys_disable, "enable": keys.keys_enable, "delete": keys.keys_delete,
              "reset": keys.keys_reset}[action]
        out = await _run_op(fn, _op(conn, args, {}, {"key": str(args.id)}))
        secret = out.pop("secret", None)
        if args.json:
            print_json({**out, **({"key": secret} if secret else {})})
        elif secret:
            print(f"key {args.id} has a new secret; the old one no longer works. Shown only now:")
            print(secret)
        else:
            print(f"key {args.id} {'deleted' if action == 'delete' else action + 'd'}")
        return EXIT_OK

    return run


# --- channels ----------------------------------------------------------------------------


@db_command
async def _channels_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    # Read only: syncing here could apply a different config than the gateway's.
    chans = await store.list_channels(conn)
    if args.json:
        print_json([channel_json(c) for c in chans])
    else:
        print_table(
            [(c.id, c.name, c.protocol, c.base_url, ",".join(c.models), c.priority, c.weight,
              "yes" if c.enabled else "no", c.source) for c in chans],
            ("ID", "NAME", "PROTOCOL", "BASE_URL", "MODELS", "PRIORITY", "WEIGHT", "ENABLED", "SOURCE"),
        )
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollway", description="Tollway LLM API gateway")
    parser.add_argument("--config", metavar="PATH", help="config file (default: ./config.toml if present)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--host")
    p.add_argument("--port", type=_port)
    p.add_argument("--workers", type=_workers, metavar="N|auto")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("migrate", help="apply pending schema migrations")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_migrate)

    users = sub.add_parser("users", help="create, credit and inspect users").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = users.add_parser("create", help="create a user")
    p.add_argument("name")
    p.add_argument("--balance", metavar="USD", help="opening balance in USD")
    p.add_argument("--email", help="console login: prints a one-time link to set the password")
    p.add_argument("--role", choices=("owner", "admin", "viewer", "user"),
                   help="console role (default: user); operators need --email")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_users_create)
    p = users.add_parser("topup", help="credit a balance (negative: debit)")
    p.add_argument("name")
    p.add_argument("amount", metavar="USD")
    p.add_argument("--external-id", help="payment reference; a repeat with the same id is a no-op")
    p.add_argument("--note", default="", help="journal note")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_users_topup)
    p = users.add_parser("show", help="show one user")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_users_show)
    p = users.add_parser("list", help="list users")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_users_list)

    keys = sub.add_parser("keys", help="create and manage API keys").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = keys.add_parser("create", help="create a key (prints its secret once)")
    p.add_argument("--user", required=True, help="owner's user name")
    _key_options(p, edit=False)
    p.set_defaults(func=_keys_create)
    p = keys.add_parser("list", help="list keys")
    p.add_argument("--user", help="only this user's keys")
    p.add_argument("--all", action="store_true", help="include deleted keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_keys_list)
    p = keys.add_parser("show", help="show one key")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_keys_show)
    for action, text in (
        ("disable", "stop a key from authenticating"),
        ("enable", "re-enable a disabled key"),
        ("reset", "replace a key's secret (prints the new one once)"),
        ("delete", "delete a key for good"),
    ):
        p = keys.add_parser(action, help=text)
        p.add_argument("id", type=int)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_key_action(action))
    p = keys.add_parser("edit", help="change a key's settings")
    p.add_argument("id", type=int)
    _key_options(p, edit=True)
    p.set_defaults(func=_keys_edit)

    chans = sub.add_parser("channels", help="inspect upstream channels").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = chans.add_parser("list", help="list channels (config and admin)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_channels_list)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that feature is not installed
            raise
        module.register(sub)
    _config_anywhere(parser)
    return parser


def _config_anywhere(parser: argparse.ArgumentParser) -> None:
    """`--config` after the command too (`tollway users create bob --config x.toml`): every
    subcommand takes it; SUPPRESS keeps the value given before the command otherwise."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--config" in a.option_strings for a in child._actions):
                    child.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                                       help="config file (default: ./config.toml if present)")
                _config_anywhere(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        args.cfg = load_config(args.config)
        return int(args.func(args) or EXIT_OK)
    except (CliError, store.StoreError, ConfigError, EmbeddedPostgresError) as exc:
        return _fail(str(exc))
    except asyncpg.UndefinedTableError as exc:
        return _fail(f"database schema is missing or outdated ({exc}); run `tollway migrate`")
    except asyncpg.PostgresError as exc:
        return _fail(f"database: {exc}")
    except (TimeoutError, OSError) as exc:
        return _fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    sys.stderr.write(f"tollway: error: {message}\n")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""Reading what an operator sent: JSON bodies and query strings into exact values.

Shared by every resource module (and the key holder's API, relay.keyapi): a misspelt
field fails instead of silently leaving a limit unset, money is an exact USD string or
an integer of nano-USD (never a float), times are ISO 8601 (UTC without an offset).
`mapped` turns storage's refusals into the API's error family. No I/O here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from accounting import codes, store
from accounting.money import parse_usd
from relay import errors as E
from relay.webapi import ApiError

_WINDOW = re.compile(r"(\d{1,5})([mhd])")
_WINDOW_UNIT = {"m": "minutes", "h": "hours", "d": "days"}


# --- request parsing -------------------------------------------------------------------


def only(body: dict[str, Any], allowed: set[str]) -> None:
    """A misspelt field must fail, not silently leave a limit unset."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise E.InvalidRequest(f"{unknown[0]}: unknown field (known: {', '.join(sorted(allowed))})")


def text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise E.InvalidRequest(f"{name}: required")
        return None
    if not isinstance(v, str):
        raise E.InvalidRequest(f"{name}: expected a string, got {v!r}")
    return v


def int_(body: dict[str, Any], name: str, *, lo: int = 0, hi: int = 2**31 - 1) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise E.InvalidRequest(f"{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def nano(body: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    """`name` as an exact USD string, or `name_nano` as an integer of nano-USD."""
    usd, nano = body.get(name), body.get(f"{name}_nano")
    if usd is not None and nano is not None:
        raise E.InvalidRequest(f"{name}: give {name} (USD string) or {name}_nano, not both")
    if usd is not None:
        if not isinstance(usd, str):
            raise E.InvalidRequest(f"{name}: expected a decimal string such as \"5.00\", got {usd!r}"
                                   " (numbers are refused: they may not be exact)")
        try:
            return parse_usd(usd, what=name)
        except (ValueError, OverflowError) as exc:
            raise E.InvalidRequest(str(exc))
    if nano is not None:
        if isinstance(nano, bool) or not isinstance(nano, int) or not 0 <= nano < 2**63:
            raise E.InvalidRequest(f"{name}_nano: expected an integer >= 0, got {nano!r}")
        return nano
    if required:
        raise E.InvalidRequest(f"{name}: required (a USD string such as \"5.00\")")
    return None


def names(body: dict[str, Any], name: str) -> list[str] | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise E.InvalidRequest(f"{name}: expected a list of strings, got {v!r}")
    return v


def parse_time(value: str, what: str) -> datetime:
    """ISO 8601 date or datetime; without an offset it is UTC."""
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise E.InvalidRequest(f"{what}: expected an ISO 8601 time such as 2026-01-31T12:00:00Z,"
                               f" got {value!r}")
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def time_(body: dict[str, Any], name: str) -> datetime | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise E.InvalidRequest(f"{name}: expected an ISO 8601 string or null, got {v!r}")
    return parse_time(v, name)


def window(query: dict[str, str], default: timedelta) -> tuple[datetime, datetime]:
    """[start, end) from `start`/`end` (ISO 8601) or `window` ("90m", "24h", "7d")."""
    end = parse_time(query["end"], "end") if query.get("end") else datetime.now(UTC)
    if query.get("start"):
        start = parse_time(query["start"], "start")
    elif query.get("window"):
        m = _WINDOW.fullmatch(query["window"].strip())
        if m is None:
            raise E.InvalidRequest(f"window: expected a number and m, h or d (\"24h\"), got {query['window']!r}")
        start = end - timedelta(**{_WINDOW_UNIT[m.group(2)]: int(m.group(1))})
    else:
        start = end - default
    if start >= end:
        raise E.InvalidRequest("start: must be before end")
    return start, end


def q_int(query: dict[str, str], name: str, default: int | None = None, *, lo: int = 0,
          hi: int = 2**63 - 1) -> int | None:
    v = query.get(name)
    if v is None or v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        n = lo - 1
    if not lo <= n <= hi:
        raise E.InvalidRequest(f"{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return n


def q_bool(query: dict[str, str], name: str) -> bool:
    v = query.get(name, "").lower()
    if v in ("", "0", "false", "no"):
        return False
    if v in ("1", "true", "yes"):
        return True
    raise E.InvalidRequest(f"{name}: expected true or false, got {v!r}")


def encode_cursor(cursor: str | None) -> str | None:
    """The request log's keyset cursor as URL-safe text (it holds '+' and '|')."""
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")


def decode_cursor(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise E.InvalidRequest(f"cursor: not a cursor this API returned: {text!r}")


def ref(text: str) -> int | str:
    """A path or query reference to a user or channel: digits are an id, anything else a name."""
    return int(text) if text.isdigit() else text


def id_(text: str, what: str) -> int:
    if not text.isdigit():
        raise E.NotFound(f"{what} {text!r} not found")
    return int(text)


def offset_page(rows: list[Any], limit: int, offset: int) -> dict[str, Any]:
    """Offset pages with the same shape as the keyset pages: pass `next` back as `cursor`."""
    more = len(rows) > offset + limit
    return {"data": rows[offset:offset + limit], "next": str(offset + limit) if more else None}


def mapped(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Storage's refusals become API errors (404, 409, 400) with their safe messages."""

    async def run(*args: Any) -> Any:
        try:
            return await fn(*args)
        except store.NotFound as exc:
            raise E.NotFound(str(exc))
        except store.Conflict as exc:
            raise ApiError(409, "conflict", str(exc))
        except codes.CodeNotFound as exc:
            raise E.NotFound(str(exc))
        except (codes.CodeAlreadyRedeemed, codes.CodeExpired) as exc:
            raise ApiError(409, "code_unavailable", str(exc))
        except (store.StoreError, codes.CodeError, ValueError, OverflowError,
                asyncpg.DataError) as exc:
            raise E.InvalidRequest(str(exc))

    run.__name__ = getattr(fn, "__name__", "handler")
    return run



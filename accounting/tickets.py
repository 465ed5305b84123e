"""Support tickets: a thread between a key holder and the operators, optionally about one
logged request. States: `open` (waiting for the operators), `waiting` (waiting for the
key holder), `closed`. A key holder's reply reopens; an operator's reply waits for the
key holder unless the operator closes it. Bodies are what people wrote to each other
(never a request's body). This module never imports relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from accounting import store
from accounting.store import NotFound, StoreError

Conn = Any
STATES = ("open", "waiting", "closed")
MAX_SUBJECT = 200
MAX_BODY = 10_000


@dataclass(frozen=True, slots=True)
class Ticket:
    id: int
    user_id: int
    subject: str
    request_id: str
    state: str
    created_at: datetime
    updated_at: datetime


_COLS = "id, user_id, subject, request_id, state, created_at, updated_at"


def _check(subject: str | None, body: str) -> None:
    if subject is not None and not 1 <= len(subject.strip()) <= MAX_SUBJECT:
        raise StoreError(f"The subject must have 1 to {MAX_SUBJECT} characters")
    if not 1 <= len(body.strip()) <= MAX_BODY:
        raise StoreError(f"The message must have 1 to {MAX_BODY} characters")


async def open_ticket(conn: Conn, user_id: int, subject: str, body: str,
                      request_id: str = "") -> Ticket:
    _check(subject, body)
    async with store._transaction(conn) as tx:
        row = await tx.fetchrow(
            f"INSERT INTO tickets (user_id, subject, request_id) VALUES ($1, $2, $3) RETURNING {_COLS}",
            user_id, subject.strip(), request_id.strip()[:200])
        await tx.execute("INSERT INTO ticket_messages (ticket_id, author_id, staff, body)"
                         " VALUES ($1, $2, false, $3)", row["id"], user_id, body.strip())
    return Ticket(**dict(row))


async def get(conn: Conn, ticket_id: int) -> Ticket:
    row = await conn.fetchrow(f"SELECT {_COLS} FROM tickets WHERE id = $1", ticket_id)
    if row is None:
        raise NotFound(f"ticket {ticket_id} not found")
    return Ticket(**dict(row))


async def messages(conn: Conn, ticket_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT m.id, m.staff, m.body, m.created_at, m.author_id,"
        " coalesce(u.email, u.name) AS author FROM ticket_messages m"
        " LEFT JOIN users u ON u.id = m.author_id WHERE m.ticket_id = $1 ORDER BY m.id", ticket_id)
    return [dict(r) for r in rows]


async def reply(conn: Conn, ticket_id: int, author_id: int, body: str, *, staff: bool,
                state: str | None = None) -> Ticket:
    """Add a message; the state follows who spoke (or `state`, for an operator)."""
    _check(None, body)
    if state is not None and state not in STATES:
        raise StoreError(f"state: expected one of {', '.join(STATES)}")
    new_state = state or ("waiting" if staff else "open")
    async with store._transaction(conn) as tx:
        row = await tx.fetchrow(
            f"UPDATE tickets SET state = $2, updated_at = now() WHERE id = $1 RETURNING {_COLS}",
            ticket_id, new_state)
        if row is None:
            raise NotFound(f"ticket {ticket_id} not found")
        await tx.execute("INSERT INTO ticket_messages (ticket_id, author_id, staff, body)"
                         " VALUES ($1, $2, $3, $4)", ticket_id, author_id, staff, body.strip())
    return Ticket(**dict(row))


async def set_state(conn: Conn, ticket_id: int, state: str) -> Ticket:
    if state not in STATES:
        raise StoreError(f"state: expected one of {', '.join(STATES)}")
    row = await conn.fetchrow(
        f"UPDATE tickets SET state = $2, updated_at = now() WHERE id = $1 RETURNING {_COLS}",
        ticket_id, state)
    if row is None:
        raise NotFound(f"ticket {ticket_id} not found")
    return Ticket(**dict(row))


async def listing(conn: Conn, *, user_id: int | None = None, state: str | None = None,
                  limit: int = 50, before_id: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
    where: list[str] = []
    args: list[Any] = []
    if user_id is not None:
        args.append(user_id)
        where.append(f"t.user_id = ${len(args)}")
    if state:
        args.append(state)
        where.append(f"t.state = ${len(args)}")
    if before_id is not None:
        args.append(before_id)
        where.append(f"t.id < ${len(args)}")
    args.append(limit + 1)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await conn.fetch(
        "SELECT t.id, t.user_id, t.subject, t.request_id, t.state, t.created_at, t.updated_at,"
        " coalesce(u.email, u.name) AS user_name,"
        " (SELECT count(*) FROM ticket_messages m WHERE m.ticket_id = t.id) AS messages"
        f" FROM tickets t JOIN users u ON u.id = t.user_id{clause} ORDER BY t.id DESC"
        f" LIMIT ${len(args)}", *args)
    out = [dict(r) for r in rows[:limit]]
    return out, (out[-1]["id"] if len(rows) > limit else None)


async def last_staff_author(conn: Conn, ticket_id: int) -> str | None:
    """The email of the operator who last answered (to tell them of the key holder's reply)."""
    email = await conn.fetchval(
        "SELECT u.email FROM ticket_messages m JOIN users u ON u.id = m.author_id"
        " WHERE m.ticket_id = $1 AND m.staff ORDER BY m.id DESC LIMIT 1", ticket_id)
    return None if email is None else str(email)

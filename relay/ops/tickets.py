"""Support tickets, the operators' side: list (by state), read a thread, reply (the key
holder is emailed when SMTP is configured), and change the state. The key holder's side
is relay.console.tickets over accounting.tickets. Replies are audited without their text.
"""

from __future__ import annotations

from typing import Any

from accounting import store, tickets
from relay import errors as E
from relay.ops.base import Op
from relay.ops.parse import id_, only, q_int, text


async def tickets_list(op: Op) -> dict[str, Any]:
    q = op.query
    state = q.get("state") or None
    if state is not None and state not in tickets.STATES:
        raise E.InvalidRequest(f"state: expected one of {', '.join(tickets.STATES)}")
    async with op.read() as conn:
        uid = await op._user_id(conn, q)
        rows, nxt = await tickets.listing(conn, user_id=uid, state=state,
                                          limit=q_int(q, "limit", 50, lo=1, hi=500) or 50,
                                          before_id=q_int(q, "cursor"))
    return {"data": rows, "next": None if nxt is None else str(nxt)}


async def tickets_show(op: Op) -> dict[str, Any]:
    tid = id_(op.params["ticket"], "ticket")
    async with op.read() as conn:
        t = await tickets.get(conn, tid)
        msgs = await tickets.messages(conn, tid)
        user = await op._user(conn, t.user_id)
        email = await conn.fetchval("SELECT email FROM users WHERE id = $1", t.user_id)
    return {"ticket": t, "messages": msgs, "user": {"id": user.id, "name": user.name, "email": email}}


async def tickets_reply(op: Op, author_id: int) -> dict[str, Any]:
    """An operator's answer (`body`), optionally with a new `state` (default: waiting)."""
    body = op.body()
    only(body, {"body", "state"})
    tid = id_(op.params["ticket"], "ticket")
    async with op.tx() as conn:
        t = await tickets.reply(conn, tid, author_id, text(body, "body", required=True) or "",
                                staff=True, state=text(body, "state") or None)
        await store.audit(conn, op.actor, "ticket.reply", str(tid), {"state": t.state})
        email = await conn.fetchval("SELECT email FROM users WHERE id = $1", t.user_id)
    return {"ticket": t, "notify": email}


async def tickets_state(op: Op) -> dict[str, Any]:
    body = op.body()
    only(body, {"state"})
    tid = id_(op.params["ticket"], "ticket")
    async with op.tx() as conn:
        before = await tickets.get(conn, tid)
        t = await tickets.set_state(conn, tid, text(body, "state", required=True) or "")
        await store.audit(conn, op.actor, "ticket.state", str(tid), {"state": t.state},
                          before={"state": before.state})
    return {"ticket": t}

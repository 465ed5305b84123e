"""The audit log: every operator action, filterable, newest first.
"""

from __future__ import annotations

from typing import Any

from accounting import reports
from relay.ops.base import Op
from relay.ops.parse import (
    parse_time,
    q_int,
)


async def audit_list(op: Op) -> Any:
    q = op.query
    start = parse_time(q["start"], "start") if q.get("start") else None
    end = parse_time(q["end"], "end") if q.get("end") else None
    async with op.read() as conn:
        rows, nxt = await reports.audit_entries(
            conn, start=start, end=end, actor=q.get("actor") or None,
            action=q.get("action") or None, target=q.get("target") or None,
            limit=q_int(q, "limit", 100, lo=1, hi=1000) or 100, before_id=q_int(q, "cursor"))
    return {"data": rows, "next": None if nxt is None else str(nxt)}

"""Low-balance alerts: who is due one, claimed so that each crossing is told once.

A user sets a threshold on the console's Account page (`users.low_balance_nano`, 0:
never). When the balance falls below it, one alert is due; `low_balance_sent_at`
records that it was claimed, and it is cleared again when the balance is back at or
above the threshold (a top-up, a transfer in) or the threshold changes
(accounts.set_prefs), so the next fall is told again. The claim is one UPDATE ...
RETURNING: several workers and hosts may look at once, each crossing is claimed by one.
This module only decides; relay.console.alerts writes and sends the email.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LowBalance:
    user_id: int
    email: str
    lang: str
    balance_nano: int
    threshold_nano: int


async def claim_low_balance(conn: Any, limit: int = 500) -> list[LowBalance]:
    """Re-arm the users back above their threshold, then claim up to `limit` alerts due
    (verified, active accounts with an email)."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE users SET low_balance_sent_at = NULL WHERE low_balance_nano > 0"
            " AND low_balance_sent_at IS NOT NULL AND balance_nano >= low_balance_nano")
        rows = await conn.fetch(
            "UPDATE users SET low_balance_sent_at = now() WHERE id IN ("
            " SELECT id FROM users WHERE low_balance_nano > 0 AND low_balance_sent_at IS NULL"
            " AND balance_nano < low_balance_nano AND email IS NOT NULL AND email_verified"
            " AND status = 'active' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING id, email, lang, balance_nano, low_balance_nano", limit)
    return [LowBalance(r["id"], r["email"], r["lang"], r["balance_nano"], r["low_balance_nano"])
            for r in rows]

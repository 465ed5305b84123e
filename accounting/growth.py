"""Growth credits: the sign-up credit, invite codes, and the inviter's share of a first top-up.

Every credit goes through accounting.topups with an external id derived from the
invitee (`signup:<id>`, `invite:<id>`, `invite-reward:<id>`), so none can be paid
twice even by a retried call; the reward is also claimed by one conditional UPDATE of
the invitee's `invites` row, in the caller's transaction, so of two concurrent first
top-ups only one pays the inviter. Amounts are exact: a share is a fraction and the
reward is rounded down to the nano-USD. This module never imports relay.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from accounting import store, topups
from accounting.money import parse_multiplier, parse_usd
from accounting.store import NotFound, StoreError

Conn = Any

_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: people type these


class GrowthSettings(Protocol):
    """The fields of relay.config.GrowthConfig read here (USD and fraction strings)."""

    @property
    def signup_credit(self) -> str: ...
    @property
    def invite_credit(self) -> str: ...
    @property
    def invite_share(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Terms:
    signup_nano: int
    invite_nano: int
    share: Fraction

    @classmethod
    def of(cls, s: GrowthSettings) -> Terms:
        raw = (s.invite_share or "0").strip()
        share = Fraction(0) if raw in ("0", "0.0") else parse_multiplier(raw, what="growth.invite_share")
        if not 0 <= share <= 1:
            raise ValueError(f"growth.invite_share: expected 0..1, got {s.invite_share!r}")
        return cls(parse_usd(s.signup_credit or "0", what="growth.signup_credit"),
                   parse_usd(s.invite_credit or "0", what="growth.invite_credit"), share)


async def create_invite_code(conn: Conn, inviter: int | str, max_uses: int = 0) -> str:
    """A new invite code of `inviter` (0 uses: unlimited)."""
    if isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 0:
        raise StoreError(f"max_uses: expected an integer >= 0, got {max_uses!r}")
    uid = await store._user_id(conn, inviter)
    code = "INV-" + "".join(secrets.choice(_ALPHABET) for _ in range(10))
    await conn.execute("INSERT INTO invite_codes (code, inviter_id, max_uses) VALUES ($1, $2, $3)",
                       code, uid, max_uses)
    return code


async def list_invite_codes(conn: Conn, inviter: int | str | None = None) -> list[dict[str, Any]]:
    if inviter is None:
        rows = await conn.fetch("SELECT * FROM invite_codes ORDER BY created_at, code")
    else:
        uid = await store._user_id(conn, inviter)
        rows = await conn.fetch("SELECT * FROM invite_codes WHERE inviter_id = $1 ORDER BY created_at, code", uid)
    return [dict(r) for r in rows]


async def signup(conn: Conn, name: str, terms: Terms, invite_code: str | None = None) -> dict[str, Any]:
    """Create a user with the sign-up credit and, with a valid invite code, the invite
    credit; returns {user_id, signup_nano, invite_nano, inviter_id}. An unknown or used-up
    code refuses the whole sign-up (NotFound / StoreError), so nothing is half-done."""
    async with store._transaction(conn) as tx:
        uid = await store.create_user(tx, name)
        return await grant(tx, uid, terms, invite_code)


async def grant(conn: Conn, uid: int, terms: Terms, invite_code: str | None = None) -> dict[str, Any]:
    """The sign-up credit and, with a valid invite code, the invite credit for user `uid`
    (the console grants them once the email is verified). Idempotent per user through
    the credits' external ids; an unknown or used-up code raises and grants nothing."""
    async with store._transaction(conn) as tx:
        if terms.signup_nano:
            await topups.credit(tx, uid, terms.signup_nano, f"signup:{uid}", "sign-up credit")
        inviter = None
        if invite_code:
            code = invite_code.strip().upper()
            inviter = await tx.fetchval(
                "UPDATE invite_codes SET uses = uses + 1"
                " WHERE code = $1 AND (max_uses = 0 OR uses < max_uses) RETURNING inviter_id", code)
            if inviter is None:
                if await tx.fetchval("SELECT 1 FROM invite_codes WHERE code = $1", code) is None:
                    raise NotFound(f"invite code {code!r} not found")
                raise StoreError(f"invite code {code!r} has no uses left")
            await tx.execute("INSERT INTO invites (invitee_id, inviter_id, code) VALUES ($1, $2, $3)",
                             uid, inviter, code)
            if terms.invite_nano:
                await topups.credit(tx, uid, terms.invite_nano, f"invite:{uid}", f"invite credit ({code})")
    return {"user_id": uid, "signup_nano": terms.signup_nano,
            "invite_nano": terms.invite_nano if inviter is not None else 0, "inviter_id": inviter}


async def reward_inviter(conn: Conn, invitee_id: int, topup_id: int, amount_nano: int,
                         share: Fraction) -> tuple[int, int] | None:
    """After a (non-duplicate) top-up of `invitee_id`: if it is their first since the
    invite, pay the inviter `floor(amount * share)`; return (inviter id, reward) or None.
    Call it in the top-up's transaction."""
    async with store._transaction(conn) as tx:
        reward = int(amount_nano * share)  # Fraction -> int truncates; both are >= 0
        inviter = await tx.fetchval(
            "UPDATE invites SET reward_topup_id = $2, reward_nano = $3"
            " WHERE invitee_id = $1 AND reward_topup_id IS NULL RETURNING inviter_id",
            invitee_id, topup_id, reward)
        if inviter is None:
            return None
        if reward > 0:
            await topups.credit(tx, int(inviter), reward, f"invite-reward:{invitee_id}",
                                f"invite reward: first top-up of user {invitee_id}")
    return int(inviter), reward


async def invites_of(conn: Conn, inviter: int | str) -> list[dict[str, Any]]:
    uid = await store._user_id(conn, inviter)
    rows = await conn.fetch("SELECT invitee_id, code, created_at, reward_topup_id, reward_nano"
                            " FROM invites WHERE inviter_id = $1 ORDER BY created_at", uid)
    return [dict(r) for r in rows]

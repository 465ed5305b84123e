"""Key state as admission sees it: one immutable snapshot per key, rebuilt on change.

Relay's auth cache maps a secret's SHA-256 to a `KeyState`; limits decides with it.
Nothing here touches storage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyState:
    id: int
    user_id: int
    name: str
    enabled: bool
    user_enabled: bool
    expires_at: float  # unix seconds; 0: never
    models: frozenset[str] | None  # None: every model the key's group reaches
    group: str
    cap_nano: int  # spending cap; 0: unlimited
    concurrency: int  # 0: the configured default
    rpm: int  # 0: the configured default (0 there too: unlimited)
    tpm: int
    allowed_cidrs: tuple[str, ...] = ()
    plan_id: int = 0  # subscription this key draws on, 0: none
    plan_expires_at: float = 0.0  # unix seconds the subscription ended or ends (0: no plan)
    plan_fallback: bool = False  # plan credit exhausted: draw on the user's balance

"""The typed seams between the gateway and the packages it drives.

relay.app talks to limits (admission: a lease or a denial) and to accounting (the
ledger) only through these shapes, described structurally so either side can be
replaced in a test or a benchmark without importing the other. No code here runs.
"""

from __future__ import annotations

from typing import Any, Protocol

Headers = tuple[tuple[bytes, bytes], ...]


class Lease(Protocol):
    """An admitted request's claim (limits.admission.Lease). Released exactly once."""

    plan_id: int
    reserve: int  # nano-USD reserved; negative when not held against the key's cap

    @property
    def headers(self) -> Headers: ...

    def extend(self, extra_nano: int) -> bool: ...  # synchronous; False: refused, unchanged

    def release(self, cost_nano: int, tokens: int) -> None: ...


class Denial(Protocol):
    """A refusal (limits.admission.Denial), rendered by relay in the route's protocol."""

    status: int
    code: str
    message: str
    retry_after: float
    headers: Headers


class Limiter(Protocol):
    """Admission (limits.admission.Limiter)."""

    def admit(self, key: Any, model: str, est_tokens: int, reserve_nano: int, client_ip: str,
              model_allowed: bool, now: float, near: int = 0) -> Any: ...
    # Lease | Denial | None | limits.admission.NEAR

    async def refill(self, key: Any) -> None: ...

    def headroom(self, key: Any) -> int | None: ...


class Ledger(Protocol):
    """Where settled rows and stream checkpoints go (accounting.ledger.Ledger)."""

    def record(self, rec: Any) -> None: ...

    def checkpoint(self, row: Any) -> None: ...

    def forget_checkpoint(self, request_id: str) -> None: ...

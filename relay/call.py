"""One model request's record, as it moves through the gateway's steps.

relay.app fills it in order (authenticated key, parsed request, price, lease, the
exchange with the channel that answered, the error if any) and the settlement step
(relay.settle) reads it whole: one typed object instead of a long argument list.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.app import Route
    from relay.errors import GatewayError
    from relay.httpserver import Request
    from relay.proxy import Exchange
    from relay.request import ModelRequest
    from relay.routing import Channel
    from relay.seams import Lease

ONE = Fraction(1)  # immutable; building one per request cost 0.3 us twice


class ModelCall:
    __slots__ = ("attempts", "channel", "error", "ex", "key", "lease", "model", "mr",
                 "multiplier", "price", "req", "rid_out", "route", "stream", "t0", "tried",
                 "ts", "upstream_model")

    def __init__(self, req: Request, route: Route, t0: float, ts: float, rid_out: bytes) -> None:
        self.req = req
        self.route = route
        self.t0 = t0  # loop time at arrival
        self.ts = ts  # wall time at arrival: the row's admission time
        self.rid_out = rid_out
        self.key: Any = None  # limits.keys.KeyState, once authenticated
        self.mr: ModelRequest | None = None
        self.model = ""
        self.stream = False
        self.price: Any = None  # accounting.pricing.PriceRow at admission
        self.multiplier = ONE
        self.lease: Lease | None = None
        self.ex: Exchange | None = None
        self.channel: Channel | None = None
        self.upstream_model = ""
        self.attempts = 0
        self.tried: list[str] = []
        self.error: GatewayError | None = None

    @property
    def body(self) -> dict[str, Any] | None:
        return self.mr.body if self.mr is not None else None

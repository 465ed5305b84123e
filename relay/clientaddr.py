"""The client's address: the TCP peer, or what a trusted proxy says the peer was.

Behind a reverse proxy every connection comes from the proxy, so per-address decisions
(failed-auth throttling, IP allowlists, the per-account device cap, the logged address)
would treat all clients as one. `X-Forwarded-For` fixes that only when the peer is a
proxy the operator listed (`[server] trusted_proxies`): anyone else can write the header.
The list is walked from the right, skipping trusted hops, so a client cannot choose its
address by sending its own header through the proxy (nginx's
`$proxy_add_x_forwarded_for` appends the real peer to whatever the client sent).
No I/O; the per-request cost is one header scan, and only for trusted peers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    __slots__ = ("_cache", "nets")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.nets: tuple[_Net, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._cache: dict[str, bool] = {}

    def trusts(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(ip.split("%", 1)[0])
            except ValueError:
                hit = False
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                hit = any(addr in n for n in self.nets)
            if len(self._cache) < 10_000:  # bounded: peers are many behind no proxy
                self._cache[ip] = hit
        return hit

    def client(self, peer: str, headers: list[tuple[bytes, bytes]]) -> str:
        """The client address for a request that arrived from `peer` (already trusted)."""
        hops: list[str] = []
        for k, v in headers:
            if k == b"x-forwarded-for":
                hops.extend(h.strip() for h in v.decode("latin-1").split(","))
        client = peer
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # garbage: stop at the last hop we could trust
            client = hop
            if not self.trusts(hop):
                break
        return client


def check(cidrs: Iterable[str]) -> str | None:
    """None, or the first entry that is not an address or CIDR block."""
    for c in cidrs:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            return c
    return None

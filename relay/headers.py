"""Which client request headers may reach an upstream, per channel.

An allowlist, not a denylist: a client header travels beside the operator's credential,
so one that selects an account (`OpenAI-Organization`, `OpenAI-Project`) or a feature the
provider prices differently (`anthropic-beta: context-1m-…`) would let a key holder spend
the operator's account in ways the price table never saw. What passes: the body's type,
what the SDKs send about themselves, the protocol version, `anthropic-beta` flags the
channel lists (default: the flags Claude Code sends), and any header the channel names
in `forward_headers` (glob patterns). Pure: no I/O.
"""

from __future__ import annotations

import fnmatch

# The flags Claude Code sends with an API key; none changes what a request costs.
DEFAULT_ANTHROPIC_BETAS = (
    "claude-code-20250219",
    "interleaved-thinking-2025-05-14",
    "fine-grained-tool-streaming-2025-05-14",
    "context-management-2025-06-27",
    "token-efficient-tools-2025-02-19",
    "prompt-caching-2024-07-31",
    "token-counting-2024-11-01",
)

_COMMON = frozenset((b"content-type", b"accept", b"user-agent", b"idempotency-key"))
_SDK_PREFIX = b"x-stainless-"
# What the protocol's own clients send about a session (Codex CLI's headers let a
# provider route a conversation to its prompt cache; Claude Code names its app).
_OPENAI = frozenset((b"openai-beta", b"originator", b"session_id", b"conversation_id", b"version"))
_ANTHROPIC = frozenset((b"anthropic-version", b"anthropic-dangerous-direct-browser-access",
                        b"x-app"))


_DROP, _PASS, _BETA = 0, 1, 2


class HeaderPolicy:
    """Per channel: a verdict per header name, decided once (names are few and repeat),
    so filtering a request's headers is a dict lookup each."""

    __slots__ = ("_betas", "_native", "_patterns", "_protocol", "_translated")

    def __init__(self, protocol: str, betas: tuple[str, ...], forward: tuple[str, ...]) -> None:
        self._protocol = _ANTHROPIC if protocol == "anthropic" else _OPENAI
        self._betas = frozenset(b.strip() for b in betas)
        self._patterns = tuple(p.lower() for p in forward)
        self._native: dict[bytes, int] = {}
        self._translated: dict[bytes, int] = {}

    def _verdict(self, name: bytes, translated: bool) -> int:
        if name == b"anthropic-beta":
            v = _BETA if self._protocol is _ANTHROPIC and not translated else _DROP
        elif translated and (name == b"content-type" or name in _ANTHROPIC or name in _OPENAI):
            v = _DROP  # the client's protocol headers stay behind; the body's type is ours
        elif name in _COMMON or name in self._protocol or name.startswith(_SDK_PREFIX):
            v = _PASS
        elif self._patterns and any(fnmatch.fnmatchcase(name.decode("latin-1"), p)
                                    for p in self._patterns):
            v = _PASS
        else:
            v = _DROP
        cache = self._translated if translated else self._native
        if len(cache) < 1024:  # names come from clients: bounded
            cache[name] = v
        return v

    def allows(self, name: bytes) -> bool:
        return self._verdict(name, False) == _PASS

    def filter(self, headers: list[tuple[bytes, bytes]], translated: bool) -> list[tuple[bytes, bytes]]:
        """The client's headers this channel's upstream may see."""
        cache = self._translated if translated else self._native
        out = []
        for h in headers:
            v = cache.get(h[0])
            if v is None:
                v = self._verdict(h[0], translated)
            if v == _PASS:
                out.append(h)
            elif v == _BETA:
                kept = self.betas(h[1])
                if kept:
                    out.append((h[0], kept))
        return out

    def betas(self, value: bytes) -> bytes:
        flags = [f.strip() for f in value.decode("latin-1").split(",")]
        return ",".join(f for f in flags if f in self._betas).encode("latin-1")

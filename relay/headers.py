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


class HeaderPolicy:
    __slots__ = ("_betas", "_extra", "_patterns", "_protocol")

    def __init__(self, protocol: str, betas: tuple[str, ...], forward: tuple[str, ...]) -> None:
        self._protocol = _ANTHROPIC if protocol == "anthropic" else _OPENAI
        self._betas = frozenset(b.strip() for b in betas)
        self._patterns = tuple(p.lower() for p in forward)
        self._extra: dict[bytes, bool] = {}

    def allows(self, name: bytes) -> bool:
        if name in _COMMON or name in self._protocol or name.startswith(_SDK_PREFIX):
            return True
        if not self._patterns:
            return False
        hit = self._extra.get(name)
        if hit is None:
            text = name.decode("latin-1")
            hit = any(fnmatch.fnmatchcase(text, p) for p in self._patterns)
            if len(self._extra) < 1024:  # names come from clients: bounded
                self._extra[name] = hit
        return hit

    def filter(self, headers: list[tuple[bytes, bytes]], translated: bool) -> list[tuple[bytes, bytes]]:
        """The client's headers this channel's upstream may see. On the translated path
        the client's protocol headers stay behind (the body's type is ours to set)."""
        out = []
        for k, v in headers:
            if k == b"anthropic-beta":
                if self._protocol is _ANTHROPIC and not translated:
                    kept = self.betas(v)
                    if kept:
                        out.append((k, kept))
                continue
            if translated and (k == b"content-type" or k in _ANTHROPIC or k in _OPENAI):
                continue
            if self.allows(k):
                out.append((k, v))
        return out

    def betas(self, value: bytes) -> bytes:
        flags = [f.strip() for f in value.decode("latin-1").split(",")]
        return ",".join(f for f in flags if f in self._betas).encode("latin-1")

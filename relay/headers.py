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


class _Verdicts(dict[bytes, bool]):
    """Header name -> passes as it is, for one channel's native or translated requests;
    an unseen name is decided here and remembered (up to a bound: names come from
    clients). It holds what it decides from, not the policy: a back-reference would make
    every policy a reference cycle (garbage only the cyclic collector frees)."""

    __slots__ = ("_patterns", "_protocol", "_translated")

    def __init__(self, protocol: frozenset[bytes], patterns: tuple[str, ...],
                 translated: bool) -> None:
        super().__init__()
        self._protocol = protocol
        self._patterns = patterns
        self._translated = translated

    def __missing__(self, name: bytes) -> bool:
        v = self._decide(name)
        if len(self) < 1024:
            self[name] = v
        return v

    def _decide(self, name: bytes) -> bool:
        """`anthropic-beta` never passes as it is: its flags are filtered
        (HeaderPolicy.betas), on a native Anthropic channel only."""
        if name == b"anthropic-beta":
            return False
        if self._translated and (name == b"content-type" or name in _ANTHROPIC or name in _OPENAI):
            return False  # the client's protocol headers stay behind; the body's type is ours
        if name in _COMMON or name in self._protocol or name.startswith(_SDK_PREFIX):
            return True
        return bool(self._patterns) and any(fnmatch.fnmatchcase(name.decode("latin-1"), p)
                                            for p in self._patterns)


class HeaderPolicy:
    """Per channel: a verdict per header name, decided once (names are few and repeat),
    so filtering a request's headers is one dict lookup each, in a list comprehension."""

    __slots__ = ("_betas", "anthropic", "native", "translated")

    def __init__(self, protocol: str, betas: tuple[str, ...], forward: tuple[str, ...]) -> None:
        self.anthropic = protocol == "anthropic"  # betas are filtered on native requests
        names = _ANTHROPIC if self.anthropic else _OPENAI
        patterns = tuple(p.lower() for p in forward)
        self._betas = frozenset(b.strip() for b in betas)
        self.native = _Verdicts(names, patterns, False)
        self.translated = _Verdicts(names, patterns, True)

    def allows(self, name: bytes) -> bool:
        return self.native[name]

    def filter(self, headers: list[tuple[bytes, bytes]], translated: bool) -> list[tuple[bytes, bytes]]:
        """The client's headers this channel's upstream may see."""
        verdicts = self.translated if translated else self.native
        out = [h for h in headers if verdicts[h[0]]]
        if self.anthropic and not translated:
            self.add_betas(headers, out)
        return out

    def add_betas(self, headers: list[tuple[bytes, bytes]], out: list[tuple[bytes, bytes]]) -> None:
        """Append the `anthropic-beta` flags this channel passes (a native request)."""
        for name, value in headers:
            if name == b"anthropic-beta":
                kept = self.betas(value)
                if kept:
                    out.append((name, kept))

    def betas(self, value: bytes) -> bytes:
        flags = [f.strip() for f in value.decode("latin-1").split(",")]
        return ",".join(f for f in flags if f in self._betas).encode("latin-1")

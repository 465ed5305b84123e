"""The translated path: a client on one protocol served by a channel on the other.

A `Plan` names, for one (client route, channel protocol) pair, the request mapper, the
response mapper, the stream mapper and the error mapper from `relay.translate` (pure,
sans-IO code). `TranslatingExchange` is the exchange for that path: it frames the
upstream's events, feeds them to the stream mapper and writes what it returns. The
native path (same protocol) never comes here and stays byte-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from accounting import usage as usage_mod
from accounting.records import Usage
from relay import errors as E
from relay.errors import ANTHROPIC, OPENAI, GatewayError
from relay.proxy import NOT_COPIED, UPSTREAM_IDS, Exchange
from relay.requestids import first_id
from relay.sse import SSEFramer, fields
from relay.translate import chat_anthropic as ca
from relay.translate import errors as te
from relay.translate import responses as rs
from relay.translate import stream_chat_anthropic as sca
from relay.translate import stream_responses as sr
from relay.translate.common import TranslationError, custom_tool_names
from relay.upstream_errors import client_headers_all, status_error

JSON = dict[str, Any]

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
JSON_HEADERS = [(b"content-type", b"application/json")]


class _Feed:
    """Adapts the mappers' feed signatures to (event name, data payload)."""

    __slots__ = ("_fin", "_fn", "m")

    def __init__(self, mapper: Any, with_event: bool) -> None:
        self.m = mapper
        self._fn = mapper.feed
        self._fin = mapper.finish
        if not with_event:
            self._fn = lambda _e, d, f=mapper.feed: f(d)

    def feed(self, event: bytes, data: bytes) -> bytes:
        return self._fn(event.decode("latin-1"), data)

    def finish(self) -> bytes:
        return self._fin()


@dataclass(frozen=True, slots=True)
class Plan:
    upstream_path: bytes
    upstream_protocol: str
    request: Callable[[JSON, str], JSON]
    response: Callable[[JSON, str, JSON], JSON]  # (upstream body, client's model, client's request)
    stream: Callable[[str, JSON], _Feed]
    error: Callable[[int, bytes], bytes]
    upstream_usage: Callable[[JSON], Usage | None]


def _chat_from_anthropic_stream(model: str, body: JSON) -> _Feed:
    so = body.get("stream_options")
    include = type(so) is dict and so.get("include_usage") is True
    return _Feed(sca.AnthropicToOpenAIChatStream(model, include, custom_tools=custom_tool_names(body)), True)


def _anthropic_chat_request(body: JSON, upstream_model: str) -> JSON:
    return ca.anthropic_to_openai_chat_request(body, upstream_model)


PLANS: dict[tuple[str, str], Plan] = {
    # OpenAI chat client -> Anthropic channel
    ("chat", "anthropic"): Plan(
        b"/v1/messages", "anthropic", ca.openai_chat_to_anthropic_request,
        lambda r, m, b: ca.anthropic_response_to_openai_chat(r, m, custom_tools=custom_tool_names(b)),
        _chat_from_anthropic_stream,
        te.anthropic_error_to_openai, usage_mod.from_anthropic_body),
    # Anthropic messages client -> OpenAI channel
    ("messages", "openai"): Plan(
        b"/chat/completions", "openai", _anthropic_chat_request,
        lambda r, m, _b: ca.openai_chat_response_to_anthropic(r, m),
        lambda model, _b: _Feed(sca.OpenAIChatToAnthropicStream(model), False),
        te.openai_error_to_anthropic, usage_mod.from_openai_body),
    # Responses client -> Anthropic channel
    ("responses", "anthropic"): Plan(
        b"/v1/messages", "anthropic", rs.responses_to_anthropic_request,
        lambda r, m, b: rs.anthropic_response_to_responses(r, m, custom_tools=custom_tool_names(b)),
        lambda model, b: _Feed(sr.AnthropicToResponsesStream(model, custom_tools=custom_tool_names(b)), True),
        te.anthropic_error_to_openai, usage_mod.from_anthropic_body),
    # Responses client -> OpenAI channel that only speaks chat completions
    ("responses", "openai-chat"): Plan(
        b"/chat/completions", "openai", rs.responses_to_openai_chat_request,
        lambda r, m, _b: rs.openai_chat_response_to_responses(r, m),
        lambda model, _b: _Feed(sr.OpenAIChatToResponsesStream(model), False),
        lambda _s, body: body, usage_mod.from_openai_body),
}


def plan_for(route: str, channel_protocol: str, chat_only: bool) -> Plan | None:
    if route == "responses" and channel_protocol == "openai" and chat_only:
        return PLANS[("responses", "openai-chat")]
    return PLANS.get((route, channel_protocol))


def build_body(plan: Plan, body: JSON, upstream_model: str, stream: bool) -> bytes:
    return orjson.dumps(translate_body(plan, body, upstream_model, stream))


def translate_body(plan: Plan, body: JSON, upstream_model: str, stream: bool) -> JSON:
    """The upstream's request body, as a dict (relay.app bounds it before sending)."""
    try:
        out = plan.request(body, upstream_model)
    except TranslationError as exc:
        raise E.InvalidRequest(str(exc))
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        # The mappers assume the client's protocol shape; a body that breaks that
        # assumption is malformed for that protocol, not a gateway failure.
        raise E.InvalidRequest(f"Malformed request for this protocol: {exc}")
    if stream:
        out["stream"] = True
        if plan.upstream_protocol == "openai":
            out["stream_options"] = {"include_usage": True}
    return out


class TranslatingExchange(Exchange):
    __slots__ = ("client_model", "plan", "plan_protocol", "req_body", "stream_mapper")

    def __init__(self, gw: Any, client: Any, route: Any, stream: bool,
                 headers_out: list[tuple[bytes, bytes]], plan: Plan, model: str,
                 req_body: JSON) -> None:
        super().__init__(gw, client, route, 1 if stream else 0, headers_out)
        self.plan = plan
        self.plan_protocol = ANTHROPIC if plan.upstream_protocol == "anthropic" else OPENAI
        self.client_model = model
        self.req_body = req_body
        self.stream_mapper: _Feed | None = plan.stream(model, req_body) if stream else None

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        if not self._head(status):
            self._held(headers)
            return
        out = self.headers_out
        kept = []
        for k, v in headers:
            if k not in NOT_COPIED and k != b"content-type":
                kept.append((k, v))
            elif k in UPSTREAM_IDS:
                self.upstream_rid = v
        # The upstream's rate-limit headers in the client's names; the gateway's own
        # (already in headers_out, from the key's limits) win over a provider's.
        ours = {k for k, _ in out}
        out.extend(h for h in client_headers_all(kept, self.plan_protocol, self.protocol)
                   if h[0] not in ours)
        if status >= 400 or self.stream_mapper is None:
            self.mode = 0  # buffered: translated whole at on_done
            return
        out.extend(SSE_HEADERS)
        self._start_client(out, None)

    def on_body(self, data: bytes) -> None:
        if self._body_consumed(data):
            return
        # A reply is translated whole at on_done; a stream's chunks wait for the
        # checkpoint meter, which takes them each tick (so they never pile up).
        self.body_chunks.append(data)
        mapper = self.stream_mapper
        if not self.started or mapper is None:
            return
        out = []
        for block in self.framer.feed(data):  # type: ignore[union-attr]
            event, payload = fields(block)
            if not payload:
                continue
            try:
                piece = mapper.feed(event, payload)
            except (TranslationError, ValueError, KeyError, TypeError):
                continue  # an event the mapper cannot use; never fatal to the stream
            if piece:
                out.append(piece)
        if out:
            payload_out = b"".join(out)
            if not self.bytes_out:
                self.response_id = first_id([payload_out])  # relay.requestids
            self.bytes_out += len(payload_out)
            self.client.write(payload_out)

    def on_done(self) -> None:
        self.upstream = None
        if self.error_body is not None and self.error is None:
            self.error = status_error(self.upstream_status, b"".join(self.error_body),
                                      self.error_headers, self.plan_protocol, self.protocol)
        elif self.started and self.stream_mapper is not None:
            tail = self.stream_mapper.finish()
            if tail:
                self.bytes_out += len(tail)
                self.client.write(tail)
            self.client.end()
        elif not self.aborted and self.error is None:
            raw = b"".join(self.body_chunks)
            if self.status >= 400:
                body = self.plan.error(self.status, raw)
            else:
                try:
                    obj = orjson.loads(raw)
                    body = orjson.dumps(self.plan.response(obj, self.client_model, self.req_body))
                except (orjson.JSONDecodeError, TranslationError, ValueError, KeyError, TypeError) as exc:
                    self.error = E.UpstreamError(f"Upstream sent a response that cannot be translated: {exc}")
                    self._finish()
                    return
            self.bytes_out = len(body)
            self.response_id = first_id([body])
            self.client.send(self.status, self.headers_out + JSON_HEADERS, body)
            self.started = True
        self._finish()

    def on_fail(self, exc: GatewayError) -> None:
        self.upstream = None
        if self.error is None:
            self.error = exc
        if self.started and not self.aborted:
            self.client.write(E.render_stream_event(exc, self.protocol))
            self.client.end()
        self._finish()

    def usage(self) -> tuple[Usage | None, str]:
        """Usage in the upstream's terms: what the channel reported, else None."""
        mapper = self.stream_mapper
        if mapper is not None:
            m = mapper.m
            if getattr(m, "final_usage", False) and m.usage is not None:
                return m.usage, "upstream"
            return None, "estimated"
        if self.error is None and self.body_chunks:
            try:
                obj = orjson.loads(b"".join(self.body_chunks))
            except orjson.JSONDecodeError:
                return None, "estimated"
            if type(obj) is dict:
                u = self.plan.upstream_usage(obj)
                if u is not None:
                    return u, "upstream"
        return None, "estimated"

    def emitted_text(self) -> str:
        """What the client was sent, as text: for a stream from the mapper, for a reply
        (which came without usage) from the upstream's body."""
        mapper = self.stream_mapper
        if mapper is not None:
            return "".join(getattr(mapper.m, "text_parts", []))
        if self.error is None and self.body_chunks:
            try:
                obj = orjson.loads(b"".join(self.body_chunks))
            except orjson.JSONDecodeError:
                return ""
            if type(obj) is dict:
                up = self.plan.upstream_protocol
                return usage_mod.text_from_body(up, "messages" if up == "anthropic" else "chat", obj)
        return ""


def count_tokens_locally(body: JSON) -> bytes:
    """count_tokens for a model served only by OpenAI-protocol channels: our estimate."""
    from accounting import tokens

    return orjson.dumps({"input_tokens": tokens.estimate_input_tokens("anthropic", body)})


__all__ = ["PLANS", "Plan", "SSEFramer", "TranslatingExchange", "build_body", "count_tokens_locally",
           "plan_for", "translate_body"]

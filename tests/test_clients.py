"""Replays of what Claude Code and Codex CLI send, byte for byte, through a real gateway.

These coding agents use fields and headers the gateway does not model (betas, thinking,
cache_control, encrypted reasoning, prompt cache keys, stainless telemetry). The contract
is that the gateway authenticates, routes and bills them while passing everything else to
the upstream untouched. A recording TCP relay sits between the gateway and the mock
upstream, so the tests compare the exact request the upstream received (request line,
every header, the body bytes) with what the client sent, not only the mock's summary.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import httptools
import orjson
import pytest

from bench.mock_shapes import count_input_tokens
from tests.gateway import Harness

# --- a recording relay between the gateway and the mock ----------------------------------------


class Seen:
    """One request as the upstream received it."""

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    def header(self, name: str) -> list[str]:
        n = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == n]

    def names(self) -> set[str]:
        return {k.decode("latin-1").lower() for k, _ in self.headers}


class _Parse:
    def __init__(self, out: list[Seen]) -> None:
        self.out = out
        self.cur = Seen()
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.cur.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.cur.body += body

    def on_message_complete(self) -> None:
        self.cur.method = self.parser.get_method()
        self.out.append(self.cur)
        self.cur = Seen()


class Recorder:
    """A TCP relay to the mock that parses and keeps every request passing through it."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.target_port = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Recorder:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        parse = _Parse(self.seen)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, tap: _Parse | None) -> None:
            try:
                while data := await r.read(65536):
                    if tap is not None:
                        tap.parser.feed_data(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, httptools.HttpParserError):
                pass
            finally:
                w.close()

        t = asyncio.ensure_future(pipe(ur, cw, None))
        self._tasks.add(t)
        try:
            await pipe(cr, uw, parse)
        finally:
            await t
            self._tasks.discard(t)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()


@pytest.fixture
async def gw(pg_dsn: str) -> AsyncIterator[tuple[Harness, Recorder]]:
    rec = await Recorder().start()
    up = f"http://127.0.0.1:{rec.port}"
    h = await Harness().start(pg_dsn, channels=[
        {"name": "rec-openai", "protocol": "openai", "base_url": up + "/v1",
         "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["gpt-*"]},
        {"name": "rec-anthropic", "protocol": "anthropic", "base_url": up,
         "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["claude-*"]},
    ])
    rec.target_port = h.mock.port
    yield h, rec
    await h.stop()
    await rec.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No default headers of aiohttp's own beyond what HTTP needs: the replay sets them all.
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding",
                                                        "Content-Type")) as s:
        yield s


UPSTREAM_SECRET = "upstream-secret-credential"
# Hop-by-hop and credential headers the gateway owns; everything else must pass untouched.
GATEWAY_OWNED = {"host", "content-length", "authorization", "x-api-key", "connection",
                 "accept-encoding", "transfer-encoding"}


def sse(body: bytes) -> list[tuple[str, Any]]:
    """(event name, parsed data) of every event of an SSE body."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name, data = "", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data += line[5:].strip()
        out.append((name, orjson.loads(data) if data and data != b"[DONE]" else data.decode()))
    return out


async def usage_rows(h: Harness, key_id: int) -> list[asyncpg.Record]:
    await h.flush()
    conn = await asyncpg.connect(h.dsn)
    try:
        return await conn.fetch(
            "SELECT route, stream, status, model, input_tokens, output_tokens, cache_read_tokens,"
            " cache_write_tokens, reasoning_tokens, usage_source, cost_nano FROM usage_log"
            " WHERE key_id = $1 ORDER BY ts", key_id)
    finally:
        await conn.close()


def assert_untouched(seen: Seen, sent_headers: dict[str, str], sent_body: bytes, secret: str) -> None:
    """The upstream got the client's body bytes and every non-owned header value unchanged,
    but for the output bound the gateway writes first into a body that names none."""
    body = seen.body
    m = re.match(rb'\{"(max_tokens|max_completion_tokens|max_output_tokens)":(\d+),', body)
    if m is not None and m.group(1) not in sent_body:
        body = b"{" + body[m.end():]
    assert body == sent_body
    for name, value in sent_headers.items():
        if name.lower() in GATEWAY_OWNED:
            continue
        assert seen.header(name) == [value], name
    # Nothing else is added: only the hop headers and the channel's credential are the gateway's.
    added = seen.names() - {n.lower() for n in sent_headers}
    assert added <= {"host", "content-length", "accept-encoding", "authorization", "x-api-key"}, added
    assert seen.header("accept-encoding") == ["identity"]  # the usage tap reads plain bytes
    raw = b"\r\n".join(k + b": " + v for k, v in seen.headers) + seen.body
    assert secret.encode() not in raw
    assert secret[:12].encode() not in raw  # not even the key's display prefix


# --- Claude Code ---------------------------------------------------------------------------------

CLAUDE_CODE_BETAS = ("claude-code-20250219,interleaved-thinking-2025-05-14,"
                     "fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27")


def claude_code_headers(auth: str, secret: str) -> dict[str, str]:
    h = {
        "accept": "application/json",
        "anthropic-beta": CLAUDE_CODE_BETAS,
        "anthropic-dangerous-direct-browser-access": "true",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        "user-agent": "claude-cli/2.0.14 (external, cli)",
        "x-app": "cli",
        "x-stainless-arch": "x64",
        "x-stainless-helper-method": "stream",
        "x-stainless-lang": "js",
        "x-stainless-os": "Linux",
        "x-stainless-package-version": "0.60.0",
        "x-stainless-retry-count": "0",
        "x-stainless-runtime": "node",
        "x-stainless-runtime-version": "v22.19.0",
        "x-stainless-timeout": "600",
    }
    if auth == "x-api-key":
        h["x-api-key"] = secret
    else:  # ANTHROPIC_AUTH_TOKEN
        h["authorization"] = f"Bearer {secret}"
    return h


BASH_TOOL = {
    "name": "Bash",
    "description": "Executes a given bash command in a persistent shell session.",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string", "description": "The command to execute"},
                       "timeout": {"type": "number"},
                       "run_in_background": {"type": "boolean"}},
        "required": ["command"], "additionalProperties": False,
        "$schema": "http://json-schema.org/draft-07/schema#",
    },
}


def claude_code_body(turn: int) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nAs you answer, use the context.\n</system-reminder>"},
            {"type": "text", "text": "list the files here"}]},
    ]
    if turn > 1:
        messages += [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should run ls.", "signature": "EqQBCkYIBxgCKkD" + "x" * 40},
                {"type": "tool_use", "id": "toolu_01AbCdEf", "name": "Bash", "input": {"command": "ls"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01AbCdEf", "content": "README.md\nsrc\n",
                 "is_error": False, "cache_control": {"type": "ephemeral"}}]},
        ]
    else:
        messages[0]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return {
        "model": "claude-sonnet-4-6",
        "messages": messages,
        "temperature": 1,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "You are an interactive CLI tool that helps users with software "
             "engineering tasks.\n\nEnvironment: linux, cwd /work", "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [BASH_TOOL, {"name": "Read", "description": "Reads a file.", "input_schema": {
            "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}}],
        "metadata": {"user_id": "user_2f9c0d1e_account__session_" + str(uuid.UUID(int=7))},
        "max_tokens": 32000,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "stream": True,
    }


@pytest.mark.parametrize("auth", ["x-api-key", "authorization"])
async def test_claude_code_turn(gw: tuple[Harness, Recorder], http: aiohttp.ClientSession, auth: str) -> None:
    h, rec = gw
    _, key_id, secret = await h.user_and_key()
    headers = claude_code_headers(auth, secret)
    body = claude_code_body(turn=2)
    raw = orjson.dumps(body)
    async with http.post(h.url + "/v1/messages?beta=true", data=raw, headers=headers) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"].startswith("req_")
        got = await r.read()
    events = sse(got)
    assert next(n for n, _ in events) == "message_start"
    assert events[-1][0] == "message_stop"
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "hello " * 5

    assert len(rec.seen) == 1
    seen = rec.seen[0]
    assert (seen.method, seen.url) == (b"POST", b"/v1/messages?beta=true")
    assert_untouched(seen, headers, raw, secret)
    # The upstream is called with the channel's credential, in Anthropic style.
    assert seen.header("x-api-key") == [UPSTREAM_SECRET]
    assert seen.header("authorization") == []
    assert orjson.loads(seen.body) == body

    rows = await usage_rows(h, key_id)
    assert [(r["route"], r["stream"], r["status"], r["model"], r["usage_source"]) for r in rows] == [
        ("messages", True, 200, "claude-sonnet-4-6", "upstream")]
    # The mock's prompt size: compact JSON of messages + system, / 4.
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (count_input_tokens(body), 5)
    assert rows[0]["cost_nano"] > 0


async def test_claude_code_tool_use_and_prompt_cache(gw: tuple[Harness, Recorder],
                                                     http: aiohttp.ClientSession) -> None:
    # Claude Code's first turn with a warm prompt cache: the answer is a streamed tool call,
    # and the cache-read and cache-write token classes are billed apart.
    h, rec = gw
    _, key_id, secret = await h.user_and_key()
    headers = {**claude_code_headers("x-api-key", secret),
               "x-mock-tool-call": "1", "x-mock-cached-tokens": "100", "x-mock-cache-write-tokens": "20",
               "x-mock-input-tokens": "150", "x-mock-chunks": "4"}
    body = claude_code_body(turn=1)
    raw = orjson.dumps(body)
    async with http.post(h.url + "/v1/messages?beta=true", data=raw, headers=headers) as r:
        assert r.status == 200
        got = await r.read()
    events = sse(got)
    start = next(d for n, d in events if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "Bash"
    args = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert orjson.loads(args) == {"command": "hello", "timeout": 1, "run_in_background": True}
    assert next(d for n, d in events if n == "message_delta")["delta"]["stop_reason"] == "tool_use"
    assert_untouched(rec.seen[-1], headers, raw, secret)

    rows = await usage_rows(h, key_id)
    assert len(rows) == 1
    r0 = rows[0]
    assert (r0["input_tokens"], r0["cache_read_tokens"], r0["cache_write_tokens"], r0["output_tokens"],
            r0["usage_source"]) == (30, 100, 20, 4, "upstream")
    # claude-sonnet-4-6: input 3, output 15, cache read 0.30, cache write 3.75 USD per 1M.
    assert r0["cost_nano"] == (30 * 3_000 + 4 * 15_000 + 100 * 300 + 20 * 3_750)


async def test_claude_code_count_tokens_and_quota_probe(gw: tuple[Harness, Recorder],
                                                        http: aiohttp.ClientSession) -> None:
    # Claude Code counts tokens and sends a tiny non-streamed "quota" probe at start.
    h, rec = gw
    _, key_id, secret = await h.user_and_key()
    headers = claude_code_headers("x-api-key", secret)
    headers["anthropic-beta"] = "claude-code-20250219,token-counting-2024-11-01"
    count_body = {"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "foo"}],
                  "tools": [BASH_TOOL]}
    raw = orjson.dumps(count_body)
    async with http.post(h.url + "/v1/messages/count_tokens?beta=true", data=raw, headers=headers) as r:
        assert r.status == 200
        assert (await r.json())["input_tokens"] == count_input_tokens(count_body)
    assert rec.seen[-1].url == b"/v1/messages/count_tokens?beta=true"
    assert_untouched(rec.seen[-1], headers, raw, secret)

    probe = {"model": "claude-haiku-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": "quota"}],
             "metadata": {"user_id": "user_x_account__session_y"}}
    raw = orjson.dumps(probe)
    async with http.post(h.url + "/v1/messages?beta=true", data=raw, headers=headers) as r:
        assert r.status == 200
        msg = await r.json()
    assert msg["stop_reason"] == "max_tokens" and msg["usage"]["output_tokens"] == 1
    assert_untouched(rec.seen[-1], headers, raw, secret)
    rows = await usage_rows(h, key_id)
    # count_tokens is free and unlogged as a billable call; the probe is billed at the default price.
    billed = [r for r in rows if r["route"] == "messages"]
    assert [(r["model"], r["input_tokens"], r["output_tokens"], r["usage_source"]) for r in billed] == [
        ("claude-haiku-4-5", count_input_tokens(probe), 1, "upstream")]
    assert all(r["cost_nano"] == 0 for r in rows if r["route"] == "count_tokens")


# --- Codex CLI -------------------------------------------------------------------------------------


def codex_headers(secret: str, session: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {secret}",
        "content-type": "application/json",
        "accept": "text/event-stream",
        "openai-beta": "responses=experimental",
        "originator": "codex_cli_rs",
        "session_id": session,
        "conversation_id": session,
        "version": "0.46.0",
        "user-agent": "codex_cli_rs/0.46.0 (Ubuntu 24.4.0; x86_64) xterm-256color",
    }


SHELL_TOOL = {
    "type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
    "strict": False,
    "parameters": {"type": "object", "properties": {
        "command": {"type": "array", "items": {"type": "string"}},
        "workdir": {"type": "string"}, "timeout_ms": {"type": "number"}},
        "required": ["command"], "additionalProperties": False},
}


def codex_body(session: str) -> dict[str, Any]:
    return {
        "model": "gpt-5-codex",
        "instructions": "You are Codex, based on GPT-5. You are running as a coding agent in the Codex CLI.",
        "input": [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "<environment_context>\n  <cwd>/work</cwd>\n</environment_context>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "what is in here?"}]},
            {"type": "reasoning", "id": "rs_0a1b", "summary": [{"type": "summary_text", "text": "**Listing**"}],
             "content": None, "encrypted_content": "gAAAAABo" + "Z" * 64},
            {"type": "function_call", "id": "fc_0a1b", "name": "shell",
             "arguments": "{\"command\":[\"bash\",\"-lc\",\"ls\"],\"workdir\":\"/work\"}", "call_id": "call_0a1b"},
            {"type": "function_call_output", "call_id": "call_0a1b",
             "output": "{\"output\":\"README.md\\nsrc\\n\",\"metadata\":{\"exit_code\":0,\"duration_seconds\":0.1}}"},
        ],
        "tools": [SHELL_TOOL, {"type": "function", "name": "update_plan", "description": "Updates the plan.",
                               "strict": False, "parameters": {"type": "object", "properties": {
                                   "plan": {"type": "array", "items": {"type": "object"}}}, "required": ["plan"],
                                   "additionalProperties": False}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": session,
        "text": {"verbosity": "medium"},
    }


@pytest.mark.parametrize("base", ["/v1", ""])
async def test_codex_turn(gw: tuple[Harness, Recorder], http: aiohttp.ClientSession, base: str) -> None:
    h, rec = gw
    _, key_id, secret = await h.user_and_key()
    session = str(uuid.UUID(int=42))
    headers = codex_headers(secret, session)
    body = codex_body(session)
    raw = orjson.dumps(body)
    headers_mock = {**headers, "x-mock-reasoning-tokens": "64", "x-mock-cached-tokens": "10"}
    async with http.post(h.url + base + "/responses", data=raw, headers=headers_mock) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        got = await r.read()
    events = sse(got)
    names = [n for n, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    done = events[-1][1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == "hello " * 5
    assert done["store"] is False

    seen = rec.seen[-1]
    assert (seen.method, seen.url) == (b"POST", b"/v1/responses")
    assert_untouched(seen, headers_mock, raw, secret)
    assert seen.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
    # The one edit: Codex names no output bound, so the gateway sends the one it reserved.
    assert orjson.loads(seen.body) == {"max_output_tokens": 4096, **body}

    rows = await usage_rows(h, key_id)
    n_in = count_input_tokens(body)
    assert [(r["route"], r["stream"], r["status"], r["model"], r["input_tokens"], r["cache_read_tokens"],
             r["output_tokens"], r["reasoning_tokens"], r["usage_source"]) for r in rows] == [
        ("responses", True, 200, "gpt-5-codex", n_in - 10, 10, 5 + 64, 64, "upstream")]
    # Default price (input 1, output 2 USD per 1M; cache reads at the input price when unpriced).
    assert rows[0]["cost_nano"] > 0


async def test_codex_function_call_stream(gw: tuple[Harness, Recorder], http: aiohttp.ClientSession) -> None:
    h, rec = gw
    _, key_id, secret = await h.user_and_key()
    session = str(uuid.UUID(int=43))
    headers = {**codex_headers(secret, session), "x-mock-tool-call": "1", "x-mock-chunks": "3"}
    body = codex_body(session)
    body["input"] = body["input"][:2]  # the first turn
    raw = orjson.dumps(body)
    async with http.post(h.url + "/v1/responses", data=raw, headers=headers) as r:
        assert r.status == 200
        got = await r.read()
    events = sse(got)
    deltas = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
    assert len(deltas) == 3
    item = events[-1][1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["name"] == "shell"
    assert orjson.loads("".join(deltas)) == orjson.loads(item["arguments"])
    assert_untouched(rec.seen[-1], headers, raw, secret)
    rows = await usage_rows(h, key_id)
    assert [(r["output_tokens"], r["usage_source"]) for r in rows] == [(3, "upstream")]


async def test_codex_refused_key_gets_openai_error_not_a_stream(gw: tuple[Harness, Recorder],
                                                                http: aiohttp.ClientSession) -> None:
    # Codex retries 401s differently from stream errors: a refusal must be a plain JSON error.
    h, rec = gw
    session = str(uuid.UUID(int=44))
    headers = codex_headers("sk-" + "q" * 48, session)
    async with http.post(h.url + "/v1/responses", data=orjson.dumps(codex_body(session)), headers=headers) as r:
        assert r.status == 401
        assert r.headers["content-type"].startswith("application/json")
        assert (await r.json())["error"]["code"] == "invalid_api_key"
    assert rec.seen == []

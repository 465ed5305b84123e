"""The real Claude Code and Codex CLI binaries, run headless against a real gateway and the mock.

The binaries come from npm (see bench/clients/README.md; `.ci/run` installs Codex CLI):
TOLLWAY_CLIENTS_DIR names the directory holding the `claude` and `codex` executables (for
an `npm install --prefix DIR` that is DIR/node_modules/.bin), else they are looked up on
PATH. A test whose binary is absent skips. Each client runs in a fresh HOME / CODEX_HOME
with telemetry and auto-update off; nothing leaves 127.0.0.1.

What they prove: each client completes a turn through the gateway, the gateway bills
exactly the usage the client itself reports, and a tool call requested by the upstream
makes the full round trip (the client runs or refuses the tool and the result reaches the
upstream in that protocol's shape), natively and across the protocol translation.

Codex's `apply_patch` turn (a custom, freeform tool) runs through each translated path
twice: driven by the openai SDK shaped exactly as Codex sends it (always), and by the real
Codex CLI, which must then find the file its patch created (when the binary is present).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest

from accounting.money import parse_usd
from tests.children import stop
from tests.gateway import Harness

CLIENTS_DIR = os.environ.get("TOLLWAY_CLIENTS_DIR", "")
RUN_TIMEOUT_S = 50.0

pytestmark = [pytest.mark.timeout(60)]


def _binary(name: str) -> str:
    dirs = [d for d in (CLIENTS_DIR, os.environ.get("PATH", "")) if d]
    found = shutil.which(name, path=os.pathsep.join(dirs))
    if found is None:
        pytest.skip(f"{name} is not in TOLLWAY_CLIENTS_DIR ({CLIENTS_DIR or 'unset'}) nor on PATH "
                    "(see bench/clients/README.md)")
    return found


def _base_env(home: Path) -> dict[str, str]:
    # Only what the clients need: nothing from the developer's own environment (a real
    # ANTHROPIC_API_KEY or OPENAI_BASE_URL must not leak into the run).
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "NO_COLOR": "1"}


async def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=str(cwd), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        await stop(proc)
        raise AssertionError(f"{argv[0]} did not finish within {RUN_TIMEOUT_S} s") from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _rows(h: Harness, key_id: int) -> list[asyncpg.Record]:
    await h.flush()
    conn = await asyncpg.connect(h.dsn)
    try:
        return await conn.fetch("SELECT * FROM usage_log WHERE key_id = $1 ORDER BY ts", key_id)
    finally:
        await conn.close()


async def _money(h: Harness, user_id: int, key_id: int) -> tuple[int, int]:
    """(the user's balance, the key's spend) in nano-USD."""
    conn = await asyncpg.connect(h.dsn)
    try:
        balance = await conn.fetchval("SELECT balance_nano FROM users WHERE id = $1", user_id)
        spent = await conn.fetchval("SELECT spent_nano FROM keys WHERE id = $1", key_id)
    finally:
        await conn.close()
    return int(balance), int(spent)


async def _assert_billed(h: Harness, user_id: int, key_id: int, rows: list[asyncpg.Record],
                         balance: str = "10") -> None:
    """Every row priced, and the balance and the key's spend moved by exactly their sum."""
    assert rows and all(r["cost_nano"] > 0 for r in rows if r["status"] == 200)
    total = sum(int(r["cost_nano"]) for r in rows)
    assert await _money(h, user_id, key_id) == (parse_usd(balance) - total, total)


@pytest.fixture
def claude() -> str:
    """Path of the claude binary (skips before any gateway starts when it is missing)."""
    return _binary("claude")


@pytest.fixture
def codex() -> str:
    return _binary("codex")


# --- gateways ------------------------------------------------------------------------------

def _openai_only(models: list[str]) -> list[dict[str, Any]]:
    return [{"name": "only-openai", "protocol": "openai", "base_url": "http://127.0.0.1:{port}/v1",
             "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": models}]


def _anthropic_only(models: list[str]) -> list[dict[str, Any]]:
    return [{"name": "only-anthropic", "protocol": "anthropic", "base_url": "http://127.0.0.1:{port}",
             "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": models}]


@pytest.fixture
async def native(pg_dsn: str):
    """claude-* on an Anthropic channel, gpt-* on an OpenAI channel: no translation."""
    h = await Harness().start(pg_dsn)
    yield h
    await h.stop()


@pytest.fixture
async def openai_only(pg_dsn: str):
    """Only an OpenAI-protocol channel, serving every model name, claude-* included."""
    h = await Harness().start(pg_dsn, channels=_openai_only(["*"]))
    yield h
    await h.stop()


@pytest.fixture
async def anthropic_only(pg_dsn: str):
    """Only an Anthropic-protocol channel, serving every model name, gpt-* included."""
    h = await Harness().start(pg_dsn, channels=_anthropic_only(["*"]))
    yield h
    await h.stop()


# --- Claude Code ---------------------------------------------------------------------------

async def _claude(claude: str, h: Harness, secret: str, tmp_path: Path, prompt: str, *extra: str) -> dict[str, Any]:
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {**_base_env(home), "ANTHROPIC_BASE_URL": h.url, "ANTHROPIC_API_KEY": secret,
           "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    argv = [claude, "-p", prompt, "--output-format", "json", *extra]
    code, out, err = await _run(argv, env, work)
    assert out.strip(), f"claude printed nothing (exit {code}): {err[-2000:]}"
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return result


def _claude_tokens(result: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens Claude Code says it was charged for, over every model it used."""
    models = result["modelUsage"].values()
    return sum(m["inputTokens"] for m in models), sum(m["outputTokens"] for m in models)


async def test_claude_code_text_turn_anthropic_channel(claude: str, native: Harness, tmp_path: Path) -> None:
    user_id, key_id, secret = await native.user_and_key()
    result = await _claude(claude, native, secret, tmp_path, "say hi")
    assert result["subtype"] == "success" and not result["is_error"], result
    assert result["result"].startswith("hello")
    rows = await _rows(native, key_id)
    assert {(r["route"], r["channel"], r["status"], r["usage_source"]) for r in rows} == {
        ("messages", "mock-anthropic", 200, "upstream")}
    assert all(r["model"].startswith("claude-") for r in rows)
    billed = (sum(r["input_tokens"] for r in rows), sum(r["output_tokens"] for r in rows))
    assert billed == _claude_tokens(result)
    await _assert_billed(native, user_id, key_id, rows)


async def test_claude_code_tool_turn_anthropic_channel(claude: str, native: Harness, tmp_path: Path) -> None:
    """The mock calls Claude Code's first tool with placeholder arguments; Claude Code
    rejects them and sends a tool_result error back, which ends the turn normally."""
    user_id, key_id, secret = await native.user_and_key()
    result = await _claude(claude, native, secret, tmp_path, "please use the tool")
    assert result["subtype"] == "success" and not result["is_error"], result
    assert result["num_turns"] == 2
    stats = native.mock.stats
    assert stats.requests == {"/v1/messages": 2}
    messages = stats.last_body["messages"]
    call = next(b for m in messages if m["role"] == "assistant" for b in m["content"]
                if b["type"] == "tool_use")
    assert call["name"] == stats.last_body["tools"][0]["name"]
    answer = messages[-1]
    assert answer["role"] == "user"
    assert [b["tool_use_id"] for b in answer["content"] if b["type"] == "tool_result"] == [call["id"]]
    rows = await _rows(native, key_id)
    assert [r["status"] for r in rows] == [200, 200]
    billed = (sum(r["input_tokens"] for r in rows), sum(r["output_tokens"] for r in rows))
    assert billed == _claude_tokens(result)
    await _assert_billed(native, user_id, key_id, rows)


async def test_claude_code_default_tools_openai_channel(claude: str, openai_only: Harness, tmp_path: Path) -> None:
    _, key_id, secret = await openai_only.user_and_key()
    result = await _claude(claude, openai_only, secret, tmp_path, "say hi")
    assert result["subtype"] == "success" and not result["is_error"], result
    rows = await _rows(openai_only, key_id)
    assert {(r["route"], r["channel"], r["status"]) for r in rows} == {("messages", "only-openai", 200)}


async def test_claude_code_tool_turn_openai_channel(claude: str, openai_only: Harness, tmp_path: Path) -> None:
    """Claude Code against an OpenAI-protocol channel: the tool call, Claude Code's
    tool_result and the next answer all cross the Anthropic <-> OpenAI chat translation.

    `--tools Read` keeps Claude Code from sending a mid-conversation system message (see
    the xfail above). The bundled mock asks for the tool again whenever the newest *user*
    message says "use the tool", and on OpenAI chat a tool result is a "tool" message, so
    it never stops asking: `--max-turns 2` bounds that loop, and then Claude Code ends
    with error_max_turns instead of success."""
    user_id, key_id, secret = await openai_only.user_and_key()
    result = await _claude(claude, openai_only, secret, tmp_path, "please use the tool",
                           "--tools", "Read", "--max-turns", "2")
    assert result.get("api_error_status") is None, result
    if result["stop_reason"] == "tool_use":
        assert result["subtype"] == "error_max_turns", result
    else:
        assert result["subtype"] == "success" and result["result"].startswith("hello"), result
    stats = openai_only.mock.stats
    assert stats.requests == {"/v1/chat/completions": 2}
    messages = stats.last_body["messages"]
    calls = [c for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert [c["function"]["name"] for c in calls] == ["Read"]
    tool_msgs = [m for m in messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == [calls[0]["id"]]
    assert "tool_use_error" in tool_msgs[0]["content"]  # Claude Code refused the placeholder arguments
    rows = await _rows(openai_only, key_id)
    assert [(r["route"], r["channel"], r["protocol"], r["status"]) for r in rows] == [
        ("messages", "only-openai", "anthropic", 200)] * 2
    billed = (sum(r["input_tokens"] for r in rows), sum(r["output_tokens"] for r in rows))
    assert billed == _claude_tokens(result)
    await _assert_billed(openai_only, user_id, key_id, rows)


# --- Codex CLI -----------------------------------------------------------------------------

CODEX_CONFIG = """\
model = "gpt-5.5"
model_provider = "tollway"

[model_providers.tollway]
name = "Tollway"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "TOLLWAY_API_KEY"
request_max_retries = 0
stream_max_retries = 0
"""


async def _codex(codex: str, h: Harness, secret: str, tmp_path: Path, prompt: str,
                 *extra: str) -> list[dict[str, Any]]:
    home = tmp_path / "home"
    codex_home = tmp_path / "codex"
    work = tmp_path / "work"
    for d in (home, codex_home, work):
        d.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(CODEX_CONFIG.format(url=h.url))
    env = {**_base_env(home), "CODEX_HOME": str(codex_home), "TOLLWAY_API_KEY": secret}
    argv = [codex, "exec", "--skip-git-repo-check", "--json", *extra, prompt]
    code, out, err = await _run(argv, env, work)
    events = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events, f"codex printed no events (exit {code}): {err[-2000:]}"
    return events


async def test_codex_text_turn(codex: str, native: Harness, tmp_path: Path) -> None:
    user_id, key_id, secret = await native.user_and_key()
    events = await _codex(codex, native, secret, tmp_path, "say hi")
    assert events[-1]["type"] == "turn.completed", events
    messages = [e["item"]["text"] for e in events
                if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"]
    assert messages and messages[-1].startswith("hello")
    rows = await _rows(native, key_id)
    assert [(r["route"], r["channel"], r["model"], r["status"], r["stream"]) for r in rows] == [
        ("responses", "mock-openai", "gpt-5.5", 200, True)]
    usage = events[-1]["usage"]
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
    await _assert_billed(native, user_id, key_id, rows)


async def test_codex_text_turn_anthropic_channel(codex: str, anthropic_only: Harness, tmp_path: Path) -> None:
    """Codex's Responses request served by an Anthropic-protocol channel (translated)."""
    user_id, key_id, secret = await anthropic_only.user_and_key()
    events = await _codex(codex, anthropic_only, secret, tmp_path, "say hi")
    assert events[-1]["type"] == "turn.completed", events
    assert anthropic_only.mock.stats.requests == {"/v1/messages": 1}
    rows = await _rows(anthropic_only, key_id)
    assert [(r["route"], r["channel"], r["status"]) for r in rows] == [("responses", "only-anthropic", 200)]
    usage = events[-1]["usage"]
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
    await _assert_billed(anthropic_only, user_id, key_id, rows)


async def _codex_tool_loop(codex: str, h: Harness, tmp_path: Path, cap: str) -> tuple[int, int, list[dict[str, Any]]]:
    user_id, key_id, secret = await h.user_and_key(cap_nano=parse_usd(cap))
    events = await _codex(codex, h, secret, tmp_path, "please use the tool")
    last = events[-1]
    if last["type"] == "turn.failed":
        assert "402" in last["error"]["message"] and "cap" in last["error"]["message"], last
    else:
        assert last["type"] == "turn.completed", events
    return user_id, key_id, events


async def test_codex_tool_turn(codex: str, native: Harness, tmp_path: Path) -> None:
    """The mock calls Codex's first tool (exec_command) with placeholder arguments, which
    Codex cannot parse; it returns that error as the function_call_output.

    The bundled mock keeps asking for the tool (on the Responses API the newest user
    message is still the prompt) and Codex exec has no turn limit, so the key's spending
    cap is what ends the loop: 402 from the gateway, with everything before it billed."""
    user_id, key_id, events = await _codex_tool_loop(codex, native, tmp_path, "1")
    stats = native.mock.stats
    served = stats.requests["/v1/responses"]
    assert served >= 2
    items = stats.last_body["input"]
    calls = {i["call_id"]: i for i in items if i.get("type") == "function_call"}
    outputs = [i for i in items if i.get("type") == "function_call_output"]
    assert outputs and all(o["call_id"] in calls for o in outputs)
    assert {c["name"] for c in calls.values()} == {stats.last_body["tools"][0]["name"]}
    rows = await _rows(native, key_id)
    assert len([r for r in rows if r["status"] == 200]) == served
    refused = [r["status"] for r in rows if r["status"] != 200]
    assert refused == ([402] if events[-1]["type"] == "turn.failed" else [])
    await _assert_billed(native, user_id, key_id, rows)


async def test_codex_tool_loop_stops_at_key_cap(codex: str, native: Harness, tmp_path: Path) -> None:
    """One request at a time, so the cap must hold exactly (DESIGN invariant 5)."""
    user_id, key_id, _ = await _codex_tool_loop(codex, native, tmp_path, "1")
    _, spent = await _money(native, user_id, key_id)
    assert spent <= parse_usd("1")


# --- Codex's apply_patch across the translation ----------------------------------------------
#
# Codex declares apply_patch as a custom (freeform) tool with a Lark grammar and expects the
# call back as a custom_tool_call holding the raw patch. The mock, told "use the tool
# apply_patch" followed by a patch, calls that tool with that patch, in its own protocol: a
# custom tool call on chat completions, a tool_use with the one string property the gateway
# gave the tool on Anthropic.

APPLY_PATCH_LARK = (  # as Codex CLI 0.171.0 sends it
    'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF\nend_patch: "*** End Patch" LF?\n\n'
    'hunk: add_hunk | delete_hunk | update_hunk\nadd_hunk: "*** Add File: " filename LF add_line+\n'
    'delete_hunk: "*** Delete File: " filename LF\n'
    'update_hunk: "*** Update File: " filename LF change_move? change?\n\nfilename: /(.+)/\n'
    'add_line: "+" /(.*)/ LF -> line\n\nchange_move: "*** Move to: " filename LF\n'
    'change: (change_context | change_line)+ eof_line?\nchange_context: ("@@" | "@@ " /(.+)/) LF\n'
    'change_line: ("+" | "-" | " ") /(.*)/ LF\neof_line: "*** End of File" LF\n\n%import common.LF\n'
)
CODEX_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "exec_command", "description": "Runs a command in a PTY.", "strict": False,
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                    "additionalProperties": False}},
    {"type": "custom", "name": "apply_patch",
     "description": "The `apply_patch` tool can be used to edit files. This is a FREEFORM tool, so do not "
                    "wrap the patch in JSON.",
     "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH_LARK}},
    {"type": "web_search"},
]
NEW_FILE = 'hello from "the gateway" \u00e9\\n\n'
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+" + NEW_FILE + "*** End Patch\n"
PATCH_PROMPT = "please use the tool apply_patch\n" + PATCH
PATCH_OUTPUT = "Exit code: 0\nWall time: 0.1 seconds\nOutput:\nSuccess. Updated the following files:\nA hello.txt\n"


def _openai_chat_only(models: list[str]) -> list[dict[str, Any]]:
    return [{"name": "only-chat", "protocol": "openai", "base_url": "http://127.0.0.1:{port}/v1",
             "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": models, "responses_api": False}]


TRANSLATED_CHANNELS = {"anthropic": _anthropic_only(["*"]), "chat": _openai_chat_only(["*"])}


@pytest.fixture(params=sorted(TRANSLATED_CHANNELS))
async def translated(request: pytest.FixtureRequest, pg_dsn: str):
    """Only a channel that needs translation for a Responses client: Anthropic, or an OpenAI
    channel that has chat completions only."""
    h = await Harness().start(pg_dsn, channels=TRANSLATED_CHANNELS[request.param])
    yield h
    await h.stop()


async def _responses_turn(client: openai.AsyncOpenAI, items: list[dict[str, Any]], stream: bool) -> Any:
    """One request shaped as Codex shapes it; the final Response (checked event by event when streamed)."""
    kwargs: dict[str, Any] = {
        "model": "gpt-5.5", "instructions": "You are Codex, a coding agent.", "input": items,
        "tools": CODEX_TOOLS, "tool_choice": "auto", "parallel_tool_calls": True, "store": False,
        "reasoning": {"effort": "medium"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "01a2452c-9b0d-7551-ad2a-54b8240afe99",
    }
    if not stream:
        return await client.responses.create(**kwargs)
    final, deltas, done, added = None, "", None, []
    async for event in await client.responses.create(stream=True, **kwargs):
        if event.type == "response.output_item.added":
            added.append(event.item.type)
        elif event.type == "response.custom_tool_call_input.delta":
            deltas += event.delta
        elif event.type == "response.custom_tool_call_input.done":
            done = event.input
        elif event.type == "response.completed":
            final = event.response
    assert final is not None
    calls = [o for o in final.output if o.type == "custom_tool_call"]
    if calls:
        assert added.count("custom_tool_call") == 1 and deltas == done == calls[0].input
    return final


def _upstream_saw_the_call(h: Harness, call_id: str) -> None:
    """The second upstream request carries the call and its output in the channel's own shape."""
    stats = h.mock.stats
    body = stats.last_body
    if stats.last_route == "/v1/messages":
        tool = next(t for t in body["tools"] if t["name"] == "apply_patch")
        assert tool["input_schema"]["properties"] == {"input": {"type": "string", "description": tool[
            "input_schema"]["properties"]["input"]["description"]}}
        assert APPLY_PATCH_LARK in tool["description"]
        assert body["messages"][-2:] == [
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": call_id, "name": "apply_patch", "input": {"input": PATCH}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": PATCH_OUTPUT}]},
        ]
    else:
        assert stats.last_route == "/v1/chat/completions"
        assert {"type": "custom", "custom": {
            "name": "apply_patch", "description": CODEX_TOOLS[1]["description"],
            "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": APPLY_PATCH_LARK}}},
        } in body["tools"]
        assert body["messages"][-2:] == [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "custom", "custom": {"name": "apply_patch", "input": PATCH}}]},
            {"role": "tool", "tool_call_id": call_id, "content": PATCH_OUTPUT},
        ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_codex_apply_patch_turn_sdk(translated: Harness, stream: bool) -> None:
    """Codex's apply_patch turn, driven by the openai SDK exactly as Codex shapes it: the call
    comes back as a custom_tool_call holding the raw patch, and the patch's output goes
    upstream as the result of that same call."""
    user_id, key_id, secret = await translated.user_and_key()
    async with openai.AsyncOpenAI(base_url=translated.url + "/v1", api_key=secret, max_retries=0) as client:
        prompt = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": PATCH_PROMPT}]}
        first = await _responses_turn(client, [prompt], stream)
        calls = [o for o in first.output if o.type == "custom_tool_call"]
        assert [(c.name, c.input) for c in calls] == [("apply_patch", PATCH)], first.output
        call = calls[0]
        second = await _responses_turn(client, [
            prompt,
            {"type": "custom_tool_call", "id": call.id, "status": "completed", "call_id": call.call_id,
             "name": call.name, "input": call.input},
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": PATCH_OUTPUT},
        ], stream)
    assert second.status == "completed" and second.output_text.startswith("hello")
    _upstream_saw_the_call(translated, call.call_id)
    rows = await _rows(translated, key_id)
    assert [(r["route"], r["status"], r["stream"]) for r in rows] == [("responses", 200, stream)] * 2
    await _assert_billed(translated, user_id, key_id, rows)


async def test_codex_apply_patch_turn_translated(codex: str, translated: Harness, tmp_path: Path) -> None:
    """The real Codex CLI: the mock asks for apply_patch through the translation, Codex runs
    the patch (the file appears with the patch's text) and sends its output back."""
    user_id, key_id, secret = await translated.user_and_key()
    events = await _codex(codex, translated, secret, tmp_path, PATCH_PROMPT, "--sandbox", "workspace-write")
    assert events[-1]["type"] == "turn.completed", events
    changes = [e["item"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == "file_change"]
    assert [c["status"] for c in changes] == ["completed"], events
    assert (tmp_path / "work" / "hello.txt").read_text() == NEW_FILE
    items = translated.mock.stats.last_body
    answered = items["messages"][-1]
    if answered["role"] == "user":  # Anthropic: the tool_result block
        result = answered["content"][0]
        assert result["type"] == "tool_result" and "Success" in result["content"], answered
    else:  # chat: the tool message
        assert answered["role"] == "tool" and "Success" in answered["content"], answered
    rows = await _rows(translated, key_id)
    assert [(r["route"], r["status"]) for r in rows] == [("responses", 200)] * 2
    usage = events[-1]["usage"]
    billed = (sum(r["input_tokens"] for r in rows), sum(r["output_tokens"] for r in rows))
    assert billed == (usage["input_tokens"], usage["output_tokens"])
    await _assert_billed(translated, user_id, key_id, rows)

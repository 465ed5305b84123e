"""A crash mid-stream still bills what was emitted (issue 19, item 7): the gateway's
side, relay.checkpoints (the journal's side is in test_journal, test_ledger and
test_ledgerd)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from accounting import journal as jn
from accounting import tokens
from accounting.journal import Journal
from accounting.ledger import Ledger
from relay.checkpoints import OutputMeter, StreamCheckpoints
from tests.test_ledger import read_file, rec


class FakeLedger:
    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.forgotten: list[str] = []

    def checkpoint(self, row: tuple[Any, ...]) -> None:
        self.rows.append(row)

    def forget_checkpoint(self, request_id: str) -> None:
        self.forgotten.append(request_id)


async def until(pred: Any, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_one_timer_checkpoints_each_live_stream_with_something_new() -> None:
    ledger = FakeLedger()
    cps = StreamCheckpoints(ledger, asyncio.get_running_loop(), interval=0.01)
    a_rows = iter([(1, "rid-a", 1), None, (1, "rid-a", 2)])
    b_calls = []
    cps.add("a", lambda: next(a_rows, None))
    cps.add("b", lambda: b_calls.append(1))  # never anything new: never journaled
    await until(lambda: len(ledger.rows) == 2 and len(b_calls) >= 4)
    assert ledger.rows == [(1, "rid-a", 1), (1, "rid-a", 2)] and cps.written == 2
    cps.discard("a")
    cps.discard("b")
    cps.discard("never-added")
    assert ledger.forgotten == ["rid-a"]  # b never had a checkpoint to forget
    assert len(cps) == 0
    calls = len(b_calls)
    await until(lambda: cps._handle is None)  # idle: no timer while nothing streams
    assert len(b_calls) <= calls + 1
    cps.add("c", lambda: (1, "rid-c", 3))
    await until(lambda: ledger.rows[-1] == (1, "rid-c", 3))
    cps.close()


async def test_a_failing_row_fn_is_counted_and_the_others_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    ledger = FakeLedger()
    cps = StreamCheckpoints(ledger, asyncio.get_running_loop(), interval=0.01)

    def broken() -> None:
        raise KeyError("bug")

    cps.add("x", broken)
    cps.add("y", lambda: (1, "rid-y", 1))
    await until(lambda: cps.failures >= 3 and len(ledger.rows) >= 3)
    assert sum("stream checkpoint failed" in r.message for r in caplog.records) == 1
    cps.close()


async def test_checkpoints_reach_the_journal_and_a_discarded_stream_is_not_carried_on(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=4096)
    ledger = Ledger(journal)
    cps = StreamCheckpoints(ledger, asyncio.get_running_loop(), interval=0.01)
    row = rec(1, 1, 77, rid="rid-live").row()
    cps.add("k", lambda: row)
    await until(lambda: cps.written >= 1)
    assert journal.live_checkpoints == 1
    on_disk = jn.parse_all(read_file(journal.paths[0]))[1]
    assert {c.request_id for c in on_disk} == {"rid-live"}
    cps.discard("k")
    assert journal.live_checkpoints == 0 and ledger.pending == []
    journal.close(delete=True)


def test_the_output_meter_counts_each_chunk_once_whatever_the_cuts() -> None:
    words = ["Hello", " there", ",", " how", " are", " you", "?"]
    events = b"".join(
        b'data: ' + orjson.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}) + b"\n\n"
        for w in words) + b"data: [DONE]\n\n"
    whole = tokens.count_text("".join(words))
    for step in (1, 7, 50, len(events)):
        meter = OutputMeter("openai", "chat")
        chunks: list[bytes] = []
        counts = []
        for i in range(0, len(events), step):
            chunks.append(events[i:i + step])
            counts.append(meter.count_chunks(chunks))
        assert counts[-1] == whole and counts == sorted(counts)
        assert meter.count_chunks(chunks) == whole  # nothing new: nothing counted twice
    parts_meter = OutputMeter("openai", "chat")
    parts: list[str] = []
    for w in words:
        parts.append(w)
        parts_meter.count_parts(parts)
    assert abs(parts_meter.tokens - whole) <= 2  # counted in pieces, not as one text

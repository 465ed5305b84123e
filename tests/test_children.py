"""Children are reaped by asyncio's watcher only, so their exit status is the real one."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from tests.children import signal_child, stop


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][:1] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


async def test_stopping_a_child_that_already_died_reports_its_signal() -> None:
    # The window that failed CI: the child is dead (a zombie) but the watcher thread has
    # not reaped it yet when the test signals it again. Process.kill() would reap it
    # itself (returncode 255); stop() must not.
    for _ in range(20):
        proc = await asyncio.create_subprocess_exec("sleep", "60")
        await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5  # spin, not sleep: keep the watcher behind
        while not _zombie_or_gone(proc.pid) and time.monotonic() < deadline:
            pass
        assert await stop(proc) == -signal.SIGKILL


async def test_stop_of_a_running_child_and_of_a_reported_one() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    assert await stop(proc, signal.SIGTERM) == -signal.SIGTERM
    signal_child(proc)  # already reported: nothing is sent, nothing raises
    assert await stop(proc) == -signal.SIGTERM

"""Stopping a child started with asyncio.create_subprocess_exec, without racing its reaper.

asyncio reaps each child in a watcher thread blocked in waitpid(pid). `Process.kill()`,
`terminate()` and `send_signal()` first poll the child (waitpid WNOHANG, bpo-38630): when
the child has already died but the watcher thread has not yet run, that poll reaps it,
the watcher's waitpid fails with ECHILD, asyncio logs "Unknown child process pid …, will
report returncode 255" and `returncode` is 255 instead of the signal. On a loaded machine
that window is milliseconds wide, so a test that signals a child that may have exited
(kill -9 sent twice, a child that crashed at start) fails now and then.

`os.kill` never waits: a child that died but is not reaped is a zombie and ignores the
signal, and its pid cannot be reused until the watcher has reaped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


def signal_child(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    """Send `sig` unless asyncio already reported the exit; never reaps."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> int:
    """Signal the child (if still running) and wait for asyncio's own report of its exit
    (bounded: a child that ignores `sig` fails the test, it does not hang it)."""
    signal_child(proc, sig)
    async with asyncio.timeout(10):
        return await proc.wait()

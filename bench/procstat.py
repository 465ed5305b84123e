"""CPU time and resident memory of a process tree, read from /proc.

The benchmark charges a target for everything its process tree burns: the root
(nginx master, the gateway supervisor), every live descendant (workers), and the
children already reaped (the root's cutime/cstime). Reading /proc directly keeps
the probe itself out of the measurement; this module never signals or waits on
the processes it reads.
"""

from __future__ import annotations

import os
import threading

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    return [f.decode() for f in rest]  # rest[0] is field 3 (state)


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process visible now."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is None:
            continue
        out.setdefault(int(f[1]), []).append(int(name))
    return out


def tree(root: int) -> list[int]:
    """The root and all its live descendants."""
    kids = children_map()
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(kids.get(pid, ()))
    return found


def cpu_s(pid: int) -> float | None:
    """utime+stime of one process (children not included), or None if it is not on this host."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12])) / CLK_TCK


def tree_cpu_s(roots: list[int]) -> float:
    """utime+stime of every live process in the trees, plus what the roots' reaped children used.

    A reaped grandchild is counted by its own parent's cutime, which is a live
    descendant here (or was reaped itself and is counted one level up).
    """
    ticks = 0
    for root in roots:
        for pid in tree(root):
            f = _stat_fields(pid)
            if f is None:
                continue
            # fields 14..17 (1-based): utime stime cutime cstime -> rest[11..14]
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_rss_bytes(roots: list[int]) -> int:
    total = 0
    for root in roots:
        for pid in tree(root):
            try:
                with open(f"/proc/{pid}/statm", "rb") as fh:
                    total += int(fh.read().split()[1]) * PAGE
            except (OSError, IndexError, ValueError):
                continue
    return total


class PeakRss:
    """Samples the summed RSS of process trees on a thread until stopped; keeps the peak."""

    def __init__(self, roots: list[int], interval_s: float = 0.1) -> None:
        self.roots = roots
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss_bytes(self.roots))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(self.roots))


def listen_overflows() -> int:
    """Host-wide count of connections dropped because an accept queue was full.

    A rise during a run means some p99 latency is the kernel's SYN-ACK retransmit timer
    (1 s, 3 s, 7 s...), not the target's own work.
    """
    try:
        with open("/proc/net/netstat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row.get("ListenOverflows", 0))
    return 0

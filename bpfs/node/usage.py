"""The node's usage reports: every process it holds, read from /proc, sent to the master.

    session.usage_interval                  from `welcome` (None: the master wants none)
    nursery.start_soon(report_usage, session)   one `usage` every interval, and at once
                                            after the master's `sample` (`on_sample`)

Each report reads /proc/PID/stat of every process the session holds (`ProcessTable.held`,
keyed by cluster PID: whatever the node holds is reported, however it came to be there)
and sends one `usage` message (bpfs/wire/messages.py): ticks of this node's clock, its
uptime as `at`, each process's age. stat alone carries all of it (vsize in bytes, rss in
pages), so a process costs one open and one read. A process that ends meanwhile is left
out; at most messages.MAX_USAGE are sent (more would be a node holding over 65536
processes; the rest wait for a node that holds fewer). Large tables are read in a worker
thread, so restores and signals do not wait behind the reads.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import trio

from bpfs.usage import sample_of
from bpfs.wire import messages

log = logging.getLogger("bpslave")

HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
IN_THREAD = 200                 # tables larger than this are read in a worker thread
MIN_GAP = 0.05                  # seconds between two reports, however often `sample` comes


def uptime(proc: str = "/proc") -> float:
    with open(f"{proc}/uptime", "rb") as f:
        return float(f.read().split()[0])


def read_samples(held: Iterable[tuple[int, int]], proc: str = "/proc"
                 ) -> tuple[float, list[messages.ProcUsage]]:
    """(uptime, the figures of each (pid, restore id) in `held` that still exists)."""
    up = uptime(proc)
    out: list[messages.ProcUsage] = []
    for pid, mid in held:
        try:
            fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue                # ended since
        try:
            text = os.read(fd, 4096).decode(errors="replace")
        except OSError:
            continue
        finally:
            os.close(fd)
        try:
            out.append(messages.ProcUsage(*sample_of(pid, mid, text, up, HZ, PAGE)))
        except (ValueError, IndexError):
            log.debug("pid %d: unreadable stat %r", pid, text[:80])
        if len(out) >= messages.MAX_USAGE:
            break
    return up, out


def message(at: float, procs: list[messages.ProcUsage]) -> messages.Usage:
    return messages.Usage(hz=HZ, at=at, procs=procs)


def held_by(session: Any) -> list[tuple[int, int]]:
    """(pid, restore id) of every process `session` holds."""
    return [(pid, h.id) for pid, h in list(session.node.procs.held.items())
            if h.session is session]


async def report_usage(session: Any) -> None:
    """One `usage` at once (the master learns that this node reports), then one per
    `session.usage_interval`, or sooner when `sample` asks; until cancelled (the
    session's end). Send errors end the session like any other send's."""
    interval = session.usage_interval
    while True:
        held = held_by(session)
        if len(held) > IN_THREAD:
            at, samples = await trio.to_thread.run_sync(read_samples, held)
        else:
            at, samples = read_samples(held)
        await session.send(message(at, samples))
        await trio.sleep(MIN_GAP)
        with trio.move_on_after(interval):
            await session.usage_wanted.wait()
        session.usage_wanted = trio.Event()


async def on_sample(session: Any, msg: messages.Sample) -> None:
    """The master wants figures now (a reader of procs/P/stat found them old)."""
    session.usage_wanted.set()

"""The new command line of a process that exec'd on this node, for its ghost: one task for
every such process.

An execve is let through at once: the new program's command line exists only once the
call has gone on, so the supervisor notes the one the process had before (`add`) and this
task looks again at EXEC_CHECKS after the exec (each delay after the previous look); if it
changed, `report(job, pid, cmdline)` (the supervisor sends `execed`). A process that ends
before a look needs none (its ghost ends unrenamed): `drop` forgets it. Why one task and a
heap of due looks: a task with a timer per exec cost more than the rest of the node's part
of a short-lived process (/bin/true in a loop).

An exec is noted from the receiver thread that let it through (`add_soon`), and the task
wakes at most every LOOK_EVERY for all the looks due: a shell's loop of short programs
costs the event loop one wake-up per LOOK_EVERY, not one per exec (a note wakes it only if
it sleeps past the note's look, with nothing due before). A dropped process's due look
stays in the heap until then (nothing is looked at for it).

    names = ExecNames(report)    nursery.start_soon(names.run)
    names.add(job, pid, before)  (trio's thread)
    names.add_soon(job, pid, before, post)   (any thread; `post(fn)`: run fn in trio's)
    names.drop(pid)              the process ended: no look for it (any thread)
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from typing import Any, Callable

import trio

from bpfs.node import procread

EXEC_CHECKS = (0.005, 0.02, 0.1, 0.5, 2.0, 5.0)   # after an execve: when to look at the
                                   # cmdline (a program done sooner costs its ghost no rename;
                                   # a loaded node may take long to load one)
LOOK_EVERY = 0.005                 # s: the task's wake-ups, at most this often


class ExecNames:
    def __init__(self, report: Callable[[Any, int, bytes], None]) -> None:
        self._report = report
        self._due: list[tuple[float, int, int]] = []       # (when, entry, pid)
        self._entries: dict[int, tuple[int, Any, bytes, int]] = {}  # pid -> (entry, job,
                                                            # cmdline before, look)
        self._numbers = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._lock = threading.Lock()       # the heap and the entries: any thread adds
        self._wake_at = math.inf            # the task's deadline (under the lock)
        self._last = -math.inf              # its last look
        self._offset: float | None = None   # trio's clock - time.perf_counter()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, job: Any, pid: int, before: bytes) -> None:
        """`pid` (of `job`) exec'd; its command line was `before` (trio's thread)."""
        if self._push(job, pid, before, 0, trio.current_time()):
            self._rearm()

    def add_soon(self, job: Any, pid: int, before: bytes, post: Callable[..., None]) -> None:
        """`add` from any thread (trio's clock is perf_counter's plus an offset, read
        once the task runs; before that, `add` is posted)."""
        if self._offset is None:
            post(self.add, job, pid, before)
        elif self._push(job, pid, before, 0, time.perf_counter() + self._offset):
            post(self._rearm)

    def drop(self, pid: int) -> None:
        """`pid` has ended: no look for it (any thread)."""
        with self._lock:
            self._entries.pop(pid, None)

    async def run(self) -> None:
        self._offset = trio.current_time() - time.perf_counter()
        while True:
            with trio.CancelScope(deadline=self._deadline()) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            self._look(trio.current_time())

    def _push(self, job: Any, pid: int, before: bytes, look: int, now: float) -> bool:
        """True if the task sleeps past this look (then `_rearm` in trio's thread)."""
        n = next(self._numbers)
        when = now + EXEC_CHECKS[look]
        with self._lock:
            self._entries[pid] = (n, job, before, look)
            heapq.heappush(self._due, (when, n, pid))
            if when >= self._wake_at:
                return False
            self._wake_at = when            # a `_rearm` is on its way: no other
            return True

    def _rearm(self) -> None:
        if self._scope is not None:
            self._scope.deadline = self._deadline()

    def _deadline(self) -> float:
        with self._lock:
            at = self._due[0][0] if self._due else math.inf
            self._wake_at = max(at, self._last + LOOK_EVERY)
            return self._wake_at

    def _live(self, n: int, pid: int) -> bool:
        entry = self._entries.get(pid)
        return entry is not None and entry[0] == n

    def _look(self, now: float) -> None:
        self._last = now
        while True:
            with self._lock:
                if not self._due or self._due[0][0] > now:
                    return
                _, n, pid = heapq.heappop(self._due)
                if not self._live(n, pid):
                    continue
                _, job, before, look = self._entries.pop(pid)
            cmdline = procread.cmdline(pid)
            if not cmdline or procread.state(pid) in (None, "Z"):
                continue            # gone, or ended: its ghost ends too, unrenamed
            if cmdline != before:
                self._report(job, pid, cmdline)
            elif look + 1 < len(EXEC_CHECKS):
                self._push(job, pid, before, look + 1, now)

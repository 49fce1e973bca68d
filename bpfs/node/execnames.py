"""The new command line of a process that exec'd on this node, for its ghost: one task for
every such process.

An execve is let through at once: the new program's command line exists only once the
call has gone on, so the supervisor notes the one the process had before (`add`) and this
task looks again at EXEC_CHECKS after the exec (each delay after the previous look); if it
changed, `report(job, pid, cmdline)` (the supervisor sends `execed`). A process that ends
before a look needs none (its ghost ends unrenamed): `drop` forgets it, and the task is
not woken for it. Why one task and a heap of due looks: a task with a timer per exec cost
more than the rest of the node's part of a short-lived process (/bin/true in a loop).

    names = ExecNames(report)    nursery.start_soon(names.run)
    names.add(job, pid, before)  (trio's thread)
    names.drop(pid)              the process ended: no look for it
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Callable

import trio

from bpfs.node import procread

EXEC_CHECKS = (0.005, 0.02, 0.1, 0.5, 2.0, 5.0)   # after an execve: when to look at the
                                   # cmdline (a program done sooner costs its ghost no rename;
                                   # a loaded node may take long to load one)


class ExecNames:
    def __init__(self, report: Callable[[Any, int, bytes], None]) -> None:
        self._report = report
        self._due: list[tuple[float, int, int]] = []       # (when, entry, pid)
        self._entries: dict[int, tuple[int, Any, bytes, int]] = {}  # pid -> (entry, job,
                                                            # cmdline before, look)
        self._numbers = itertools.count()
        self._scope: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, job: Any, pid: int, before: bytes) -> None:
        """`pid` (of `job`) exec'd; its command line was `before`."""
        self._push(job, pid, before, 0)

    def drop(self, pid: int) -> None:
        """`pid` has ended: no look for it (nor a wake-up of the task, if it was next)."""
        if self._entries.pop(pid, None) is not None:
            self._trim()

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._next()) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            self._look(trio.current_time())

    def _push(self, job: Any, pid: int, before: bytes, look: int) -> None:
        n = next(self._numbers)
        when = trio.current_time() + EXEC_CHECKS[look]
        self._entries[pid] = (n, job, before, look)
        heapq.heappush(self._due, (when, n, pid))
        if self._scope is not None and when < self._scope.deadline:
            self._scope.deadline = when

    def _live(self, n: int, pid: int) -> bool:
        entry = self._entries.get(pid)
        return entry is not None and entry[0] == n

    def _trim(self) -> None:
        """Forget the due looks of dropped processes at the top; the task sleeps until the
        next live one."""
        while self._due and not self._live(self._due[0][1], self._due[0][2]):
            heapq.heappop(self._due)
        if self._scope is not None:
            self._scope.deadline = self._next()

    def _next(self) -> float:
        return self._due[0][0] if self._due else math.inf

    def _look(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
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
                self._push(job, pid, before, look + 1)
        self._trim()

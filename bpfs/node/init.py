"""What the node daemon owes its PID namespace as its PID 1: reaping, and killing.

Orphans of the namespace are re-parented to PID 1, which must wait for them or
they stay zombies. But a blanket `waitpid(-1)` would also swallow the statuses
the migration code needs (ptrace stops of a helper being restored, the exit of
a migrated process that must be reported to the master). So the reaper walks
its own children (/proc/self/task/TID/children), skips the ones `claim`ed by
someone who waits for them itself, and hands each exit status to the callback
registered with `on_exit` (or drops it, for a plain orphan).

Errors: reaping never raises; a callback's exception is logged.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import trio

from bpfs.node import nsutil

log = logging.getLogger("bpslave")

ExitCallback = Callable[[int, int], None]     # (pid, wait status)
SWEEP_INTERVAL = 5.0                           # in case a SIGCHLD was coalesced away


class Reaper:
    def __init__(self) -> None:
        self._claimed: set[int] = set()
        self._callbacks: dict[int, ExitCallback] = {}

    def claim(self, pid: int) -> None:
        """The caller waits for `pid` itself (e.g. a ptrace'd helper); leave it alone."""
        self._claimed.add(pid)

    def release(self, pid: int) -> None:
        self._claimed.discard(pid)

    def on_exit(self, pid: int, callback: ExitCallback) -> None:
        """Call `callback(pid, status)` once `pid`, our child, has been reaped."""
        self._callbacks[pid] = callback

    def children(self) -> list[int]:
        pids: list[int] = []
        for task in os.listdir("/proc/self/task"):   # listdir, not glob: no lstat per task
            pids += task_children(task)
        return pids

    def reap(self) -> int:
        """Collect every exited, unclaimed child now; return how many."""
        n = 0
        for pid in self.children():
            if pid in self._claimed:
                continue
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if wpid:
                n += 1
                self._dispatch(pid, status)
        return n

    def _dispatch(self, pid: int, status: int) -> None:
        callback = self._callbacks.pop(pid, None)
        if callback is None:
            log.debug("reaped orphan %d (status %#x)", pid, status)
            return
        try:
            callback(pid, status)
        except Exception:
            log.exception("exit callback of pid %d failed", pid)

    async def run(self) -> None:
        """Reap on every SIGCHLD, and every few seconds in any case; runs until cancelled.

        SIGCHLD comes for exits only (`nsutil.sigchld_exits_only`): the ptrace stops of
        the restore thread's children would wake the loop for nothing."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            try:
                nsutil.sigchld_exits_only()
            except OSError as exc:
                log.warning("SIGCHLD also for stops: %s", exc)
            self.reap()
            while True:
                with trio.move_on_after(SWEEP_INTERVAL):
                    await signals.__anext__()
                self.reap()


def task_children(task: str | int) -> list[int]:
    """The children of one of our threads (empty if the thread ended meanwhile)."""
    try:
        with open(f"/proc/self/task/{task}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def kill_namespace() -> int:
    """SIGKILL every other process of our PID namespace; only as its PID 1.

    kill(-1) from the namespace's init reaches exactly the namespace's other
    processes. Anywhere else it would reach the whole machine, hence the guard.
    Returns 1 if signals were sent, 0 if there was nobody or we are not PID 1.
    """
    if os.getpid() != 1:
        return 0
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    return 1

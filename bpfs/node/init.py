"""What the node daemon owes its PID namespace as its PID 1: reaping, and killing.

Orphans of the namespace are re-parented to PID 1, which must wait for them or
they stay zombies. The reaper waits for any child (`waitpid(-1, WNOHANG)`) and
hands each exit status to the callback registered with `on_exit` (or drops it,
for a plain orphan). That is safe only because nobody else in the daemon waits
for a child while the reaper can run: the Restorer (bpfs/node/restorer.py)
waits for its helper's, keepers' and new processes' ptrace stops inside a
synchronous call in the same thread, and leaves none pending when it returns. A
stop that does come (someone signalled the parked helper or spare keeper) is
left alone. A restored process's parent is its job's keeper, which reports its
end (bpfs/node/procs.py); it becomes ours only if the keeper is killed first.

The reaper waits with __WNOTHREAD: only for the children of its own thread (the main
one, to which the kernel gives the namespace's orphans). Without it a wait for any child
also takes the stops and ends of the processes another thread of the daemon traces (the
stand-ins' tracer, bpfs/node/standins.py, and a move's thread, bpfs/node/mover.py),
which that thread would then wait for in vain. An orphan that another thread traces (a
stand-in whose parent has ended) is our child all the same, and the kernel shows its
stops and end to us too (its tracer is of our thread group): the reaper peeks first
(WNOWAIT) and leaves such a process to its tracer, which reaps it at its end (a tracer
of the real parent's own thread group gets the zombie), reaping the others one by one.

Errors: reaping never raises; a callback's exception is logged.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

import trio

from bpfs.node import nsutil

log = logging.getLogger("bpslave")

ExitCallback = Callable[[int, int], None]     # (pid, wait status)
SWEEP_INTERVAL = 5.0                           # in case a SIGCHLD was coalesced away
WNOTHREAD = 0x20000000                         # __WNOTHREAD: this thread's children only


class Reaper:
    def __init__(self) -> None:
        self._callbacks: dict[int, ExitCallback] = {}

    def on_exit(self, pid: int, callback: ExitCallback) -> None:
        """Call `callback(pid, status)` once `pid`, our child, has been reaped."""
        self._callbacks[pid] = callback

    def forget(self, pid: int) -> None:
        """No callback for `pid` any more (its end was learnt another way)."""
        self._callbacks.pop(pid, None)

    def adopt(self, pid: int, callback: ExitCallback) -> None:
        """`pid`, a restored process, is reaped from now on (and now, if it has ended)."""
        self.on_exit(pid, callback)
        self.reap()

    def reap(self) -> int:
        """Collect every child that has ended, now; return how many."""
        n = 0
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT | WNOTHREAD)
            except ChildProcessError:
                return n
            if info is None:
                return n
            if _traced_elsewhere(info.si_pid):
                return n + self._reap_each()
            n += self._reap_one(info.si_pid)

    def _reap_one(self, pid: int) -> int:
        try:
            got, status = os.waitpid(pid, os.WNOHANG | WNOTHREAD)
        except ChildProcessError:
            return 0
        if not got or os.WIFSTOPPED(status) or os.WIFCONTINUED(status):
            return 0                # the Restorer's traced helper, signalled: not an end
        self._dispatch(got, status)
        return 1

    def _reap_each(self) -> int:
        """Reap our children one by one, but those another thread traces."""
        n = 0
        for pid in _children():
            if not _traced_elsewhere(pid):
                n += self._reap_one(pid)
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
        the processes a restore builds would wake the loop for nothing."""
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


def _traced_elsewhere(pid: int) -> bool:
    """`pid` is traced by another thread than ours (its events are that thread's)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    tracer = int(line.split()[1])
                    return tracer not in (0, threading.get_native_id())
    except (OSError, ValueError):
        pass
    return False


def _children() -> list[int]:
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
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

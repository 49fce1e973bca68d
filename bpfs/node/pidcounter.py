"""The node's PID counter (ns_last_pid): where the kernel numbers the next process here.

A child forked on the node gets the master's PID: the counter is pointed just below it for
that one fork (`direct`), and once the kernel has taken the number it goes back where it
parks, above the master's pid_max, so that whatever else is numbered here (threads,
keepers, the daemon's own threads and helpers) never takes a PID the master may hand out
(bpfs/node/supervisor.py).

Until the kernel has taken a directed number nothing else may be numbered here, or it
takes the child's, and the child then runs under a number that is not its ghost's, with
no ghost at all. So whatever numbers a thread or a process first waits for the directed
fork to settle (`settle`, `guard`): another job's thread or fork, a restore, and every
thread and process of the daemon's own (bpfs/node/ownpids.py: trio's worker threads come
and go, stdio relays and pidfd proxies are started as moves and signals need them), and a
restore's keeper (made under `guard`). A job's thread clone is itself pending like a
directed fork, to the number above the park point (`direct(parked + 1, ...)`): forks are
directed from receiver threads too (a spare taken, bpfs/node/spares.py), so the next one
waits until the kernel has numbered the thread.

A directed fork has settled when its number is taken, or when its caller is seen out of
the fork without it: gone, stopped, asking again (a fork restarted by a signal; or
directing again, `direct` of the same thread), blocked in another call, or having used CPU_LIMIT of CPU since (a failed fork, then busy). A
caller that has not had the CPU yet is waited for, however busy the node: a wall-clock
limit (50 ms) once ended the wait on a loaded machine, and the child that came after it
took a parked PID and had no ghost. HARD_LIMIT only bounds a caller stuck in the kernel's
fork itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from bpfs.node import procread

log = logging.getLogger("bpslave")

CPU_LIMIT = 20              # clock ticks (0.2 s at 100 Hz) the caller runs on its own after
HARD_LIMIT = 10.0           # s
SPIN = 0.002                # s of sched_yield between looks, then sleeps of POLL
POLL = 0.0001
GONE = frozenset("TtZXx")    # stopped, traced, dead: not in a fork (a stop comes after it)


@dataclass(eq=False)
class Pending:
    """A directed fork not settled yet: its PID, and its caller's thread and call."""
    pid: int
    tid: int
    nr: int
    since: float = field(default_factory=time.monotonic)
    cpu: int | None = None          # the caller's CPU ticks when first seen runnable
    late: bool = False              # HARD_LIMIT logged


class Counter:
    """ns_last_pid, directed one fork at a time and parked between them (see above).
    `asking(tid)`: whether thread `tid` waits for a fork's answer (again)."""

    def __init__(self, park_at: int, asking: Callable[[int], bool]) -> None:
        self.park_at = park_at          # the master's pid_max: our own PIDs go above it
        self.parked = park_at
        self.pending: Pending | None = None
        self.lock = threading.RLock()   # any thread may number something
        self._asking = asking
        self.park()

    def park(self) -> None:
        """Point the counter above every cluster PID (and above what it has numbered)."""
        with self.lock:
            self._settle()
            self.parked = max(self.park_at, procread.read_last())
            procread.write_last(self.parked)

    def direct(self, pid: int, tid: int, nr: int, go: Callable[[], bool]) -> bool:
        """Let one fork run (`go`: its CONTINUE) with the counter just below `pid`; False
        if its caller is gone (`go` said so), the counter parked again."""
        with self.lock:
            p = self.pending
            if p is not None and p.tid == tid:  # its caller forks again: it is out of
                self.pending = None             # that fork (a fork taking a spare asks
                procread.write_last(self.parked)    # nobody: `asking` cannot say so)
            self._settle()
            procread.write_last(pid - 1)
            if not go():
                procread.write_last(self.parked)
                return False
            self.pending = Pending(pid, tid, nr)
            return True

    def settle(self) -> None:
        """Before anything else is numbered here: the directed fork has settled and the
        counter is parked."""
        with self.lock:
            self._settle()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a thread or process of the daemon's own being made."""
        with self.lock:
            self._settle()
            yield

    def hold(self) -> None:
        """`guard`'s first half, for os.fork's hooks (`release` after)."""
        self.lock.acquire()
        try:
            self._settle()
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        self.lock.release()

    def _settle(self) -> None:
        p = self.pending
        if p is None:
            return
        fast = time.perf_counter() + SPIN
        while self.state(p) is None:
            if time.perf_counter() < fast:
                os.sched_yield()
            else:
                time.sleep(POLL)        # lets the caller have this CPU
        self.pending = None
        procread.write_last(self.parked)

    def state(self, p: Pending) -> bool | None:
        """True: the number is taken; False: the caller is out of its fork without it;
        None: not known yet. Any thread may ask (it only reads)."""
        if procread.read_last() != p.pid - 1:
            return True
        if not self._out(p):
            return None
        return procread.read_last() != p.pid - 1        # taken just as it left

    def _out(self, p: Pending) -> bool:
        if time.monotonic() - p.since > HARD_LIMIT:
            if not p.late:
                p.late = True
                log.warning("fork of PID %d: its caller %d is still in it after %g s; "
                            "the counter is parked again", p.pid, p.tid, HARD_LIMIT)
            return True
        st = procread.run_state(p.tid)
        if st is None or st[0] in GONE or self._asking(p.tid):
            return True
        if st[0] == "R":            # waiting for a CPU, or running: its CPU says which
            if p.cpu is None:
                p.cpu = st[1]
                return False
            return st[1] - p.cpu > CPU_LIMIT
        nr = procread.syscall_nr(p.tid)
        return nr is not None and nr != p.nr

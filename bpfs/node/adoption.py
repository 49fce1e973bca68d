"""A child forked on this node, from its birth to its reaping: its pidfd, taken as soon as
it exists, and its end, told to the master once it has been reaped. Mixed into
bpfs.node.supervisor.Supervisor (docs/pidspace.md, "A fork" and "The end").

Why at once: a child that never execs (`(exit 3)`) may end and be reaped within a fraction
of a millisecond, and a child reaped before its pidfd was opened can no longer tell how it
ended (its ghost then goes without an end of its own: `unforked`). So the answer's path
takes it if it is there (`adopt_soon`), a child's execve takes it while the child waits
in that call (`adopt_here`, a receiver thread: every child that execs is taken so), and
the watcher thread looks for one not there yet every TAKE_POLL (`look_for`: as long as
its parent is still on its way through the fork, bpfs/node/pidcounter.py). The pidfd is
then watched by the supervisor's watcher thread (its epoll, for no event: it hangs up once
the child has been reaped, Linux 6.9), which hands each round of ends to trio's thread
(`_ended`).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any, Callable

from bpfs.migrate import seccomp
from bpfs.node.pidcounter import Counter, Pending
from bpfs.wire import messages

log = logging.getLogger("bpslave")

TAKE_POLL = 0.0002           # the watcher thread looks for children not there yet this
                             # often,
LATE_TRIES = 25              # ... and so many times more once their fork has settled


class Adoption:
    """The children's pidfds and ends for the Supervisor (see the module doc)."""

    children: dict[int, Any]        # by pid: bpfs.node.supervisor.Child
    names: Any                      # bpfs.node.execnames.ExecNames
    on_end: Callable[[int], None]
    counter: Counter
    _pidfds: dict[int, Any]         # the children's pidfds, in the watcher's epoll
    _unadopted: list[tuple[Any, Pending | None, int]]   # not there yet (`look_for`)
    _adopt_timer: Any               # wakes the watcher for them (bpfs/node/oneshot.py)
    _epoll: select.epoll
    _lock: threading.Lock
    settle: Callable[[], None]
    _start: Callable[..., None]
    give_back: Callable[[int], None]
    give_back_soon: Callable[[int], None]
    _post: Callable[..., None]

    def adopt_soon(self, child: Any, post: Callable[..., None] | None = None) -> None:
        """(Right after the fork's CONTINUE: trio's thread, or a receiver thread with
        `post`) its pidfd now if it exists already, else the watcher thread looks for
        it (`look_for`): no spinning here, and no task (a busy node's forking process
        may wait for a CPU a while)."""
        if self._adopt(child, post=post):
            return
        with self._lock:
            if not self._unadopted:
                self._adopt_timer.arm(TAKE_POLL)
            self._unadopted.append((child, self._directed_at(child.pid), 0))

    def look_for(self) -> None:
        """(The watcher thread, every TAKE_POLL while some are not adopted) each child
        whose parent is still on its way through the fork is looked for again once the
        fork has settled (its number taken, or its parent out of it without it: not a
        clock, bpfs/node/pidcounter.py), then for LATE_TRIES more looks (the counter
        moves when the kernel numbers the child, a moment before the child can be
        opened); if it is not there then (the fork failed, or the child has come and
        gone already), its ghost goes."""
        with self._lock:
            waiting, self._unadopted = self._unadopted, []
        later = []
        for child, p, tries in waiting:
            if self.children.get(child.pid) is child and child.pidfd < 0:
                if p is not None and self.counter.pending is p and \
                        self.counter.state(p) is None:
                    later.append((child, p, tries))
                    continue
                if not self._adopt(child, post=self._post):
                    if tries < LATE_TRIES:
                        later.append((child, p, tries + 1))
                        continue
                    self._post(self._not_forked, child)
            if self._directed_at(child.pid) is not None:   # (its execve took it)
                self.settle()
        if later:
            with self._lock:
                self._unadopted[:0] = later

    def adopt_here(self, child: Any) -> None:
        """(A receiver thread) the child is in its execve: it exists, take it if not yet,
        and the watcher need not look for it (its timer is unset when nobody else is
        looked for). The counter is parked by `settled_by` once the execve is let go."""
        if child.pidfd < 0 and self._adopt(child, settle=False) and child.pidfd >= 0:
            with self._lock:
                if self._unadopted:
                    self._unadopted = [e for e in self._unadopted if e[0] is not child]
                    if not self._unadopted:
                        self._adopt_timer.disarm()

    def settled_by(self, child: Any) -> None:
        """(A receiver thread, after the execve's CONTINUE) the fork that made `child` has
        settled: the counter is parked again now, not at the next number (a process that
        enters the node's namespace from outside is numbered by the kernel alone)."""
        if child.pidfd >= 0 and self._directed_at(child.pid) is not None:
            self.settle()

    def _adopt(self, child: Any, settle: bool = True,
               post: Callable[..., None] | None = None) -> bool:
        """Its pidfd, checked and watched (the counter parked first, with `settle`);
        False if it does not exist yet. A stranger with its number: its ghost goes."""
        with self._lock:
            if child.pidfd >= 0 or self.children.get(child.pid) is not child:
                fd = -1                             # taken already, or forgotten
            else:
                try:
                    fd = os.pidfd_open(child.pid)
                except OSError:
                    return False
                # None: reaped since the open; 1: its parent ended and we adopted it
                if seccomp.parent_of(fd) in (child.parent, None, 1):
                    child.pidfd = fd
                    self._pidfds[fd] = child
                    self._epoll.register(fd, 0)     # its reaping hangs it up
                    fd = -1
        if settle and self._directed_at(child.pid) is not None:
            self.settle()
        if fd >= 0:
            os.close(fd)
            if settle:
                log.warning("fork of %d: PID %d is not its child; it has no ghost",
                            child.parent, child.pid)
                if post is None:
                    self._not_forked(child)
                else:
                    post(self._not_forked, child)
            else:
                return False        # trio's to say
        return True

    def _directed_at(self, pid: int) -> Pending | None:
        p = self.counter.pending
        return p if p is not None and p.pid == pid else None

    def _not_forked(self, child: Any) -> None:
        self._forget(child)
        child.job.session.report(messages.Unforked(pid=child.pid, id=child.id))

    def _forget(self, child: Any, here: bool = True) -> None:
        """Forget the child (`here` False: from the watcher thread)."""
        if self.children.get(child.pid) is child:
            del self.children[child.pid]
            if here:
                self.give_back(child.pid)
            else:
                self.give_back_soon(child.pid)
        self.names.drop(child.pid)
        self.on_end(child.pid)

    def _ended(self, reaped: list[tuple[Any, int | None]]) -> None:
        """(The watcher thread) children reaped on the node: the master hears of each
        end from here (`exited` written at once if nothing of trio's is still to go
        before it, else from trio's thread): no trip through the event loop."""
        for child, status in reaped:
            os.close(child.pidfd)
            self._forget(child, here=False)
            if status is None:      # no exit information: a kernel without it (< 6.15)
                log.warning("pid %d: reaped, but its status is unknown", child.pid)
                status = 0
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            child.job.session.report_threadsafe(messages.Exited(
                pid=child.pid, code=code, signal=sig, id=child.id), self._post)

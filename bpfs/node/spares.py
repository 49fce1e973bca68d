"""Spares on the node: a PID the master gave ahead of a fork, taken with no round trip.

A process here that forks again and again gets spares from the master (`spare`: ghost
children of its ghost, made ahead; bpfs/master/spares.py), two of them: while the master
makes the next one after a `took`, the other is in hand. Its next fork takes the oldest
at once, in the receiver thread that got the call: `took` is written there before the
CONTINUE (so whatever the child does comes after it on the connection; if the connection
is busy, the whole take is done from trio's thread, in order: `_take`), then the fork is
directed as one the master answered (bpfs/node/pidcounter.py orders it with every other
number). A fork that finds none in hand while the next spare is on its way (less than
SPARE_WAIT after its parent took one: the master makes the next one when it reads the
`took`) waits for it, SPARE_WAIT at most, then asks the master; its `took` says it
waited (the master counts those). Mixed into bpfs.node.supervisor.Supervisor.

A spare belongs to the node until it is taken or given back (`unforked`): given back when
its parent execs (a new program), moves away or launches elsewhere, is forgotten here, or
leaves it unused for SPARE_IDLE; one that comes for a process not (or no longer) ours, or
that is moving, or beyond SPARES_HELD, or whose parent exec'd since it last forked (a
spare on its way at the execve), goes back at once. The master refuses a `took` of
anything else (`nottaken`): that child has no ghost, and is killed here.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from bpfs.migrate import seccomp
from bpfs.node import procread
from bpfs.wire import messages

log = logging.getLogger("bpslave")

SPARE_IDLE = 2.0             # s: a spare unused so long goes back (at the next sweep)
SPARE_WAIT = 0.02            # s: a fork waits so long for a spare on its way, then asks
SPARES_HELD = 2              # per parent (the master's SPARES_AHEAD); more go back


@dataclass(eq=False)
class NodeSpare:
    pid: int
    id: int
    session: Any                    # bpfs.node.session.Session it came on
    since: float = field(default_factory=time.monotonic)


class Spares:
    """The spares held, by parent pid, oldest first (see the module doc)."""

    children: dict[int, Any]
    jobs: dict[int, Any]
    counter: Any
    on_child: Callable[[Any], None]
    _post: Callable[..., None]
    _start: Callable[..., None]
    _forked: Callable[..., None]
    _ask: Callable[..., None]
    _not_forked: Callable[[Any], None]
    adopt_soon: Callable[..., None]
    _child_class: Any

    def __init__(self) -> None:
        # changed under the lock (a receiver thread takes, trio's thread gives back)
        self.spares: dict[int, list[NodeSpare]] = {}
        # after a `took`, the next spare is on its way: a fork meanwhile waits for it
        # (SPARE_WAIT at most) rather than asking the master for a child
        self._coming: dict[int, float] = {}             # parent -> when it took one
        self._for_spare: dict[int, tuple[Any, Any]] = {}  # parent -> (job, its fork)
        # parents that exec'd since they last forked: a spare made before the exec (on
        # its way meanwhile) goes back at once rather than waiting SPARE_IDLE for a fork
        # that a new program (`exec sleep 30`) may never make
        self._execd: set[int] = set()
        self._spare_lock = threading.Lock()
        self.spares_taken = 0
        self.spares_waited = 0          # of those, by forks that waited for theirs

    def on_spare(self, session: Any, msg: messages.Spare, moving: bool = False) -> None:
        """(trio's thread) The master's spare for `parent`'s next fork."""
        s = NodeSpare(msg.pid, msg.id, session)
        child, job = self.children.get(msg.parent), self.jobs.get(msg.parent)
        owner = child.job if child is not None else job
        if moving or owner is None or owner.session is not session:
            session.report(messages.Unforked(pid=s.pid, id=s.id))
            return
        with self._spare_lock:
            late = msg.parent in self._execd
            self._coming.pop(msg.parent, None)
            waiting = None if late else self._for_spare.pop(msg.parent, None)
            extra = s if late else None
            if waiting is None and not late:
                held = self.spares.setdefault(msg.parent, [])
                held.append(s)
                if len(held) > SPARES_HELD:
                    extra = held.pop(0)
        if extra is not None:
            extra.session.report(messages.Unforked(pid=extra.pid, id=extra.id))
        if waiting is not None:         # a fork waits for it: it takes it now
            self._take(waiting[0], waiting[1], msg.parent, s, waited=True)

    async def _spare_late(self, parent: int, n: Any) -> None:
        """A fork that waits for its parent's next spare asks the master after
        SPARE_WAIT (the spare did not come: the master could not make it)."""
        await trio.sleep(SPARE_WAIT)
        with self._spare_lock:
            waiting = self._for_spare.get(parent)
            if waiting is None or waiting[1] is not n:
                return
            del self._for_spare[parent]
        self._ask(waiting[0], n, parent)

    def forked_again(self, parent: int) -> None:
        """(Any thread) `parent` forks: spares for it are welcome again."""
        if parent in self._execd:
            with self._spare_lock:
                self._execd.discard(parent)

    def execd(self, parent: int, post: Callable[..., None] | None = None) -> None:
        """(Any thread; `post` from a receiver) `parent` runs a new program: its spares go
        back, and so does one still on its way, until it forks again."""
        with self._spare_lock:
            self._coming.pop(parent, None)
            held = self.spares.pop(parent, [])
            self._execd.add(parent)
        for s in held:
            if post is None:
                s.session.report(messages.Unforked(pid=s.pid, id=s.id))
            else:
                post(s.session.report, messages.Unforked(pid=s.pid, id=s.id))

    def give_back(self, parent: int) -> None:
        """(trio's thread) `parent`'s spares, if any, go back unused."""
        with self._spare_lock:
            self._execd.discard(parent)
            self._coming.pop(parent, None)
            held = self.spares.pop(parent, [])
        for s in held:
            s.session.report(messages.Unforked(pid=s.pid, id=s.id))

    def give_back_soon(self, parent: int) -> None:
        """(A receiver thread) as `give_back`: taken from the table now, told from trio."""
        with self._spare_lock:
            self._execd.discard(parent)
            held = self.spares.pop(parent, [])
        for s in held:
            self._post(s.session.report, messages.Unforked(pid=s.pid, id=s.id))

    def give_back_idle(self) -> None:
        """(trio's thread, the sweep) Spares unused for SPARE_IDLE go back."""
        now = time.monotonic()
        idle = []
        with self._spare_lock:
            for parent, held in list(self.spares.items()):
                idle += [s for s in held if now - s.since > SPARE_IDLE]
                held[:] = [s for s in held if now - s.since <= SPARE_IDLE]
                if not held:
                    del self.spares[parent]
        for s in idle:
            s.session.report(messages.Unforked(pid=s.pid, id=s.id))

    def not_taken(self, msg: messages.NotTaken) -> None:
        """The master refused our `took` of `pid`: it has no ghost; it ends."""
        child = self.children.get(msg.pid)
        if child is not None and child.id == msg.id:
            log.warning("the master refused spare %d: its process is killed", msg.pid)
            try:
                os.kill(msg.pid, signal.SIGKILL)
            except OSError:
                pass

    def take_spare(self, job: Any, n: seccomp.Notif, parent: int) -> bool:
        """(A receiver thread) `parent`'s fork takes its oldest spare, if it has one:
        False if not (the master is asked). `took` is written from here before the
        CONTINUE (if the connection is busy, the rest goes to trio's thread: `_take`),
        then the fork is directed from here: the counter's lock orders it with every other number
        (a job's thread clone is pending until numbered, a restore's keeper is made
        under the lock, the daemon's own threads and processes too)."""
        with self._spare_lock:
            held = self.spares.get(parent)
            s = held.pop(0) if held else None
            if held is not None and not held:
                del self.spares[parent]
            if s is None:
                coming = self._coming.pop(parent, None)
                if coming is None or time.monotonic() - coming > SPARE_WAIT or \
                        parent in self._for_spare:
                    return False
                self._for_spare[parent] = (job, n)    # its spare is on its way: wait
        if s is None:
            self._post(self._start, self._spare_late, parent, n)
            return True
        if s.session is not job.session:    # (a job of another connection): back
            self._post(s.session.report, messages.Unforked(pid=s.pid, id=s.id))
            return False
        took = messages.Took(parent=parent, pid=s.pid, id=s.id)
        if not job.session.write_threadsafe(took, self._post):
            self._post(self._take, job, n, parent, s)   # busy: all of it from trio's
            return True
        self._direct_spare(job, n, parent, s)
        return True

    def _direct_spare(self, job: Any, n: seccomp.Notif, parent: int, s: NodeSpare) -> None:
        """(A receiver thread) the fork gets the spare's PID, as `_forked` does."""
        self.spares_taken += 1
        self._coming[parent] = time.monotonic()     # the master makes the next one now
        child = self._child_class(s.pid, s.id, -1, job, parent)
        self.children[s.pid] = child
        self.on_child(child)
        try:
            if procread.exists(s.pid):
                log.warning("spare %d is taken on this node: fork refused", s.pid)
                seccomp.answer(job.listener, n.id, err=errno.EAGAIN)
                ok = False
            else:
                ok = self.counter.direct(s.pid, n.pid, n.nr, lambda: seccomp.answer(
                    job.listener, n.id, cont=True))
        except OSError as exc:      # the caller died meanwhile, most likely
            log.debug("pid %d: taking spare %d: %s", n.pid, s.pid, exc)
            ok = False
        if not ok:
            self._post(self._not_forked, child)
            return
        self.adopt_soon(child, post=self._post)

    def _take(self, job: Any, n: seccomp.Notif, parent: int, s: NodeSpare,
              waited: bool = False) -> None:
        """(trio's thread) `took` first (whatever the child does comes after it on the
        connection), then the fork goes on as one the master answered (`_forked`)."""
        try:
            if procread.exists(s.pid):
                log.warning("spare %d is taken on this node: given back", s.pid)
                s.session.report(messages.Unforked(pid=s.pid, id=s.id))
                self._ask(job, n, parent)
                return
            self.spares_taken += 1
            self.spares_waited += waited
            self._coming[parent] = time.monotonic()
            job.session.report(messages.Took(parent=parent, pid=s.pid, id=s.id,
                                             waited=waited or None))
            self._forked(job, n, parent, messages.Forked(seq=0, pid=s.pid, id=s.id))
        except OSError as exc:      # the caller died meanwhile, most likely
            log.debug("pid %d: taking spare %d: %s", n.pid, s.pid, exc)

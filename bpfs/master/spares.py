"""Spare ghosts: a PID given to a node ahead of a fork (docs/pidspace.md, "Spares").

A process on a node that forks again and again (a shell's loop) waits, at each fork, for
a round trip to the master and the clone of its ghost there. So once it asks for a fork
within SPARE_WINDOW of its previous one, the master also makes spares, SPARES_AHEAD of
them: ghost children of its ghost (the tracer's `fork_soon`, as for the child), which are
no cluster processes (not in /bproc/procs, nor in bpstat), and gives them to the node.
The node's next fork of that parent takes the oldest at once, with no round trip, and
says so; the master then records it as the child (a process on that node, as
`take_fresh` does), gives it the parent's new name if the parent exec'd since it was
made, and makes the next spare, off the fork's path. Two ahead, so that in a steady loop
the fork after is never left waiting while that next one is being made: it takes the
other, which has been at the node for a whole round already.

    master -> node  spare     parent, pid, id
    node -> master  took      parent, pid, id, [waited]   (refused: nottaken pid, id; the
                                                  node ends that child, which has no ghost)
    node -> master  unforked  pid, id            a spare given back unused

Ownership, so that nothing races: a spare given belongs to the node. The master kills it
only when the node gives it back (its parent exec'd, is moving away or launching
elsewhere, or left it unused a while), when the node's `exited` of its parent comes (after
any `took` of it on the same connection), when the node is lost, or when the master stops
(the tracer kills every ghost). A spare still being made when its parent leaves is killed
once made. A `took` of anything but a spare this node was given for that parent (and has
not taken yet) is refused and logged, and disturbs nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bpfs.errors import BpfsError
from bpfs.model import Cluster
from bpfs.wire import messages

log = logging.getLogger("bpfs.master.forks")

SPARE_WINDOW = 0.1          # s: a fork this soon after the parent's previous one: spares
SPARES_AHEAD = 2            # spares given or being made per forking parent


@dataclass(eq=False)
class Spare:
    """A ghost made ahead of a fork of `parent` on `node`; `pid` 0 while being made."""
    node: int
    parent: int
    id: int
    pid: int = 0
    gone: bool = False                  # dropped while being made: killed once made
    made: bool = False                  # its clone returned (`_spare_now` decides)
    answer: Any = None                  # (fork, who): a fork that asked meanwhile takes it
    argv: list[bytes] | None = None     # the parent's new command line, since it was made


@dataclass(eq=False)
class Forker:
    """A process on a node that forks: when it last did, its spares (given or being
    made, oldest first), its forks' counts."""
    node: int
    last: float
    spares: list[Spare] = field(default_factory=list)
    took: int = 0                       # forks that took a spare
    asked: int = 0                      # forks that asked the master
    waited: int = 0                     # of those that took one: waited for it at the node


class NodeSpares:
    """Mixed into bpfs.master.forks.NodeForks (which brings the rest of ProcService)."""

    cluster: Cluster
    tracer: Any
    _ids: Any
    _parents: dict[int, int]
    _from_tracer: Callable[..., None]
    _tell: Callable[..., None]
    _by_pid: dict[int, Any]     # the migrations under way (a move away from a node too)

    def __init__(self) -> None:
        super().__init__()
        self._forkers: dict[int, Forker] = {}   # by parent pid
        self._spares: dict[int, Spare] = {}     # made, by pid
        self.fork_counts = [0, 0, 0, 0]     # forks on nodes: [took spares, asked, of
                                            # which answered with a spare being made, of
                                            # the first waited at the node for it]
        # a spare made is given from the tracer thread (`_spare_now`) or trio's: its
        # `gone`, `pid` and its place in `_spares` change under this lock
        self._spare_lock = threading.Lock()

    def asked_fork(self, node: int, parent: int) -> None:
        """`parent` on `node` asked for a fork (its child is being made): spares too if
        it forked a moment ago, up to SPARES_AHEAD given or being made."""
        now = time.monotonic()
        f = self._forkers.get(parent)
        if f is None or f.node != node:
            self._forkers[parent] = Forker(node, now, asked=1)
            self.fork_counts[1] += 1
            return
        f.asked += 1
        self.fork_counts[1] += 1
        soon, f.last = now - f.last < SPARE_WINDOW, now
        if soon:
            self._make_spares(f, parent)

    def _make_spares(self, f: Forker, parent: int) -> None:
        """Up to SPARES_AHEAD (each its own STEP_SIGNAL stop of the parent ghost: two
        only when a burst starts, one per fork after)."""
        while len(f.spares) < SPARES_AHEAD and self.tracer is not None:
            spare = Spare(f.node, parent, next(self._ids))
            f.spares.append(spare)
            try:
                fork = getattr(self.tracer, "fork_soon", self.tracer.fork)
                fut = fork(parent, reaped=True)
            except BpfsError as exc:
                log.debug("pid %d: no spare: %s", parent, exc)
                f.spares.remove(spare)
                return
            fut.add_done_callback(lambda fu, spare=spare: self._spare_now(spare, fu))

    def _wanted(self, spare: Spare) -> bool:
        """(Under the lock) its parent still runs on its node, staying there."""
        p = self.cluster.procs.get(spare.parent)
        return not spare.gone and p is not None and p.node == spare.node and \
            p.state != "exited" and spare.parent not in self._by_pid

    def _spare_now(self, spare: Spare, fut: Any) -> None:
        """(The tracer thread, mostly) The spare made goes to the node from here, as
        `forked` does (one trip through trio's loop fewer before the node has it), if
        still wanted and the connection takes it; anything else: `_spare_made`."""
        send = getattr(self, "send_threadsafe", None)
        with self._spare_lock:
            spare.made = True
            answer = spare.answer
        if answer is not None:          # the child of a fork that asked: answered so
            self._forked_now(spare.node, answer[0], answer[1], fut)   # type: ignore
            if spare.argv is not None and fut.exception() is None:
                self._from_tracer(self._rename_spare, fut.result(), spare.argv)
            return
        if fut.exception() is None and send is not None:
            with self._spare_lock:
                if self._wanted(spare):
                    spare.pid = fut.result()
                    self._spares[spare.pid] = spare
                    sent = send(spare.node, messages.Spare(parent=spare.parent, pid=spare.pid,
                                                           id=spare.id))
                    if sent is not False:
                        if sent is None:
                            self._from_tracer(self.flush_soon, spare.node)  # type: ignore
                        return
                    del self._spares[spare.pid]
        self._from_tracer(self._spare_made, spare, fut)

    def _spare_made(self, spare: Spare, fut: Any) -> None:
        """(trio's thread) Given to the node if still wanted, else killed."""
        f = self._forkers.get(spare.parent)
        exc = fut.exception()
        if exc is not None:
            log.debug("pid %d: no spare: %s", spare.parent, exc)
            if f is not None and spare in f.spares:
                f.spares.remove(spare)
            return
        with self._spare_lock:
            spare.pid = fut.result()
            wanted = self._wanted(spare) and f is not None and spare in f.spares
            if wanted:
                self._spares[spare.pid] = spare
        if not wanted:
            self._kill_spare(spare.pid)
            if f is not None and spare in f.spares:
                f.spares.remove(spare)
            return
        self._tell(spare.node, messages.Spare(parent=spare.parent, pid=spare.pid, id=spare.id),
                   lambda: self._drop_spare(spare))

    def answer_with_spare(self, node: int, msg: messages.Fork, who: Any) -> bool:
        """A fork of a parent whose next spare is still being made (it came before the
        spare was back at the node): that spare is its child, answered as soon as clone
        returned (`_forked_now`), and the next spare is made: no clone more, no wait
        for one made from scratch."""
        f = self._forkers.get(msg.parent)
        if f is None or f.node != node:
            return False
        with self._spare_lock:
            spare = next((s for s in f.spares if not s.made and not s.gone), None)
            if spare is None:
                return False
            spare.answer = (msg, who)
        f.spares.remove(spare)
        self.fork_counts[2] += 1
        return True

    def on_took(self, node: int, msg: messages.Took) -> None:
        """The node's fork of `parent` took one of its spares: the child is recorded as
        if answered `forked`; the next spare is made. Anything else is refused."""
        f = self._forkers.get(msg.parent)
        spare = self._spares.get(msg.pid)
        if f is None or f.node != node or spare is None or spare not in f.spares or \
                (spare.pid, spare.id) != (msg.pid, msg.id):
            log.warning("node %d claims pid %d as a spare for pid %d, which it was not "
                        "given; refused", node, msg.pid, msg.parent)
            self._tell(node, messages.NotTaken(pid=msg.pid, id=msg.id))
            return
        f.spares.remove(spare)
        with self._spare_lock:
            del self._spares[msg.pid]
        p = self.cluster.procs.get(msg.parent)
        if p is None or p.node != node or p.state == "exited":
            log.info("node %d: a spare taken under pid %d, which does not run there; "
                     "refused", node, msg.parent)
            self._kill_spare(msg.pid)
            self._tell(node, messages.NotTaken(pid=msg.pid, id=msg.id))
            return
        c = self.cluster.start_proc(msg.pid, node, p.uid, p.gid, p.cmd, time.time())
        c.mid = msg.id
        self._parents[msg.pid] = msg.parent
        f.took += 1
        self.fork_counts[0] += 1
        if msg.waited:
            f.waited += 1
            self.fork_counts[3] += 1
        f.last = time.monotonic()
        if spare.argv is not None:
            self._rename_spare(msg.pid, spare.argv)
        self._make_spares(f, msg.parent)

    def spare_given_back(self, node: int, pid: int, mid: int) -> bool:
        """`unforked` of a spare this node holds (unused): it goes."""
        spare = self._spares.get(pid)
        if spare is None or spare.node != node or spare.id != mid:
            return False
        self._drop_spare(spare)
        return True

    def spares_renamed(self, pid: int, argv: list[bytes]) -> None:
        """`pid` exec'd: its spares, made before, take the new name once taken."""
        f = self._forkers.get(pid)
        for spare in f.spares if f is not None else ():
            spare.argv = argv

    def spares_end(self, node: int, pid: int) -> None:
        """The node said `pid` ended: its spares go, now or once made (its record too,
        here or, if it forked on another node before it moved, once those are done)."""
        f = self._forkers.get(pid)
        if f is None:
            return
        if f.node == node:
            for spare in list(f.spares):
                self._drop_spare(spare)
        if f.spares:
            return
        self._forkers.pop(pid, None)
        if f.took:
            log.info("node %d: pid %d forked %d times on spares, %d times asking (%d "
                     "waited for their spare); forks on nodes so far: %d on spares, %d "
                     "asking (%d of them answered with a spare being made), %d waited",
                     f.node, pid, f.took, f.asked, f.waited, *self.fork_counts)

    def spares_lost(self, node: int) -> None:
        for pid in [pid for pid, f in self._forkers.items() if f.node == node]:
            self.spares_end(node, pid)
        with self._spare_lock:
            spares = [s for s in self._spares.values() if s.node == node]
        for spare in spares:
            self._drop_spare(spare)

    def spares_leaving(self, pid: int) -> None:
        """`pid` starts to move away from its node, or to launch elsewhere: a spare being
        made for it is killed once made (one given is the node's to give back)."""
        f = self._forkers.get(pid)
        for spare in [s for s in f.spares if not s.pid] if f is not None else ():
            self._drop_spare(spare)

    def spare_gone(self, pid: int) -> None:
        """A ghost ended: a spare's (killed by someone: a `took` of it is refused), or a
        parent's (a spare being made for it is not wanted)."""
        with self._spare_lock:
            self._spares.pop(pid, None)
        self.spares_leaving(pid)

    def _drop_spare(self, spare: Spare) -> None:
        f = self._forkers.get(spare.parent)
        if f is not None and spare in f.spares:
            f.spares.remove(spare)
        with self._spare_lock:
            spare.gone = True
            given = spare.pid and self._spares.get(spare.pid) is spare
            if given:
                del self._spares[spare.pid]
        if given:
            self._kill_spare(spare.pid)
        p = self.cluster.procs.get(spare.parent)
        if f is not None and not f.spares and (p is None or p.state == "exited"):
            del self._forkers[spare.parent]

    def _kill_spare(self, pid: int) -> None:
        if self.tracer is None:
            return
        try:
            self.tracer.kill(pid)
        except BpfsError as exc:
            log.info("spare %d: kill: %s", pid, exc)

    def _rename_spare(self, pid: int, argv: list[bytes]) -> None:
        try:
            fut = self.tracer.rename(pid, argv)
        except BpfsError as exc:
            log.info("pid %d: renaming its ghost: %s", pid, exc)
            return
        fut.add_done_callback(lambda fu: fu.cancelled() or fu.exception())

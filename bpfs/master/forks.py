"""Processes forked on nodes, master side: their ghosts, names and ends; signals from nodes.

A node's supervisor (bpfs/node/supervisor.py) asks before each fork on the node: the master
makes a ghost child of the parent's ghost (the tracer's `fork`), records it as a process on
that node, and answers with its PID, which the node gives the real child. Then:

    node -> master  fork      seq, parent          -> forked seq, pid, id | errno
    node -> master  unforked  pid, id              the fork did not happen: the ghost goes
    node -> master  execed    pid, id, cmdline     the ghost takes the new command line
    node -> master  exited    pid, code, signal, id   (bpfs/master/procs.py) once reaped there
    node -> master  kill      seq, pid, sig, ruid, euid   -> killed seq [, errno]

A node may fork only under its own processes; everything else is refused (EAGAIN to the
forking process, the errno a fork gives when it cannot have a process). When a forked
process's ghost has ended, whatever ended it, its parent ghost reaps it (a zombie stays
only while the real one is one on the node).

Signals from a node are delivered here with the caller's real and effective uid on this
thread, so the kernel makes kill(2)'s own checks (EPERM, ESRCH, a process group where some
members may be signalled) and the caller gets that errno. A ghost's signal goes on to its
real process as any signal to a ghost does.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from typing import Any, Callable

import trio

from bpfs.errors import BpfsError
from bpfs.master.migrations import SendNode
from bpfs.master.spares import NodeSpares
from bpfs.model import Cluster
from bpfs.wire import messages

log = logging.getLogger("bpfs.master.forks")

FORK_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM})   # else: EAGAIN
MAX_WATCHED = 4096          # master processes nodes hold pidfds of (their proxies)
SYS_SETRESUID = 117
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class NodeForks(NodeSpares):
    """Mixed into bpfs.master.procs.ProcService: the fork, exec and kill messages (and,
    NodeSpares, the spares given to nodes ahead of forks)."""

    cluster: Cluster
    send_node: SendNode
    tracer: Any
    _ids: Any
    _spawn: Callable[..., None]
    _from_tracer: Callable[..., None]

    def __init__(self) -> None:
        super().__init__()
        # write a message now, whole, if the connection takes it (bpfs.master.links)
        self.send_now: Callable[[int, messages.Msg], bool] | None = None
        # the same from any thread: True whole, None in part (then `flush_soon(node)` in
        # trio's thread), False nothing (bpfs.master.links)
        self.send_threadsafe: Callable[[int, messages.Msg], bool | None] | None = None
        self.flush_soon: Callable[[int], None] = lambda node: None
        # forked pid -> (node, parent, uid, gid, cmd, id): answered from the tracer thread,
        # not yet recorded (`take_fresh`)
        self._fresh: dict[int, tuple[int, int, int, int, str, int]] = {}
        self._parents: dict[int, int] = {}    # forked pid -> its parent's pid (its ghost's)
        self._watched: set[tuple[int, int]] = set()    # (node, pid): a node's pidfd proxies

    # ---- fork ----

    def on_fork(self, node: int, msg: messages.Fork) -> None:
        """No task waits: the tracer thread answers as soon as the ghost is made
        (`_forked_now`), or trio's thread if it cannot (a fork on a node waits for this,
        so every trip through the event loop counts)."""
        p = self.cluster.procs.get(msg.parent)
        if p is None or p.node != node or p.state == "exited" or self.tracer is None:
            log.info("node %d: fork under pid %d, which does not run there; refused", node,
                     msg.parent)
            self._tell(node, messages.Forked(seq=msg.seq, errno=errno.EAGAIN))
            return
        who = (p.uid, p.gid, p.cmd)
        if self.answer_with_spare(node, msg, who):
            self.asked_fork(node, msg.parent)   # and the next spare
            return
        try:
            fork = getattr(self.tracer, "fork_soon", self.tracer.fork)
            fut = fork(msg.parent, reaped=True)    # fork_soon: no doorbell, no halt
        except BpfsError as exc:
            self._forked(node, msg, exc)
            return
        fut.add_done_callback(lambda f: self._forked_now(node, msg, who, f))
        self.asked_fork(node, msg.parent)       # and a spare, if it forks again and again

    def _forked_now(self, node: int, msg: messages.Fork, who: tuple[int, int, str],
                    fut: Any) -> None:
        """(The tracer thread, mostly) `forked` written from here, the child's records
        made in trio's thread after (`take_fresh`): kept in `_fresh` before the answer
        goes, so whatever the node says of the child next finds them (bpfs.master.links
        takes them before it dispatches a node's message). Anything else: `_forked`."""
        if fut.exception() is None and self.send_threadsafe is not None:
            child, mid = fut.result(), next(self._ids)
            self._fresh[child] = (node, msg.parent, *who, mid)
            sent = self.send_threadsafe(node, messages.Forked(seq=msg.seq, pid=child, id=mid))
            if sent is not False:
                self._from_tracer(self._recorded, node, sent is None)
                return
            self._fresh.pop(child, None)
        self._from_tracer(self._forked, node, msg, fut)

    def _recorded(self, node: int, flush: bool) -> None:
        self.take_fresh()
        if flush:
            self.flush_soon(node)

    def take_fresh(self) -> None:
        """The records of the children answered from the tracer thread (trio's thread;
        before any node message is dispatched: a forked child may write its own move, or
        end, at once)."""
        while self._fresh:
            child, (node, parent, uid, gid, cmd, mid) = self._fresh.popitem()
            c = self.cluster.start_proc(child, node, uid, gid, cmd, time.time())
            c.mid = mid
            self._parents[child] = parent

    def _forked(self, node: int, msg: messages.Fork, result: Any) -> None:
        exc = result if isinstance(result, BaseException) else result.exception()
        p = self.cluster.procs.get(msg.parent)
        if exc is not None or p is None:
            err = getattr(exc, "errno", None)
            log.info("node %d: no ghost for a fork of %d: %s", node, msg.parent, exc)
            if exc is None:     # the parent's record went meanwhile: the ghost goes too
                self._parents[result.result()] = msg.parent
                self._drop_forked(result.result(), known=False)
            self._tell(node, messages.Forked(
                seq=msg.seq, errno=err if err in FORK_ERRNOS else errno.EAGAIN))
            return
        child, mid = result.result(), next(self._ids)
        # the answer first, the records after (the node waits; nothing it sends of this
        # child can be read before this function returns)
        self._tell(node, messages.Forked(seq=msg.seq, pid=child, id=mid),
                   lambda: self._drop_forked(child))
        c = self.cluster.start_proc(child, node, p.uid, p.gid, p.cmd, time.time())
        c.mid = mid
        self._parents[child] = msg.parent

    def _tell(self, node: int, msg: messages.Msg,
              failed: Callable[[], None] | None = None) -> None:
        """Send `msg` now if the connection takes it whole, else from a task; `failed()`
        if it cannot go (the node is gone)."""
        if self.send_now is not None and self.send_now(node, msg):
            return
        self._spawn(self._send_or, node, msg, failed)

    async def _send_or(self, node: int, msg: messages.Msg,
                       failed: Callable[[], None] | None) -> None:
        try:
            await self.send_node(node, msg)
        except BpfsError as exc:
            log.info("node %d: %s not sent: %s", node, messages.tag(type(msg)), exc)
            if failed is not None:
                failed()

    def on_unforked(self, node: int, msg: messages.Unforked) -> None:
        if self.spare_given_back(node, msg.pid, msg.id):
            return
        p = self.cluster.procs.get(msg.pid)
        if p is None or p.node != node or p.mid != msg.id or msg.pid not in self._parents:
            log.info("node %d: unforked of unknown pid %d; ignored", node, msg.pid)
            return
        self._drop_forked(msg.pid)

    def _drop_forked(self, pid: int, known: bool = True) -> None:
        """A ghost for a fork that never was: no exit, no event; it dies and is reaped."""
        if known:
            self.cluster.remove_proc(pid)
        if self.tracer is not None:
            try:
                self.tracer.kill(pid)
            except BpfsError as exc:
                log.info("pid %d: kill: %s", pid, exc)

    def forked_gone(self, pid: int) -> None:
        """The ghost of a forked process ended (tracer thread's report, in trio). Its
        parent ghost has reaped it already, or is about to: the tracer does that itself
        (`fork(reaped=True)`: in the stop of the SIGCHLD its end sends the parent ghost,
        no halt and no trip out of the tracer thread and back); if the parent ended
        first, whoever the kernel re-parented it to."""
        self._parents.pop(pid, None)

    # ---- exec ----

    def on_execed(self, node: int, msg: messages.Execed) -> None:
        p = self.cluster.procs.get(msg.pid)
        if p is None or p.node != node or p.mid != msg.id or p.state == "exited":
            log.info("node %d: execed of unknown pid %d; ignored", node, msg.pid)
            return
        argv = msg.cmdline.rstrip(b"\0").split(b"\0") if msg.cmdline else []
        if not argv or not argv[0]:
            return
        self.spares_renamed(msg.pid, argv)
        p.cmd = " ".join(a.decode("utf-8", "replace") for a in argv)[:4096]
        if self.tracer is None:
            return
        try:
            fut = self.tracer.rename(msg.pid, argv)
        except BpfsError as exc:
            log.info("pid %d: renaming its ghost: %s", msg.pid, exc)
            return

        def done(f: Any) -> None:                       # in the tracer thread
            exc = None if f.cancelled() else f.exception()
            if exc is not None:
                log.info("pid %d: renaming its ghost: %s", msg.pid, exc)
        fut.add_done_callback(done)

    # ---- signals from nodes ----

    def on_kill(self, node: int, msg: messages.Kill) -> None:
        err = kill_as(msg.ruid, msg.euid, msg.pid, msg.sig)
        self._tell(node, messages.Killed(seq=msg.seq, errno=err or None))

    def on_watch(self, node: int, msg: messages.Watch) -> None:
        """A pidfd on a node of `pid` here: the node hears `ended` once it has ended."""
        err = kill_as(msg.ruid, msg.euid, msg.pid, 0)
        if err in (0, errno.EPERM) and (node, msg.pid) not in self._watched:
            try:
                fd = os.pidfd_open(msg.pid)
            except OSError as exc:
                err = exc.errno or errno.ESRCH
            else:
                if len(self._watched) < MAX_WATCHED:
                    self._watched.add((node, msg.pid))
                    self._spawn(self._watch_end, node, msg.pid, fd)
                else:
                    os.close(fd)
                    err = errno.EAGAIN
        self._tell(node, messages.Killed(seq=msg.seq, errno=err or None))

    async def _watch_end(self, node: int, pid: int, fd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            self._watched.discard((node, pid))
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        self._tell(node, messages.Ended(pid=pid, status=0))


def kill_as(ruid: int, euid: int, pid: int, sig: int) -> int:
    """kill(pid, sig) with this thread's real and effective uid set to the caller's (the
    saved uid stays root's, so they come back; a non-zero euid has no capabilities, so
    the kernel checks as for the caller): 0 or the errno. Synchronous, no await: no other
    work of this thread runs meanwhile. Never the whole machine (-1), never the master
    itself or init."""
    if pid in (-1, 0) or abs(pid) in (1, os.getpid()) or not 0 <= sig < 65:
        return errno.EPERM if pid not in (-1, 0) else errno.EINVAL
    switch = (ruid, euid) != (0, 0)
    if switch and _libc.syscall(ctypes.c_long(SYS_SETRESUID), ctypes.c_long(ruid),
                                ctypes.c_long(euid), ctypes.c_long(-1)) != 0:
        return ctypes.get_errno() or errno.EPERM
    try:
        if pid < 0:
            os.killpg(-pid, sig)
        else:
            os.kill(pid, sig)
        return 0
    except OSError as exc:
        return exc.errno or errno.EPERM
    finally:
        if switch and _libc.syscall(ctypes.c_long(SYS_SETRESUID), ctypes.c_long(0),
                                    ctypes.c_long(0), ctypes.c_long(-1)) != 0:
            raise SystemExit("cannot take root's uid back after a kill for a node")

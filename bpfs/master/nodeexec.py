"""Launches from a node: an execmove written on a node, and the exec it arms.

    a process C on node S writes `execmove ...` to MOUNT/nodes/T/ctl (its node's /bproc,
    bpfs/fs/forwarded.py):   ctl -> `arm_from_node`: checked as on the master (syntax, T's
                             ACL for the caller), C must be S's, with a ghost here; the
                             master keeps it armed and tells S (`armed`) before the write
                             returns `ok C`
    C calls execve on S:     S -> `exec` (path, argv, envp, cwd): the master runs that execve
                             in C's ghost (Tracer.exec_in: the master's files, the ghost's
                             credentials) and migrates it to T exactly as it migrates a bpsh
                             child (capture, restore), bpsh's links going back to S's address;
                             answer `execd` (the execve's errno if it failed: C stays armed,
                             as execvp tries the next directory of PATH)
    on S, C's execve returns 0: C is the program's stand-in (bpfs/standin.py); when the
    program ends (on T, or its ghost killed), S hears `ended` with its wait status.

So C keeps its cluster PID and its place in the tree: its ghost, a child of its parent's
ghost, is the migrated program's ghost, and `ps -ef --forest` on the master shows bpsh
on S above the program on T. What C may launch is what its user may on the master.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import trio

from bpfs.errors import BpfsError
from bpfs.master.migrations import Migration, Reply, wait_future
from bpfs.model import Caller, Cluster
from bpfs import procstatus
from bpfs.wire import execreq, messages

log = logging.getLogger("bpfs.master.procs")

MAX_ARMED = 4096            # execmoves from nodes waiting for their exec
MAX_EXEC_BYTES = 2 << 20


@dataclass
class _Armed:
    node: int               # where the caller runs (S)
    target: int
    req: execreq.ExecMove
    errors: Sequence[BpfsError | None]


class NodeExec:
    """Mixed into bpfs.master.procs.ProcService (with Migrations and NodeForks)."""

    cluster: Cluster
    tracer: Any
    _ids: Any
    _migrations: dict[int, Migration]
    _by_pid: dict[int, Migration]
    _spawn: Callable[..., None]
    _migrate: Callable[..., Any]
    _tell: Callable[..., None]

    def __init__(self) -> None:
        super().__init__()
        self._armed: dict[int, _Armed] = {}
        self._standins: dict[int, int] = {}      # pid -> the node of its stand-in
        self.host_of: Callable[[int], str | None] = lambda node: None

    async def arm_from_node(self, target: int, caller: Caller, req: execreq.ExecMove,
                            errors: Sequence[BpfsError | None] = ()) -> int:
        """An execmove that process `caller.pid` of node `caller.node` wrote (the ctl
        command checked the request and T's ACL): armed; `ok PID`."""
        node, pid = caller.node, caller.pid
        assert node is not None
        p = self.cluster.procs.get(pid)
        if (p is None or p.node != node or p.state == "exited" or self.tracer is None
                or pid not in self.tracer.ghosts()):
            raise BpfsError(errno.ESRCH, f"process {pid} of node {node} has no ghost on the "
                            "master to launch from")
        if pid in self._by_pid:
            raise BpfsError(errno.EBUSY, f"process {pid} is already being migrated")
        if len(self._armed) >= MAX_ARMED and pid not in self._armed:
            raise BpfsError(errno.EAGAIN, "too many launches from nodes at once")
        if req.nodes is None and target == node:
            self._armed.pop(pid, None)  # a move to the node it is on: bproc's no-op; its
            return pid                  # execve runs there (the node's files)
        if req.nodes is not None and not [k for k, n in enumerate(req.nodes)
                                          if n != node and not (errors and errors[k])]:
            raise BpfsError(errno.EINVAL, f"execmove --nodes from node {node}: at least one "
                            "rank must run elsewhere (the writer's PID goes there)")
        self._armed[pid] = _Armed(node, target, req, tuple(errors))
        await self.send_node(node, messages.Armed(pid=pid))   # before the write's answer
        return pid

    def on_exec(self, node: int, msg: messages.Exec) -> None:
        a = self._armed.get(msg.pid)
        if a is None or a.node != node:
            log.info("node %d: exec of %d, which no execmove armed; refused", node, msg.pid)
            self._tell(node, messages.Execd(seq=msg.seq, errno=errno.EPERM))
            return
        if sum(map(len, (msg.path, msg.cwd, *msg.argv, *msg.envp))) > MAX_EXEC_BYTES:
            self._tell(node, messages.Execd(seq=msg.seq, errno=errno.E2BIG))
            return
        self.spares_leaving(msg.pid)           # type: ignore[attr-defined]
        self._spawn(self._exec, node, msg, a)

    async def _exec(self, node: int, msg: messages.Exec, a: _Armed) -> None:
        pid = msg.pid
        try:
            await wait_future(self.tracer.exec_in(pid, msg.path, list(msg.argv),
                                                  list(msg.envp), msg.cwd))
        except BpfsError as exc:                # the execve failed there: so it does here
            self._tell(node, messages.Execd(seq=msg.seq, errno=exc.errno or errno.EIO))
            return
        if self._armed.get(pid) is a:
            del self._armed[pid]
        try:
            caller = _ghost_caller(pid)
        except BpfsError as exc:
            self._tell(node, messages.Execd(seq=msg.seq, errno=exc.errno))
            return
        send, receive = trio.open_memory_channel[Reply](64)
        req = a.req
        target = a.target
        m = Migration(next(self._ids), target, pid, caller, req, send, receive,
                      host=self.host_of(node))
        if req.nodes is not None:      # the writer's PID goes to a rank off its own node
            m.ranks = list(a.errors) or [None] * len(req.nodes)
            m.rank = next(k for k, err in enumerate(m.ranks)
                          if err is None and req.nodes[k] != node)
            m.node = req.nodes[m.rank]
        self._migrations[m.id] = m
        self._by_pid[pid] = m
        self._standins[pid] = node
        self._spawn(self._migrate, m)
        log.info("migration %d: pid %d of node %d to node %d, launched from there", m.id, pid,
                 node, m.node)
        self._tell(node, messages.Execd(seq=msg.seq))

    def launch_gone(self, pid: int, status: int) -> None:
        """The ghost `pid` ended (whatever ended it): a stand-in for it on the node that
        launched it ends the same way; an execmove armed for it is dropped."""
        self._armed.pop(pid, None)
        node = self._standins.pop(pid, None)
        if node is not None:
            self._tell(node, messages.Ended(pid=pid, status=status & 0xFFFF))


def _ghost_caller(pid: int) -> Caller:
    """Who the ghost is (its real uid and gid, its groups): the migrated program runs as
    that on its node, whatever the node claimed for the write that armed it."""
    try:
        st = procstatus.read(pid)
        uid, gid = int(st["Uid"].split()[0]), int(st["Gid"].split()[0])
        groups = frozenset(int(g) for g in st.get("Groups", "").split())
    except (OSError, KeyError, ValueError, IndexError):
        raise BpfsError(errno.ESRCH, f"process {pid} is gone") from None
    return Caller(uid, gid, groups, pid)

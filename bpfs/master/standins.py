"""Stand-ins of moved processes, master side: a process forked on a node that moved away.

A process Q forked on node A (a child of R there) that moves away stays on A as its
stand-in (bpfs/node/standins.py): R can wait for it and signal it there, and Q's PID
stays taken. The master's part:

    node A -> master  relayed   id, port, token    (a move of Q from A, before `dumped`)
    master -> node A  ended     pid, status        Q has ended: the stand-in ends so
    node A -> master  kill      seq, Q, sig, 0, 0  (bpfs/master/forks.py) a signal the
                                                   stand-in got: to Q's ghost, on to Q
    master -> node A  signal    Q, sig             Q stopped (a stop signal) or went on
                                                   (SIGCONT): the stand-in does the same

At `relayed` Q's stdio links become links to A's relay (its address as the master sees
it), first made wherever Q goes, and A is Q's stand-in node until Q ends or comes back:
moves of Q elsewhere (B -> C, B -> the master) leave it as it is; a move back to A goes
into the stand-in (A's `restore_in`), and at its `restored` A stands in no more
(`back_home`): Q is A's process again, whose end A reports itself.

Q's end reaches A once, with the real status, whichever way it ends:
- Q runs on a node: its ghost here ends the same way (`exited` from that node, or the
  ghost killed), and at the ghost's end (`_ghost_exit`) A hears `ended` with the
  ghost's wait status, which is Q's;
- Q runs on the master (it moved back into its ghost): a pidfd of it; at its end its
  status (still a zombie: /proc/Q/stat's exit_code) goes to A, and R's ghost reaps it
  (the tracer's `reap` with that status: it still counts Q among its children).
A's own `exited` for Q (R reaped the stand-in) then finds no process: ignored. A
stand-in killed on A (SIGKILL) has A kill Q through the master (`kill`), whose end then
comes the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import signal as _signal
from typing import Any, Callable

import trio

from bpfs.errors import BpfsError
from bpfs.model import Cluster, Proc, StdioLinks
from bpfs.wire import execreq, messages

log = logging.getLogger("bpfs.master.procs")

MAX_STANDINS = 1 << 16


class NodeStandins:
    """Mixed into bpfs.master.procs.ProcService."""

    cluster: Cluster
    tracer: Any
    _parents: dict[int, int]
    _migrations: dict[int, Any]
    _spawn: Callable[..., None]
    _tell: Callable[..., None]
    host_of: Callable[[int], str | None]

    def __init__(self) -> None:
        super().__init__()
        self._standins: dict[int, int] = {}             # pid -> the node it stands in on
        self._relayed: dict[int, messages.Relayed] = {}  # move id -> its relay

    # ---- a move from the node it was forked on ----

    def on_relayed(self, node: int, msg: messages.Relayed) -> None:
        m = self._migrations.get(msg.id)
        if m is None or m.node != node or not execreq.is_token(msg.token):
            log.warning("node %d: relayed for unknown move %d; ignored", node, msg.id)
            return
        self._relayed[msg.id] = msg

    def back_home(self, pid: int, node: int) -> bool:
        """`pid` moves (moved) back into its stand-in on `node`: it stands in no more."""
        if self._standins.get(pid) != node:
            return False
        del self._standins[pid]
        return True

    def check_children(self, pid: int) -> None:
        """EBUSY for a process on a node with children forked there (their ghosts are its
        ghost's children here). The node checks too, but a process that moves itself has
        its write answered before the node's refusal comes: this one it gets."""
        if any(parent == pid for parent in self._parents.values()):
            raise BpfsError(errno.EBUSY, f"process {pid} has children: it cannot move "
                            "while they live")

    def take_relay(self, mid: int, p: Proc, source: int) -> bool:
        """Move `mid` of `p` from `source` relays its stdio there: its links go to that
        relay from now on (first made where it goes), and `source` stands in for it from
        now on: an end that comes before the move is over reaches it too (the node keeps
        it until its copy is parked). False: not a stand-in's move."""
        msg = self._relayed.pop(mid, None)
        if msg is None:
            return False
        p.links = StdioLinks(msg.port, msg.token, ("socket", "socket", "socket"),
                             host=self.host_of(source))
        p.stdin_base = 0
        if len(self._standins) < MAX_STANDINS:
            self._standins[p.pid] = source
        return True

    def no_standin(self, pid: int) -> None:
        """The move failed: it goes on where it was forked, no stand-in."""
        self._standins.pop(pid, None)

    def forget_relay(self, mid: int) -> None:
        self._relayed.pop(mid, None)

    # ---- its end ----

    def standin_over(self, pid: int, status: int) -> None:
        """`pid` has ended with wait `status`: its stand-in ends so (once)."""
        node = self._standins.pop(pid, None)
        if node is None:
            return
        status &= 0xFF7F                                # no core-dump bit
        self._tell(node, messages.Ended(pid=pid, status=status))

    def watch_home(self, pid: int) -> None:
        """`pid`, which has a stand-in, runs on the master now: its end goes to it."""
        if pid not in self._standins:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self.standin_over(pid, _signal.SIGKILL)
            return
        self._spawn(self._home_end, pid, fd)

    async def _home_end(self, pid: int, fd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        if pid in self.cluster.procs:       # it moved out again: a ghost, whose end counts
            return
        status = _zombie_status(pid)
        self.standin_over(pid, status)
        self._reap_home(pid, status)

    def _reap_home(self, pid: int, status: int) -> None:
        """Its parent's ghost reaps its zombie here, as it reaps a child ghost."""
        parent = self._parents.pop(pid, None)
        if parent is None or self.tracer is None:
            return
        try:
            fut = self.tracer.reap(parent, pid, status)
        except BpfsError as exc:
            log.info("pid %d: reap by %d: %s", pid, parent, exc)
            return
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or log.info(
            "pid %d: reap by its parent %d: %s", pid, parent, f.exception()))

    def standin_job(self, pid: int, stop: bool, sig: int) -> None:
        """`pid` stopped (by `sig`) or went on where it runs: its stand-in too, so its
        parent's waitpid(WUNTRACED) sees it stopped (a `signal` for a stand-in is its
        process's job state: any other signal goes where the process runs)."""
        node = self._standins.get(pid)
        if node is not None:
            self._tell(node, messages.Signal(pid=pid, sig=sig if stop else _signal.SIGCONT))

    def standins_lost(self, node: int) -> None:
        """`node` is gone, and its stand-ins with it."""
        for pid in [pid for pid, n in self._standins.items() if n == node]:
            del self._standins[pid]


def _zombie_status(pid: int) -> int:
    """The wait status of the ended (zombie) `pid`: /proc/PID/stat's exit_code (field
    52, proc(5)); SIGKILL if it is gone already (reaped: its status is lost)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[49])
    except (OSError, ValueError, IndexError):
        return _signal.SIGKILL

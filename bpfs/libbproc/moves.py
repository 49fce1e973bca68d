"""Moving running processes, BProc 4's way: move, rfork, vrfork, over `move N` on
MOUNT/procs/P/ctl (the master's surface for issue 15; docs/libbproc.md).

    move(node)                        move the caller itself; None, or OSError
    rfork(node) -> pid / 0            fork, the child on `node`: its PID here, 0 in it
    vrfork(nodes) -> (n, pids)        a child per node; the parent gets (len(nodes),
                  / (k, [])           [pid or -errno per node]), child k gets (k, [])

move is one write of `move N` (`move master` for NODE_MASTER) to the caller's own ctl: the
master stops the caller at that write's return and moves it, so in the moved copy the
write has returned (success, on the target), and on failure it fails where the caller
still runs. A move to where the caller is is none (BProc answered BE_SAMENODE and its
library returned 0).

rfork and vrfork are seen from the parent's side, so that a failed move is an errno the
parent gets: the parent forks, the child waits until it runs on its node (it asks
currnode() with short sleeps: a wait that holds no pipe or socket, which could not move,
and that a move may stop at any instant), the parent writes `move N` for the child's PID.
A refused move: the parent kills and reaps that child (nothing is left) and reports the
errno. A child whose parent ended before its move ends too. A node equal to the caller's
own (or NODE_SELF) is a plain fork, as BProc's BE_SAMENODE was.

The child keeps what fork gives it; every fd it holds must be able to move: its stdio
(the master makes them links) and regular files can, a pipe or a socket cannot, and the
move fails EBUSY naming the fd. A program that rforks closes those in the parent first,
or keeps them out of fds the child inherits (O_CLOEXEC does not help: there is no exec).

Errors (OSError with BProc's errno and message; bpfs.libbproc.codes): BE_INVALIDNODE no
such node, BE_NODEDOWN a node that is not up, EPERM the caller may not run on the node
(its ACL) or may not move the process, EBUSY a state that cannot move (threads, a pipe or
socket fd: the master's reason is the OSError's filename), ENOSYS where no master serves
`move`. vrfork reports a node's refusal as -errno in its slot (the child for it is gone)
and raises only for a local failure (fork's), after ending the children it made.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Sequence

from bpfs.libbproc.codes import BE_INVALIDNODE, NODE_MASTER, NODE_SELF, error, from_bpfs, strerror
from bpfs.libbproc.nodes import currnode, mount_point

# What the master serves of issue 15: `move N` on procs/P/ctl. False makes every move to
# another node ENOSYS without asking (a master without it answers EINVAL).
MOVE_SERVED = True
WAIT_FIRST, WAIT_MOST = 0.0005, 0.01    # seconds: a child's first and longest nap
REASON_MAX = 4096


def move(node: int) -> None:
    """Move the calling process to `node` (see the top); returns on the target."""
    here = currnode()
    node = here if node == NODE_SELF else node
    if node == here:
        return
    _check_target(node)
    move_process(os.getpid(), node)


def rfork(node: int) -> int:
    """fork, the child moved to `node`: its PID in the parent, 0 in the child."""
    index, pids = vrfork([node])
    if not pids:
        return 0
    if pids[0] < 0:
        raise error(-pids[0])
    return pids[0]


def vrfork(nodes: Sequence[int]) -> tuple[int, list[int]]:
    """A child on each node of `nodes` (order and duplicates kept); see the top."""
    if not nodes:
        raise error(errno.EINVAL)
    here = currnode()
    targets = [here if n == NODE_SELF else n for n in nodes]
    if any(n != here for n in targets):
        _require_move()
    parent = os.getpid()
    pids: list[int] = []
    for index, node in enumerate(targets):
        if node != here and node < NODE_MASTER:
            pids.append(-BE_INVALIDNODE)
            continue
        try:
            pid = os.fork()
        except OSError as e:
            _end_all(pids)
            raise error(e.errno or errno.EAGAIN) from None
        if pid == 0:
            if node != here:
                _wait_until_on(node, parent)
            return index, []
        pids.append(pid if node == here else _move_child(pid, node))
    return len(targets), pids


def move_process(pid: int, node: int) -> None:
    """One write of `move N` to procs/PID/ctl; OSError with BProc's errno, the master's
    reason as its filename (ESRCH: no such process; ENOSYS: no cluster mounted). For the
    caller's own PID this returns on the target."""
    line = b"move master\n" if node == NODE_MASTER else b"move %d\n" % node
    try:
        fd = os.open(os.path.join(mount_point(), "procs", str(pid), "ctl"),
                     os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        cluster = os.path.isdir(os.path.join(mount_point(), "procs"))
        raise error(errno.ESRCH if cluster else errno.ENOSYS) from None
    except OSError as e:
        raise error(e.errno or errno.EIO) from None
    try:
        os.write(fd, line)
    except OSError as e:
        raise _refusal(fd, e.errno or errno.EIO) from None
    finally:
        _close_quietly(fd)


# ---- the parent's and the child's sides of a vrfork -------------------------------

def _move_child(pid: int, node: int) -> int:
    """The child's PID once it runs on `node`; else it is ended and reaped: -errno."""
    try:
        move_process(pid, node)
        return pid
    except OSError as e:
        _end(pid)
        return -(e.errno or errno.EIO)


def _wait_until_on(node: int, parent: int) -> None:
    """The child's wait for its move: returns on `node`; ends if the parent is gone first.

    Where the parent is is asked before where we are: a move between the two questions
    leaves us on the node (the answer that counts), so a node's own idea of our parent
    never ends us."""
    nap = WAIT_FIRST
    while True:
        orphaned = os.getppid() != parent
        if currnode() == node:
            return
        if orphaned:
            os._exit(1)
        try:
            time.sleep(nap)
        except OSError:         # a sleep cut short by the move: ask again
            pass
        nap = min(nap * 2, WAIT_MOST)


def _end(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:   # SIGCHLD ignored: the kernel reaped it
        pass


def _end_all(pids: list[int]) -> None:
    for pid in pids:
        if pid > 0:
            _end(pid)


# ---- checks and errors ---------------------------------------------------------------

def _check_target(node: int) -> None:
    _require_move()
    if node < NODE_MASTER:
        raise error(BE_INVALIDNODE)


def _require_move() -> None:
    if not MOVE_SERVED:
        raise error(errno.ENOSYS)


def _refusal(fd: int, err: int) -> OSError:
    """BProc's errno for /bproc's, with the handle's text (the master's reason). A move of
    the writer itself is answered `ok` before it is done: a failure after that has no
    text of its own."""
    err = from_bpfs(err)
    try:
        reason = os.pread(fd, REASON_MAX, 0).decode("utf-8", "replace").strip()
    except OSError:
        reason = ""
    if reason == "ok" or reason.startswith("ok "):
        reason = ""
    return OSError(err, strerror(err), reason) if reason else error(err)


def _close_quietly(fd: int) -> None:
    """The moved copy's handle of the ctl file may not have come along: no error then."""
    try:
        os.close(fd)
    except OSError:
        pass

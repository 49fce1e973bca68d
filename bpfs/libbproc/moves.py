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
parent gets: the parent forks, the child waits, the parent writes `move N` for the
child's PID and, once that write has returned (the child runs on its node), wakes it with
WAKE_SIGNAL (SIGURG, ignored by default), which the child has blocked from its fork on and
takes with sigtimedwait. That wait holds no pipe or socket (which could not move) and
makes no request to /bproc (a process stopped for its move while a request of it is in
flight in a bpfs daemon is a hazard for that daemon). Every WAKE_CHECK the child looks at
its parent: one that is not its parent any more (its parent ended, or a node answers for
a parent elsewhere) makes it ask where it is: on its node it goes on (a wake-up that comes
later is ignored, as SIGURG is by default), elsewhere it ends. A refused move: the parent
kills and reaps that child (nothing is left) and reports the errno. A node equal to the
caller's own (or NODE_SELF) is a plain fork, as BProc's BE_SAMENODE was. A program with a
SIGURG handler of its own may see one call of it in an rforked child.

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
from typing import Sequence

from bpfs.libbproc.codes import BE_INVALIDNODE, NODE_MASTER, NODE_SELF, error, from_bpfs, strerror
from bpfs.libbproc.nodes import currnode, mount_point

# What the master serves of issue 15: `move N` on procs/P/ctl. False makes every move to
# another node ENOSYS without asking (a master without it answers EINVAL).
MOVE_SERVED = True
WAKE_SIGNAL = signal.SIGURG             # the parent's "you run on your node now"
WAKE_CHECK = 0.05                        # seconds: how often a waiting child looks at its parent
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
        pid, mask = _fork_waiting(pids)
        if pid == 0:
            if node != here:
                _wait_until_woken(node, parent)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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

def _fork_waiting(made: list[int]) -> tuple[int, set[signal.Signals]]:
    """fork with WAKE_SIGNAL blocked in the child (a wake-up sent before it waits is kept
    pending); the pid (0 in the child) and the mask to go back to. A failed fork ends
    the children `made` so far and raises."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [WAKE_SIGNAL])
    try:
        pid = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _end_all(made)
        raise error(e.errno or errno.EAGAIN) from None
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid, mask


def _move_child(pid: int, node: int) -> int:
    """The child's PID once it runs on `node` (and is woken); else it is ended and
    reaped: -errno."""
    try:
        move_process(pid, node)
    except OSError as e:
        _end(pid)
        return -(e.errno or errno.EIO)
    try:
        os.kill(pid, WAKE_SIGNAL)
    except ProcessLookupError:      # it ended already: its parent gets its status
        pass
    return pid


def _wait_until_woken(node: int, parent: int) -> None:
    """The child's wait: returns once the parent wakes it (it runs on `node` then), or
    once it finds itself on `node` when getppid says another parent; ends if it is
    elsewhere then (its parent is gone). /bproc is asked only then."""
    while signal.sigtimedwait([WAKE_SIGNAL], WAKE_CHECK) is None:
        if os.getppid() != parent:
            if currnode() == node:
                return
            os._exit(1)


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

"""Starting programs on nodes, BProc 4's way: execmove and vexecmove, over nodes/N/ctl,
as bpsh does (move, rfork and vrfork, which move a running process, are in
bpfs.libbproc.moves).

    execmove(node, path, argv, envp=None)       execve `path`, migrated to `node`; no return
    vexecmove(nodes, path, argv, envp=None)     -> [pid or -errno per node]; the caller goes on

execmove writes one `execmove` request (bpfs.wire.execreq) to nodes/N/ctl with
`bpfs.child.write_request`, as bpsh's children do, then calls execve itself: the master
catches that execve, sends the program to the node and keeps the caller as its ghost (same
PID, same parent, the remote exit status). vexecmove forks: one child per node as bpsh's
per-node children, or, for two or more nodes and no master among them, one writer of
`execmove --nodes` whose ghost the master clones for every other rank, as `bpsh 0-31`
does; every process is the caller's child, BPROC_RANK (7 digits) is its index in `nodes`.
A node that is the master (-1, or the caller's own node) gets a plain fork and execve
here (BProc: a move to the same node is no move).

I/O, as BProc's default forwarding: stdin is the node's /dev/null, stdout and stderr go
together to the caller's stdout through the forwarder (bpfs.libbproc.iod), unless the
caller's stdout is /dev/null or closed (then the node's /dev/null, and no forwarder but
for a multi-node request, whose ranks link comes to it).

Errors (OSError; bpfs.libbproc.codes): BE_INVALIDNODE no such node, BE_NODEDOWN a node
that is not up, EACCES no x permission on the node; execve's own errors (ENOENT, EACCES,
ENOEXEC...) are checked before the request is written; EPERM for a set-user-ID program and
the master's other refusals come with the master's reason as the OSError's filename.
vexecmove reports a node's refusal as -errno in its slot
and raises only when the request is refused as a whole.

If execve itself fails after the request was accepted (the file changed in between), the
request stays armed: the caller's next execve is migrated.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
from typing import NoReturn, Sequence

from bpfs.child import ALL_RANKS, Report, fork_reset, reason_of, write_request
from bpfs.libbproc.codes import (BE_INVALIDNODE, NODE_MASTER, NODE_SELF, error, from_bpfs,
                                 strerror)
from bpfs.libbproc.nodes import currnode, mount_point
from bpfs.wire.execreq import ExecMove

RANKS_WAIT = 2.0          # seconds to wait for the ranks once the writer has ended


def execmove(node: int, path: str, argv: Sequence[str],
             envp: dict[str, str] | None = None) -> NoReturn:
    """execve(path, argv, envp) migrated to `node`; returns only by raising OSError."""
    env = dict(os.environ if envp is None else envp)
    here = currnode()
    node = here if node == NODE_SELF else node
    if node == here:
        os.execve(path, list(argv), env)
    _check_origin(here, node)
    _check_exec(path)
    out = _stdout_spec()
    token = os.urandom(16).hex()
    iod = Iod.start(token, vector=False) if out == "socket" else None
    line = ExecMove(iod.port if iod else 1, token, 0, "null", out, "stdout").render()
    try:
        write_request(mount_point(), node, line.encode())
    except OSError as e:
        if iod:
            iod.quit()
        raise _refusal(e) from None
    if iod:
        iod.tell(os.getpid())
    try:
        os.execve(path, list(argv), env)
    except OSError as e:
        if e.errno == errno.EINPROGRESS:    # on a node: it runs there now, under our PID;
            from bpfs.standin import stand_in   # we stand in for it here (bpfs/standin.py)
            stand_in(os.getpid(), mount_point())
        if iod:
            iod.quit()
        raise error(e.errno or errno.EIO, path) from None
    raise AssertionError("execve returned")


def vexecmove(nodes: Sequence[int], path: str, argv: Sequence[str],
              envp: dict[str, str] | None = None) -> list[int]:
    """Start `path` on every node of `nodes` (order and duplicates kept); the PID of each
    process (the caller's children), or -errno for a node where it could not start."""
    if not nodes:
        raise error(errno.EINVAL)
    here = currnode()
    nodes = [here if n == NODE_SELF else n for n in nodes]
    for n in nodes:
        if n != here:
            _check_origin(here, n)
    _check_exec(path)
    env = dict(os.environ if envp is None else envp)
    out = _stdout_spec()
    token = os.urandom(16).hex()
    remote = [n for n in nodes if n != here]
    # one capture for all ranks from the master; from a node each rank needs a stand-in
    vector = len(nodes) > 1 and len(remote) == len(nodes) and here == NODE_MASTER
    # a multi-node request always has a forwarder: the master's ranks link comes to it
    iod = Iod.start(token, vector) if (out == "socket" and remote) or vector else None
    try:
        if vector:
            return _vector(nodes, path, argv, env, out, token, iod)
        return _per_rank(nodes, here, path, argv, env, out, token, iod)
    finally:
        if iod:
            iod.close()


# ---- the two ways of vexecmove ---------------------------------------------------

def _per_rank(nodes: list[int], here: int, path: str, argv: Sequence[str],
              env: dict[str, str], out: str, token: str, iod: "Iod | None") -> list[int]:
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pids = []
    try:
        for rank, node in enumerate(nodes):
            rank_env = dict(env, BPROC_RANK=f"{rank:07d}")
            line = None if node == here else ExecMove(
                iod.port if iod else 1, token, rank, "null", out, "stdout").render().encode()
            pids.append(_spawn(node, line, path, argv, rank_env, status_w, rank))
    finally:
        os.close(status_w)
    for report in _read_reports(status_r):
        os.waitpid(pids[report.rank], 0)
        pids[report.rank] = -from_bpfs(report.errno)
    for rank, pid in enumerate(pids):
        if pid > 0 and iod and nodes[rank] != here:
            iod.tell(pid)
    return pids


def _vector(nodes: list[int], path: str, argv: Sequence[str], env: dict[str, str],
            out: str, token: str, iod: "Iod | None") -> list[int]:
    line = ExecMove(iod.port if iod else 1, token, 0, "null", out, "stdout",
                    nodes=tuple(nodes)).render().encode()
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        writer = _spawn(nodes, line, path, argv, dict(env, BPROC_RANK="X" * 7), status_w,
                        ALL_RANKS)
    finally:
        os.close(status_w)
    reports = _read_reports(status_r)
    if reports:
        os.waitpid(writer, 0)
        raise _refusal(reports[0])
    assert iod is not None
    iod.tell(writer)
    ranks = iod.ranks(writer)
    if ranks is None or len(ranks) != len(nodes):
        raise error(errno.EIO, "the master sent no ranks")
    return [pid if pid > 0 else -from_bpfs(-pid) for pid in ranks]


def _spawn(node: int | list[int], line: bytes | None, path: str, argv: Sequence[str],
           env: dict[str, str], status_w: int, rank: int) -> int:
    """Fork a child that writes `line` to the ctl of `node` (the first listed one whose
    ctl exists, for a list) and execs `path`; with no line, it only execs (here)."""
    def child() -> None:
        if line is not None:
            try:
                _write_first(node, line)
            except OSError as e:
                _report(status_w, rank, 1, e.errno or errno.EIO, reason_of(e))
                os._exit(1)
        try:
            os.execve(path, list(argv), env)
        except OSError as e:
            if e.errno == errno.EINPROGRESS:    # on a node: it runs elsewhere under our PID
                from bpfs.standin import stand_in
                os.close(status_w)              # the caller's wait for reports ends
                stand_in(os.getpid(), mount_point())
            _report(status_w, rank, 2, e.errno or errno.EIO)
        os._exit(127)
    return fork_reset(child, status_w, rank=rank, keep_ignored=True)


def _write_first(node: int | list[int], line: bytes) -> None:
    err: OSError = error(errno.ENODEV)
    for n in dict.fromkeys([node] if isinstance(node, int) else node):
        try:
            write_request(mount_point(), n, line)
            return
        except OSError as e:
            err = e
            if e.errno != errno.ENODEV:
                break
    raise err


def _report(status_w: int, rank: int, stage: int, err: int, reason: str = "") -> None:
    try:
        os.write(status_w, Report(rank, stage, err, reason).pack())
    except OSError:
        pass


def _read_reports(fd: int) -> list[Report]:
    """Every report on the status pipe until EOF (every child exec'd or ended)."""
    buf = bytearray()
    try:
        while chunk := os.read(fd, 4096):
            buf += chunk
    finally:
        os.close(fd)
    reports = []
    while (report := Report.take(buf)) is not None:
        reports.append(report)
    return reports


# ---- checks --------------------------------------------------------------------------

def _check_origin(here: int, node: int) -> None:
    """From a node the request goes to the master through the node's /bproc, as bpsh's."""
    if node < NODE_MASTER:
        raise error(BE_INVALIDNODE)


def _check_exec(path: str) -> None:
    """execve's usual refusals, before a request is armed."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(e.errno or errno.ENOENT, path) from None
    if not (st.st_mode & 0o170000 == 0o100000 and os.access(path, os.X_OK)):
        raise error(errno.EACCES, path)


def _stdout_spec() -> str:
    """"null" when our stdout is /dev/null or closed (nothing to forward), else "socket"."""
    try:
        st = os.fstat(1)
    except OSError:
        return "null"
    return "null" if st.st_rdev == os.makedev(1, 3) and st.st_mode & 0o170000 == 0o020000 \
        else "socket"


def _refusal(e: OSError | Report) -> OSError:
    err = from_bpfs(e.errno or errno.EIO)
    reason = e.reason if isinstance(e, Report) else reason_of(e)
    return OSError(err, strerror(err), reason) if reason else error(err)


# ---- the forwarder -------------------------------------------------------------------

class Iod:
    """The caller's side of bpfs.libbproc.iod: its port, and what we tell it."""

    def __init__(self, port: int, control: int, result: int) -> None:
        self.port, self.control, self.result = port, control, result

    @classmethod
    def start(cls, token: str, vector: bool) -> "Iod":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("0.0.0.0", 0))
            listener.listen(1024)
            ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
            res_r, res_w = os.pipe2(os.O_CLOEXEC) if vector else (-1, -1)
            _spawn_iod(listener.fileno(), ctl_r, res_w, token)
            for fd in (ctl_r, res_w):
                if fd >= 0:
                    os.close(fd)
            return cls(listener.getsockname()[1], ctl_w, res_r)
        finally:
            listener.close()

    def tell(self, pid: int) -> None:
        os.write(self.control, f"pid {pid}\n".encode())

    def quit(self) -> None:
        try:
            os.write(self.control, b"quit\n")
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        for fd in (self.control, self.result):
            if fd >= 0:
                os.close(fd)
        self.control = self.result = -1

    def ranks(self, writer: int) -> list[int] | None:
        """The ranks line the forwarder passes on; None if it does not come while the
        writer lives, nor RANKS_WAIT seconds after it ended."""
        pidfd = os.pidfd_open(writer)
        try:
            poll = select.poll()
            poll.register(self.result, select.POLLIN)
            poll.register(pidfd, select.POLLIN)
            buf, deadline = b"", None
            while b"\n" not in buf:
                ready = [fd for fd, _ in poll.poll(None if deadline is None else
                                                   RANKS_WAIT * 1000)]
                if self.result in ready:
                    chunk = os.read(self.result, 65536)
                    if not chunk:
                        return None
                    buf += chunk
                elif pidfd in ready and deadline is None:
                    poll.unregister(pidfd)
                    deadline = RANKS_WAIT
                elif not ready:
                    return None
        finally:
            os.close(pidfd)
        words = buf.decode("ascii", "replace").split()
        try:
            return [int(w) for w in words[1:]] if words[:1] == ["ranks"] else None
        except ValueError:
            return None


def _spawn_iod(listen_fd: int, ctl_r: int, res_w: int, token: str) -> None:
    """Start the forwarder in a session of its own, as init's child (forked twice)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{package_root}:{path}" if path else package_root)
    argv = [sys.executable, "-m", "bpfs.libbproc.iod", str(listen_fd), str(ctl_r), str(res_w),
            token]
    keep = {0, 1, 2, listen_fd, ctl_r, res_w} - {-1}
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                for fd in keep:
                    os.set_inheritable(fd, True)
                fds = sorted(keep)
                for lo, hi in zip(fds, [*fds[1:], 1 << 20]):
                    os.closerange(lo + 1, hi)
                os.execve(sys.executable, argv, env)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)

"""bpsh's children: each forks, resets, writes its execmove request to nodes/N/ctl (or sets
up its stdio here, for the master) and execs the command; a failure is one record on
the status pipe (`bpfs.child.Report`), which the stdio server reads.
"""

from __future__ import annotations

import _socket
import errno as _errno
import os
from bpfs.child import reset_signals

from bpfs.cli import common
from bpfs.cli.bpsh.args import MASTER, Job
from bpfs.cli.bpsh.stdio import (ALL_RANKS, NODE_REFUSALS, REASON_MAX, STAGE_CTL,
                                 STAGE_EXEC, StdioServer, one_line, pack_failure)

# Tests put a fake node here: then PREFIX... NODE PATH ARGV... is exec'd instead of
# the command (the fake reads nodes/NODE/ctl and does the node's part). Empty in use.
EXEC_PREFIX: list[str] = []


def _fork(child) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(127)
    return pid


def _reset_child(keep: int) -> None:
    """In a fresh child (in bpsh's process group, as a shell's job): default signals but
    those bpsh was started with ignored, an empty mask, fds 0-2 + keep."""
    reset_signals(keep_ignored=True)
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)


def _exec_argv(job: Job, node: int) -> tuple[str, list[str]]:
    if EXEC_PREFIX:
        return EXEC_PREFIX[0], [*EXEC_PREFIX, str(node), job.path, *job.argv]
    return job.path, job.argv


def _remote_child(job: Job, node: int, line: bytes, env: dict[str, str], status_w: int,
                  rank: int) -> None:
    _reset_child(status_w)
    try:
        write_request(job.mount, node, line)
    except OSError as e:
        _report(status_w, rank, STAGE_CTL, e.errno, _reason(e))
        os._exit(1)
    _execve(job, node, env, status_w, rank)


def _vector_child(job: Job, line: bytes, env: dict[str, str], status_w: int) -> None:
    """The writer of a multi-node run: the request goes to the first listed node whose
    ctl file exists (the master checks every rank itself)."""
    _reset_child(status_w)
    err, reason = _errno.ENODEV, ""
    for node in dict.fromkeys(job.nodes):
        try:
            write_request(job.mount, node, line)
            err = 0
            break
        except OSError as e:
            err, reason = e.errno or _errno.EIO, _reason(e)
            if err != _errno.ENODEV:        # that node's ctl exists: its answer stands
                break
    if err:
        _report(status_w, ALL_RANKS, STAGE_CTL, err, reason)
        os._exit(1)
    _execve(job, job.nodes[0], env, status_w, ALL_RANKS)


class RequestRefused(OSError):
    """A ctl write that failed; `reason` is the master's text for it ("" if none)."""
    reason = ""


def write_request(mount: str, node: int, line: bytes) -> None:
    """One write of one line to nodes/N/ctl; a node that does not exist is ENODEV.

    A refused write raises RequestRefused with the master's reason, read back from the
    same handle (the ctl file keeps the last error text of each open handle)."""
    try:
        fd = os.open(common.node_dir(mount, node) + "/ctl", os.O_RDWR)
    except FileNotFoundError:
        raise OSError(_errno.ENODEV, os.strerror(_errno.ENODEV)) from None
    try:
        os.write(fd, line)
    except OSError as e:
        refused = RequestRefused(e.errno, e.strerror)
        if e.errno not in NODE_REFUSALS:
            try:
                refused.reason = one_line(os.pread(fd, REASON_MAX, 0).decode("utf-8", "replace"))
            except OSError:
                pass
        raise refused from None
    finally:
        os.close(fd)


def _reason(e: OSError) -> str:
    return getattr(e, "reason", "")


def _execve(job: Job, node: int, env: dict[str, str], status_w: int, rank: int) -> None:
    path, argv = _exec_argv(job, node) if node != MASTER else (job.path, job.argv)
    try:
        os.execve(path, argv, env)
    except OSError as e:
        _report(status_w, rank, STAGE_EXEC, e.errno)
    os._exit(127)


def _report(status_w: int, rank: int, stage: int, err: int | None, reason: str = "") -> None:
    try:
        os.write(status_w, pack_failure(rank, stage, err or _errno.EIO, reason))
    except OSError:
        pass


def _start_local(server: StdioServer, job: Job, rank: int, env: dict[str, str],
                 expect: set[int], status_w: int) -> None:
    """Node -1: run the command here, its "socket" fds being socketpairs to the server."""
    pairs = {fd: _socket.socketpair() for fd in expect}
    pid = _fork(lambda: _local_child(job, pairs, env, status_w, rank))
    proc = server.add_process(rank, MASTER, pid, expect)
    for fd, (ours, theirs) in pairs.items():
        theirs.close()
        server.add_link(proc, fd, ours)


def _local_child(job: Job, pairs: dict[int, tuple[_socket.socket, _socket.socket]],
                 env: dict[str, str], status_w: int, rank: int) -> None:
    try:
        for fd, spec in enumerate(job.io):
            if spec == "socket":
                os.dup2(pairs[fd][1].fileno(), fd)
            elif spec == "stdout":
                os.dup2(1, 2)
            else:
                name = "/dev/null" if spec == "null" else spec[len("file:"):]
                flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                new = os.open(name, flags, 0o666)
                os.dup2(new, fd)
                os.close(new)
    except OSError as e:
        _report(status_w, rank, STAGE_CTL, e.errno)
        os._exit(1)
    _reset_child(status_w)
    _execve(job, MASTER, env, status_w, rank)

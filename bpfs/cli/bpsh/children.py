"""bpsh's children: each is forked by `bpfs.child.fork_reset` (in bpsh's process group,
as a shell's job; signals bpsh was started with ignored stay ignored), writes its execmove
request to nodes/N/ctl (or, on the master, sets up its stdio here) and execs the command.
A failure is one `bpfs.child.Report` on the status pipe, which the stdio server reads:
CTL for a refused request (`N: strerror`, child exit 1), EXEC for a failed execve
(`bpsh: X: strerror`, exit 127). The request's write is `bpfs.child.write_request`,
shared with bpsh -N and the library for programs (bpfs.libbproc).

    pid = start_remote(job, node, line, env, status_w, rank)    one node, one request
    pid = start_vector(job, line, env, status_w)                 many nodes, one request
    start_local(server, job, rank, env, expect, status_w)        node -1: here
"""

from __future__ import annotations

import _socket
import errno as _errno
import os
from bpfs.child import ALL_RANKS, CTL, EXEC, Report, fork_reset, reason_of, write_request

from bpfs.cli.bpsh.args import MASTER, Job
TYPE_CHECKING = False  # not at start-up (bench/results-startup.md); annotations only
if TYPE_CHECKING:
    from bpfs.cli.bpsh.stdio import StdioServer     # not at start-up: see run.run_job

# Tests put a fake node here: then PREFIX... NODE PATH ARGV... is exec'd instead of
# the command (the fake reads nodes/NODE/ctl and does the node's part). Empty in use.
EXEC_PREFIX: list[str] = []


def exec_argv(job: Job, node: int) -> tuple[str, list[str]]:
    """The path and argv to exec for a run on `node` (the fake node's, under tests)."""
    if EXEC_PREFIX:
        return EXEC_PREFIX[0], [*EXEC_PREFIX, str(node), job.path, *job.argv]
    return job.path, job.argv


def start_remote(job: Job, node: int, line: bytes, env: dict[str, str], status_w: int,
                 rank: int) -> int:
    """Fork the child that writes `line` to `node`'s ctl and execs the command."""
    def child() -> None:
        try:
            write_request(job.mount, node, line)
        except OSError as e:
            _report(status_w, rank, CTL, e.errno, reason_of(e))
            os._exit(1)
        _execve(job, node, env, status_w, rank)
    return _fork(child, status_w, rank)


def start_vector(job: Job, line: bytes, env: dict[str, str], status_w: int) -> int:
    """Fork the writer of a multi-node run: the request goes to the first listed node whose
    ctl file exists (the master checks every rank itself)."""
    def child() -> None:
        err, reason = _errno.ENODEV, ""
        for node in dict.fromkeys(job.nodes):
            try:
                write_request(job.mount, node, line)
                err = 0
                break
            except OSError as e:
                err, reason = e.errno or _errno.EIO, reason_of(e)
                if err != _errno.ENODEV:        # that node's ctl exists: its answer stands
                    break
        if err:
            _report(status_w, ALL_RANKS, CTL, err, reason)
            os._exit(1)
        _execve(job, job.nodes[0], env, status_w, ALL_RANKS)
    return _fork(child, status_w, ALL_RANKS)


def start_local(server: StdioServer, job: Job, rank: int, env: dict[str, str],
                expect: set[int], status_w: int) -> None:
    """Node -1: run the command here, its "socket" fds being socketpairs to the server."""
    pairs = {fd: _socket.socketpair() for fd in expect}

    def child() -> None:
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
            _report(status_w, rank, CTL, e.errno)
            os._exit(1)
        _execve(job, MASTER, env, status_w, rank)   # the pairs' own fds: close-on-exec

    theirs = tuple(pair[1].fileno() for pair in pairs.values())
    pid = _fork(child, status_w, rank, theirs)
    proc = server.add_process(rank, MASTER, pid, expect)
    for fd, (ours, their) in pairs.items():
        their.close()
        server.add_link(proc, fd, ours)


def _fork(child, status_w: int, rank: int,  # type: ignore[no-untyped-def]
          keep: tuple[int, ...] = ()) -> int:
    return fork_reset(child, status_w, keep, rank=rank, keep_ignored=True)


def _execve(job: Job, node: int, env: dict[str, str], status_w: int, rank: int) -> None:
    path, argv = exec_argv(job, node) if node != MASTER else (job.path, job.argv)
    try:
        os.execve(path, argv, env)
    except OSError as e:
        if e.errno == _errno.EINPROGRESS:   # bpsh on a node: the master ran the program in
            os.close(status_w)              # our ghost and migrated it (bpfs/standin.py);
            from bpfs.standin import stand_in   # we stand in for it here, bpsh's child
            stand_in(os.getpid(), job.mount)
        _report(status_w, rank, EXEC, e.errno)
    os._exit(127)


def _report(status_w: int, rank: int, stage: int, err: int | None, reason: str = "") -> None:
    try:
        os.write(status_w, Report(rank, stage, err or _errno.EIO, reason).pack())
    except OSError:
        pass

"""bpsh: run a command on cluster nodes, bproc 4.0 style, through $MOUNT/nodes/N/ctl.

    bpsh [options] NODESPEC command [args...]
    bpsh -a|-A [options] command [args...]

How one run goes (the request and link formats are `bpfs.wire.execreq`'s; steps 1-2
are `args`, step 4 `children`, step 5 `stdio`):
1. Parse options the way bproc's getopt loop did: options may come before and after
   NODESPEC, and the first word after NODESPEC (or after -a/-A) is the command; all
   that follows belongs to the command (`bpsh 1 ls -la`).
2. Look the command up in bpsh's PATH (bproc's `which`): `bpsh: X: command not found`,
   exit 1. Resolve NODESPEC against $MOUNT/status (`bpfs.nodeset`).
3. Listen on a TCP port (all addresses, ephemeral), make a random 32-hex token.
4. Several remote nodes (bproc's vexecmove): fork ONE child, the writer of
   `execmove --nodes LIST` (the node list in its compact form, `0-1023`, so that
   the request stays one ctl write; to the first listed node whose ctl exists), with
   BPROC_RANK=XXXXXXX in its environment; it execs once, the master dumps it once and
   makes a ghost per rank, each node writing its own rank over the Xs, and tells bpsh
   which PID is which rank (the ranks link, see stdio). A failed write is
   `N: strerror` for every rank (after the master's reason, read back from the ctl
   handle, as `bpsh: REASON`); a rank that may not run (no x, node down) is
   `N: strerror` for it alone, the others run.
   Otherwise (one node, or the master among them, or a test's fake node), fork one
   child per node in the list (order and duplicates kept; rank = index).
   The child stays in bpsh's process group, as a local command would be, so the
   terminal's Ctrl-C and Ctrl-Z reach its ghost (and, through it, the remote
   process); it resets every signal disposition but those bpsh was started with
   ignored (nohup, trap '', a background job: they stay ignored, on the node too)
   and the signal mask, closes every fd but 0-2 and the status pipe
   (`bpfs.child.fork_reset`), writes one `execmove` request line to nodes/N/ctl and execve's the
   command with bpsh's environment plus BPROC_RANK (7 digits) and BPROC_PROGNAME
   (the path found, as bproc). The master migrates that execve to node N and keeps
   the process as a ghost: our child, with the remote process's exit status.
   A failed ctl write is reported as `N: strerror` (child exit 1), a failed execve as
   `bpsh: X: strerror` (exit 127). Node -1 (`master`, `-1`) runs the command here,
   with the same stdio handling through socketpairs.
5. `stdio.StdioServer` forwards stdio and reaps the children. Links still open
   after a rank's ghost is reaped are closed once its node is down (`node_gone` reads
   nodes/N/status): a node daemon that hangs does not keep bpsh waiting.
6. Exit status: the largest exit status; a child killed by a signal prints
   `bpsh: Child process on node N exited abnormally.` and makes it 255. If bpsh was
   itself interrupted (SIGINT, SIGTERM, SIGHUP, SIGQUIT are forwarded to the
   children, see stdio) and children died of that signal, bpsh dies of it
   too, quietly, so the calling shell sees the interruption. A signal bpsh was
   started with ignored is neither caught nor forwarded (`nohup bpsh ...`).

With -N and a single remote node (and no -t), bpsh does the execmove itself
without forking, as bproc documents: bpsh becomes the ghost.

Kept light on purpose: start-up time is part of every bpsh run. No click or trio, and
not even `socket`, `signal`, `selectors`, `re`, `shlex`, `typing` or `dataclasses`: they
(and `enum`, `functools`, `collections` behind them) were ~2/3 of bpsh's imports. The C
modules `_socket` and `_signal` do the same work; `bpfs.nodeset` (and `bpfs.formats`) are
imported only for a NODESPEC that is not plain node numbers. tests/unit/test_startup.py
keeps it so.
"""

from __future__ import annotations

import _signal
import _socket
import errno as _errno
import os
import sys
import time
from bpfs.child import reset_signals
TYPE_CHECKING = False  # not at start-up (bench/results-startup.md); annotations only
if TYPE_CHECKING:
    from typing import Sequence
    from bpfs.cli.bpsh.links import Proc

from bpfs import __version__
from bpfs.cli import common
from bpfs.cli.bpsh.args import (EXIT_NOT_FOUND, MASTER, PROG, USAGE, Args, Job, UsageError,
                                parse_args, resolve_nodes, which)
from bpfs.child import reason_of, write_request
from bpfs.cli.bpsh.children import (EXEC_PREFIX, exec_argv, start_local, start_remote,
                                    start_vector)
from bpfs.wire.execreq import ExecMove


def run_job(job: Job, *, stdin_fd: int | None = 0, stdout_fd: int = 1, stderr_fd: int = 2,
            late_grace: float | None = None) -> tuple[list[Proc], list[int]]:
    """Start the job on every node and serve its stdio until all is done.

    Returns the processes (rank order, with their wait statuses) and the signals bpsh
    received meanwhile. Launch failures are printed on `stderr_fd` as they happen.
    """
    # The stdio server (stdio, links, output, stdin, poller) is imported here, not at
    # start-up: `bpsh -N`, bpsh with all three fds on /dev/null and --version never need it.
    from bpfs.cli.bpsh.stdio import StdioServer
    sockets = "socket" in job.io
    # One capture for every rank (vexecmove) from the master; on a node each rank is a
    # child of its own, which stands in for its program (bpfs/standin.py): the ranks'
    # ghosts are our children on the master only, and here we can wait only for ours.
    on_node = os.path.islink(os.path.join(job.mount, "self"))
    vector = len(job.nodes) > 1 and MASTER not in job.nodes and not EXEC_PREFIX \
        and not on_node
    listener = _listen() if vector or (sockets and any(n != MASTER
                                                       for n in job.nodes)) else None
    token = os.urandom(16).hex()
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    server = StdioServer(listener, token, job.output, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                         stderr_fd=stderr_fd, status_fd=status_r, command=job.argv[0],
                         late_grace=late_grace,
                         node_gone=lambda node: node_gone(job.mount, node))
    base_env = dict(os.environ if job.env is None else job.env, BPROC_PROGNAME=job.path)
    expect = {fd for fd, spec in enumerate(job.io) if spec == "socket"}
    server.install_signals()
    try:
        port = listener.getsockname()[1] if listener else 0
        if vector:
            line = ExecMove(port, token, 0, *job.io, nodes=tuple(job.nodes)).render().encode()
            env = dict(base_env, BPROC_RANK="X" * 7)
            pid = start_vector(job, line, env, status_w)
            server.add_vector(list(enumerate(job.nodes)), pid, expect)
        for rank, node in enumerate(job.nodes if not vector else ()):
            env = dict(base_env, BPROC_RANK=f"{rank:07d}")
            if node == MASTER:
                start_local(server, job, rank, env, expect, status_w)
            else:
                line = ExecMove(port or 1, token, rank, *job.io).render().encode()
                pid = start_remote(job, node, line, env, status_w, rank)
                server.add_process(rank, node, pid, expect)
        os.close(status_w)
        status_w = -1
        return server.run(), server.signals
    finally:
        if status_w >= 0:
            os.close(status_w)
        if listener is not None:
            listener.close()


def node_gone(mount: str, node: int) -> bool:
    """True if node `node` is down (or the mount does not answer): the master has given
    up on it and killed its ghosts, and whatever still runs there is no longer ours."""
    try:
        with open(common.node_dir(mount, node) + "/status", "rb") as f:
            return f.read().strip() == b"down"
    except OSError:
        return True


def _listen() -> _socket.socket:
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    sock.listen(1024)
    return sock


def exit_status(procs: Sequence[Proc], received: Sequence[int], stderr_fd: int = 2,
                prog: str = PROG) -> tuple[int, int | None]:
    """(exit status, signal bpsh should die of) from the children's wait statuses.

    The largest exit code wins; a child killed by a signal prints bproc's message and
    makes it 255, except when bpsh itself got that terminating signal and forwarded it:
    then bpsh dies of it too (the second value) and no message is printed.
    """
    from bpfs.cli.bpsh.stdio import TERMINATING
    interrupted = next((s for s in reversed(received) if s in TERMINATING), None)
    code, die_of = 0, None
    for proc in procs:
        st = proc.status if proc.status is not None else 255 << 8
        if os.WIFEXITED(st):
            code = max(code, os.WEXITSTATUS(st))
        elif os.WIFSIGNALED(st) and os.WTERMSIG(st) == interrupted:
            die_of = interrupted
        else:
            os.write(stderr_fd, f"{prog}: Child process on node {proc.node} exited "
                                f"abnormally.\n".encode())
            code = 255
    return code, die_of


def _direct_execmove(job: Job, node: int) -> int:
    """-N on one node: bpsh writes the request itself and becomes the ghost."""
    line = ExecMove(1, os.urandom(16).hex(), 0, *job.io).render().encode()
    try:
        write_request(job.mount, node, line)
    except OSError as e:
        if reason_of(e):
            sys.stderr.write(f"{PROG}: {reason_of(e)}\n")
        sys.stderr.write(f"{node}: {os.strerror(e.errno or _errno.EIO)}\n")
        return 1
    reset_signals(keep_ignored=True)
    path, argv = exec_argv(job, node)
    env = dict(os.environ if job.env is None else job.env, BPROC_PROGNAME=job.path,
               BPROC_RANK="0000000")
    sys.stdout.flush()
    try:
        os.execve(path, argv, env)
    except OSError as e:
        sys.stderr.write(f"{PROG}: {job.argv[0]}: {os.strerror(e.errno or _errno.EIO)}\n")
    return 127


def _run(args: Args) -> int:
    if args.help:
        sys.stdout.write(USAGE)
        return 0
    if args.version:
        sys.stdout.write(f"{PROG} version {__version__}\n")
        return 0
    if not args.command or (args.nodespec is None and not (args.all_up or args.all_avail)):
        raise UsageError("a node specification and a command are needed")
    path = which(args.command[0])
    if path is None:
        common.fail(f"{args.command[0]}: command not found", EXIT_NOT_FOUND)
    mount = common.mount_point(args.mount)
    nodes = resolve_nodes(args, mount)
    if nodes is None:                            # bproc: the master's own name runs here
        os.execv(path, args.command)
    if not nodes:
        return 0
    plan_io(args.io)
    job = Job(mount, nodes, path, args.command, tuple(args.io), args.output)
    if args.io == ["null"] * 3 and len(nodes) == 1 and nodes[0] != MASTER \
            and not args.time:
        return _direct_execmove(job, nodes[0])
    start = time.monotonic()
    procs, received = run_job(job)
    code, die_of = exit_status(procs, received)
    if args.time:
        sys.stdout.write(f"{time.monotonic() - start:.6f}\n")
        sys.stdout.flush()
    if die_of is not None:
        sys.stdout.flush()
        _signal.signal(die_of, _signal.SIG_DFL)
        os.kill(os.getpid(), die_of)
        return 128 + die_of
    return code


DEV_NULL = os.makedev(1, 3)
S_IFMT, S_IFCHR, S_IFREG = 0o170000, 0o020000, 0o100000


def plan_io(io: list[str], fds: Sequence[int] = (0, 1, 2)) -> None:
    """Forward only what needs a link; `io` (specs of fds 0-2) is changed in place.

    An fd of ours that is the null device becomes the node's /dev/null ("null", as -n
    does for stdin): a process reading it gets EOF at once, and what it writes is lost,
    as it would be here, and it sees the same device. If our stdout and stderr are one
    file (a terminal, a pipe, `>f 2>&1`: the same inode, and for a regular file the same
    offset), the remote fd 2 is its fd 1 ("stdout"), as with 2>&1: one link per process
    carries both, in the order they were written. `fds` are ours for 0, 1, 2 (tests).
    """
    st: list[os.stat_result | None] = []
    for n, fd in enumerate(fds):
        try:
            st.append(os.fstat(fd))
        except OSError:
            st.append(None)
        s = st[n]
        if io[n] == "socket" and s is not None and s.st_mode & S_IFMT == S_IFCHR \
                and s.st_rdev == DEV_NULL:
            io[n] = "null"
    out, err = st[1], st[2]
    if io[1] == io[2] == "socket" and out is not None and err is not None \
            and (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino) \
            and (out.st_mode & S_IFMT != S_IFREG or _offset(fds[1]) == _offset(fds[2])):
        io[2] = "stdout"


def _offset(fd: int) -> int | None:
    try:
        return os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    def body() -> int:
        try:
            args = parse_args(sys.argv[1:] if argv is None else argv)
        except UsageError as e:
            common.fail(f"{e}\nTry '{PROG} --help' for more information.", common.EXIT_USAGE)
        try:
            return _run(args)
        except UsageError as e:
            common.fail(f"{e}\nTry '{PROG} --help' for more information.", common.EXIT_USAGE)
    return common.run(PROG, body)


def console() -> None:
    """The installed `bpsh` command: main(), then exit at once."""
    common.exit_now(main())


if __name__ == "__main__":
    console()

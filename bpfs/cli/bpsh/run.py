"""bpsh: run a command on cluster nodes, bproc 4.0 style, through $MOUNT/nodes/N/ctl.

    bpsh [options] NODESPEC command [args...]
    bpsh -a|-A [options] command [args...]

How one run goes (the request and link formats are `bpfs.wire.execreq`'s):
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
   and the signal mask, closes every fd but 0-2 and the
   status pipe, writes one `execmove` request line to nodes/N/ctl and execve's the
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
from bpfs.record import Factory, record
TYPE_CHECKING = False  # typing costs ~3 ms of start-up; annotations only
if TYPE_CHECKING:
    from typing import Sequence

from bpfs import __version__
from bpfs.cli import common
from bpfs.cli.bpsh.stdio import (ALL_RANKS, NODE_REFUSALS, REASON_MAX, STAGE_CTL,
                                 STAGE_EXEC, OutputOptions, Proc, StdioServer, TERMINATING,
                                 one_line, pack_failure)
from bpfs.wire.execreq import ExecMove

PROG = "bpsh"
DEFAULT_BUFFER = 4096
EXIT_NOT_FOUND = 1          # bproc's bpsh: `bpsh: X: command not found`, exit 1
# Tests put a fake node here: then PREFIX... NODE PATH ARGV... is exec'd instead of
# the command (the fake reads nodes/NODE/ctl and does the node's part). Empty in use.
EXEC_PREFIX: list[str] = []
MASTER = -1                 # the master's node number (as bpfs.nodeset's)

USAGE = f"""\
usage: {PROG} [options] NODESPEC command [args...]
       {PROG} -a [options] command [args...]
       {PROG} -A [options] command [args...]
Run a command on cluster nodes. The program comes from this machine (looked up in
PATH here) and is migrated; stdin, stdout and stderr are forwarded back, so
redirections on the command line refer to files here.
NODESPEC: N, nN, .N, A-B, A-, lists with commas (order and duplicates kept), all,
master, allup, up, !down, allnotdown; -1 is the master.
  -h, --help     Display this message and exit
  -v, --version  Display version information and exit
      --mount DIR  the bpfs mount (default: $BPROC_MOUNT, else /bproc)
 Node selection options:
  -a     Run the command on all nodes which are up.
  -A     Run the command on all nodes which are not down.
 IO forwarding options:
  -n     Redirect stdin from /dev/null
  -N     No IO forwarding
  -L     Line buffer output from remote nodes.
  -p     Prefix each line of output with the node number
         it is from. (implies -L)
  -s     Show the output from each node sequentially.
  -d     Print a divider between the output from each
         node. (implies -s)
  -b ##  Set IO buffer size to ## bytes.  This affects the
         maximum line length for line buffered IO. (default={DEFAULT_BUFFER})
  -I file, --stdin file
         Redirect standard in from file on the remote node.
  -O file, --stdout file
         Redirect standard out to file on the remote node.
  -E file, --stderr file
         Redirect standard error to file on the remote node.
  -t, --time
         Time how long the command takes to complete.  This includes
         the time for process creation.
Exit status: the largest exit status of the remote processes; 255 if one was
killed by a signal; 1 if the command is not found or bpsh failed.
"""


class UsageError(Exception):
    """Bad command line: message, then a hint to --help; exit 2."""


@record
class Args:
    """bpsh's command line, parsed."""
    nodespec: str | None = None
    all_up: bool = False
    all_avail: bool = False
    io: list[str] = Factory(lambda: ["socket", "socket", "socket"])
    output: OutputOptions = Factory(lambda: OutputOptions(
        buffer_size=DEFAULT_BUFFER))
    time: bool = False
    mount: str | None = None
    command: list[str] = Factory(list)
    help: bool = False
    version: bool = False
    npos: int = 0               # free words seen (bproc's non_option_args)


# ---- command line -------------------------------------------------------------------

_SHORT_ARG = set("lbIOE")          # short options taking an argument
_SHORT_FLAG = set("hvnNaA1Lpsdt")
_LONG = {"help": None, "version": None, "time": None, "stdin": "I", "stdout": "O",
         "stderr": "E", "mount": "mount"}


def parse_args(argv: Sequence[str]) -> Args:
    """bproc's getopt loop ("+hl:nNaAv1Lpsdb:I:O:E:t" and long options), in Python.

    The first free word is NODESPEC (-a, -A and -1 stand for it), the next one is the
    command: it and every word after it are the command's. "--" makes the next word
    free even if it starts with "-".
    """
    args, i = Args(), 0
    argv = list(argv)
    while i < len(argv) and not args.command:
        word = argv[i]
        i += 1
        if word == "--":
            if i < len(argv):
                _positional(args, argv, i)
                i += 1
        elif word.startswith("--"):
            i = _long_option(args, word, argv, i)
        elif word.startswith("-") and word != "-":
            i = _short_options(args, word, argv, i)
        else:
            _positional(args, argv, i - 1)
        if args.help or args.version:
            break
    return args


def _positional(args: Args, argv: list[str], at: int) -> None:
    if args.npos == 0:
        args.nodespec = argv[at]
    else:
        args.command = argv[at:]
    args.npos += 1


def _long_option(args: Args, word: str, argv: list[str], i: int) -> int:
    name, eq, value = word[2:].partition("=")
    matches = [n for n in _LONG if n.startswith(name)] if name else []
    if name in _LONG:
        matches = [name]
    if len(matches) != 1:
        raise UsageError(f"{'ambiguous' if matches else 'unrecognized'} option '{word}'")
    name = matches[0]
    target = _LONG[name]
    if target is None:
        if eq:
            raise UsageError(f"option '--{name}' doesn't allow an argument")
        _flag(args, {"help": "h", "version": "v", "time": "t"}[name])
        return i
    if not eq:
        if i >= len(argv):
            raise UsageError(f"option '--{name}' requires an argument")
        value, i = argv[i], i + 1
    if target == "mount":
        args.mount = value
    else:
        _with_arg(args, target, value)
    return i


def _short_options(args: Args, word: str, argv: list[str], i: int) -> int:
    for k, ch in enumerate(word[1:], start=1):
        if ch in _SHORT_FLAG:
            _flag(args, ch)
        elif ch in _SHORT_ARG:
            value = word[k + 1:]
            if not value:
                if i >= len(argv):
                    raise UsageError(f"option requires an argument -- '{ch}'")
                value, i = argv[i], i + 1
            _with_arg(args, ch, value)
            return i
        else:
            raise UsageError(f"invalid option -- '{ch}'")
    return i


def _flag(args: Args, ch: str) -> None:
    out = args.output
    if ch == "h":
        args.help = True
    elif ch == "v":
        args.version = True
    elif ch == "1":
        args.nodespec = "-1"
        args.npos += 1
    elif ch == "a":
        args.all_up, args.npos = True, 1
    elif ch == "A":
        args.all_avail, args.npos = True, 1
    elif ch == "n":
        args.io[0] = "null"
    elif ch == "N":
        args.io[:] = ["null", "null", "null"]
    elif ch == "L":
        out.line_buffered = True
    elif ch == "p":
        out.line_buffered = out.prefix = True
    elif ch == "s":
        out.sequential = True
    elif ch == "d":
        out.sequential = out.dividers = True
    elif ch == "t":
        args.time = True


def _with_arg(args: Args, ch: str, value: str) -> None:
    if ch == "b":
        try:
            size = int(value, 0)
        except ValueError:
            size = 0
        if size <= 0:
            raise UsageError(f"Invalid buffer size: {value}")
        args.output.buffer_size = size
    elif ch in "IOE":
        if not value:
            raise UsageError(f"-{ch} needs a file name")
        args.io["IOE".index(ch)] = "file:" + value
    # -l USER: accepted and ignored, as bproc did (rsh compatibility)


# ---- command lookup -------------------------------------------------------------------

def which(name: str, path: str | None = None) -> str | None:
    """bproc's which(): a name with a slash is taken as is, else searched in PATH
    (default ":/bin:/usr/bin"; an empty entry means "."). Only executable regular
    files count."""
    if not name:
        return None
    if "/" in name:
        return name if _executable(name) else None
    if path is None:
        path = os.environ.get("PATH", ":/bin:/usr/bin")
    for d in path.split(":"):
        candidate = os.path.join(d, name) if d else "./" + name
        if _executable(candidate):
            return candidate
    return None


def _executable(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_mode & 0o170000) == 0o100000 and os.access(path, os.X_OK)


# ---- nodes ------------------------------------------------------------------------------

def resolve_nodes(args: Args, mount: str) -> list[int] | None:
    """The node list, or None when the spec names this machine (run the command here)."""
    text = "allup" if args.all_up else "allnotdown" if args.all_avail else args.nodespec
    assert text is not None
    if text == "-1":
        text = "master"
    numbers = _plain_numbers(text)
    if numbers is not None and os.path.exists(os.path.join(mount, "status")):
        return numbers                  # no node list needed: the ctl write checks each node
    from bpfs import nodeset            # the rest of the grammar needs the node list
    rows = common.read_status(mount)
    pairs = [(r.number, r.state) for r in rows]
    try:
        return nodeset.parse(text).resolve(pairs, keep_unknown=True)
    except ValueError as e:
        by_address = [r.number for r in rows if r.address and r.address == text]
        if by_address:
            return by_address
        if text in ("localhost", "n-1", _socket.gethostname()):
            return None
        common.fail(f'Invalid node specification "{text}": {e}')


def _plain_numbers(text: str) -> list[int] | None:
    """The nodes of a spec made only of node numbers (N, nN, .N) and `master`, as
    `nodeset.parse(text).resolve([], keep_unknown=True)` gives them when `only_numbers`;
    None for anything else (then bpfs.nodeset decides)."""
    out = []
    for chunk in text.split(","):
        if chunk == "master":
            out.append(MASTER)
        elif chunk:
            digits = chunk[1:] if chunk[0] in "n." else chunk
            if not (digits.isascii() and digits.isdigit()):
                return None
            out.append(int(digits))
    return out or None


# ---- running ----------------------------------------------------------------------------

@record
class Job:
    """What to run where; `path` is the program found by `which`, `argv` its argv."""
    mount: str
    nodes: list[int]
    path: str
    argv: list[str]
    io: Sequence[str] = ("socket", "socket", "socket")
    output: OutputOptions = Factory(OutputOptions)
    env: dict[str, str] | None = None       # None: bpsh's own environment


def run_job(job: Job, *, stdin_fd: int | None = 0, stdout_fd: int = 1, stderr_fd: int = 2,
            late_grace: float | None = None) -> tuple[list[Proc], list[int]]:
    """Start the job on every node and serve its stdio until all is done.

    Returns the processes (rank order, with their wait statuses) and the signals bpsh
    received meanwhile. Launch failures are printed on `stderr_fd` as they happen.
    """
    sockets = "socket" in job.io
    vector = len(job.nodes) > 1 and MASTER not in job.nodes and not EXEC_PREFIX
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
            pid = _fork(lambda: _vector_child(job, line, env, status_w))
            server.add_vector(list(enumerate(job.nodes)), pid, expect)
        for rank, node in enumerate(job.nodes if not vector else ()):
            env = dict(base_env, BPROC_RANK=f"{rank:07d}")
            if node == MASTER:
                _start_local(server, job, rank, env, expect, status_w)
            else:
                line = ExecMove(port or 1, token, rank, *job.io).render().encode()
                pid = _fork(lambda: _remote_child(job, node, line, env, status_w, rank))
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


def exit_status(procs: Sequence[Proc], received: Sequence[int], stderr_fd: int = 2
                ) -> tuple[int, int | None]:
    """(exit status, signal bpsh should die of) from the children's wait statuses.

    The largest exit code wins; a child killed by a signal prints bproc's message and
    makes it 255, except when bpsh itself got that terminating signal and forwarded it:
    then bpsh dies of it too (the second value) and no message is printed.
    """
    interrupted = next((s for s in reversed(received) if s in TERMINATING), None)
    code, die_of = 0, None
    for proc in procs:
        st = proc.status if proc.status is not None else 255 << 8
        if os.WIFEXITED(st):
            code = max(code, os.WEXITSTATUS(st))
        elif os.WIFSIGNALED(st) and os.WTERMSIG(st) == interrupted:
            die_of = interrupted
        else:
            os.write(stderr_fd, f"{PROG}: Child process on node {proc.node} exited "
                                f"abnormally.\n".encode())
            code = 255
    return code, die_of


def _direct_execmove(job: Job, node: int) -> int:
    """-N on one node: bpsh writes the request itself and becomes the ghost."""
    line = ExecMove(1, os.urandom(16).hex(), 0, *job.io).render().encode()
    try:
        write_request(job.mount, node, line)
    except OSError as e:
        if _reason(e):
            sys.stderr.write(f"{PROG}: {_reason(e)}\n")
        sys.stderr.write(f"{node}: {os.strerror(e.errno or _errno.EIO)}\n")
        return 1
    reset_signals(keep_ignored=True)
    path, argv = _exec_argv(job, node)
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

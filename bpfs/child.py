"""A child about to exec a program for bpsh or the master: its fork, its reset, its PATH
lookup, and how it reports a failure.

    pid = fork_reset(fn, status_w, keep, keep_ignored=..., setsid=..., stdio=...)
    path_candidates(name, path)     where execvp would look for `name`
    Report(rank, stage, errno, reason).pack() / Report.take(buf)     the status pipe
    write_request(mount, node, line)    the execmove request to nodes/N/ctl (reason_of)

MIGRATION.md, dump step 1: the migrated program must not inherit the launcher's
caught signals, nor its signal mask (bpsh and the master are Python programs with
handlers of their own), nor its fds. `fork_reset` forks with every signal blocked (so
that none can run a parent's handler, or reach its wakeup fd, in the child before the
reset), then in the child: default dispositions, an empty mask, its own session if
`setsid`, fds 0-2 made copies of `stdio` if given, every other fd closed but the status
pipe and `keep`; then `fn()`, and _exit(127) if fn returns or raises. A failure of the
reset itself is one SETUP report on the status pipe. The parent gets the pid (OSError
if the fork failed) with its mask as it was.

Ignored signals are another matter: SIG_IGN survives execve, and `nohup cmd`,
`trap '' INT` or a shell's background job rely on it. bpsh passes `keep_ignored`:
a signal bpsh itself was started with ignored stays ignored for the program it
runs (bpsh never catches those), so the image the master dumps carries it to the
node, as a local run would have it. The exceptions are SIGPIPE and SIGXFSZ, which
the Python interpreter ignores at start-up whatever it inherited: they are reset,
the common case (a `bpsh N cmd | head` that ignored SIGPIPE would spin on EPIPE).
The master (`keep_ignored` False) resets everything: its own dispositions are no
user's.

The PATH rule (bproc's which, execvp): a name with a slash is the only candidate; else
each PATH entry in order, an empty entry meaning ".". Each caller brings its own PATH
and default: bpsh its own ($PATH, else ":/bin:/usr/bin", as bproc) and checks that a
candidate is an executable file; the master the writer's ($PATH, else "/bin:/usr/bin")
and tries execve on each in turn.

A child that fails before its program runs tells its parent on a status pipe, one
`Report` a failure, each one atomic write (at most PIPE_BUF bytes):

    report := RANK(i32) STAGE(i32) ERRNO(i32) LEN(u16) REASON(LEN bytes, UTF-8)    native order
    STAGE  := READY (0)  the child is set up and waits (no failure; the master's exec)
            | CTL (1)    the execmove request written to nodes/N/ctl was refused (bpsh)
            | EXEC (2)   execve itself
            | SETUP (3)  the reset, credentials, fds, umask: before anything else
            | CWD (4)    changing to the writer's cwd (the master's exec)
    RANK   := the child's rank, or -1 for a multi-node run's one writer
    REASON := the master's reason for a refused request, as one line of printable
              text, cut at REASON_MAX bytes; empty for the others

The parent reads reports until EOF: EOF without one means the child exec'd (the
pipe is close-on-exec) or died.

`_signal` and `_struct`, not `signal` and `struct`: the same functions without the
enum wrappers (`signal` imports `enum`, ~2 ms of every bpsh run); bpsh imports this
module at start-up.
"""

import _signal
import errno as _errno
import os
from _struct import Struct

from bpfs.record import record

RESET_ALWAYS = (_signal.SIGPIPE, _signal.SIGXFSZ)    # ignored by Python itself


def reset_signals(keep_ignored: bool = False) -> None:
    """Default disposition for every signal (but the ignored ones if `keep_ignored`), an
    empty mask, no wakeup fd; never raises."""
    _signal.set_wakeup_fd(-1)
    for sig in _signal.valid_signals():
        if sig in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        try:
            if keep_ignored and sig not in RESET_ALWAYS and \
                    _signal.getsignal(sig) == _signal.SIG_IGN:
                continue
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())



def fork_reset(fn, status_w: int, keep: tuple[int, ...] = (),  # type: ignore[no-untyped-def]
               *, rank: int = 0, keep_ignored: bool = False, setsid: bool = False,
               stdio: int | None = None) -> int:
    """Fork a child that resets itself and runs `fn()` (see the module docstring); its pid.

    The child keeps fds 0-2, its status pipe `status_w` and `keep`; a reset that fails is
    a SETUP report (with `rank`) on the pipe. `stdio`: an fd to make 0, 1 and 2 of."""
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    pid = -1
    try:
        pid = os.fork()
        if pid == 0:
            try:
                try:
                    reset_signals(keep_ignored)
                    if setsid:
                        os.setsid()
                    if stdio is not None:
                        for fd in (0, 1, 2):
                            os.dup2(stdio, fd)
                    _close_all_but((status_w, *keep))
                except OSError as e:
                    os.write(status_w, Report(rank, SETUP, e.errno or _errno.EIO).pack())
                    raise
                fn()
            finally:
                os._exit(127)
    finally:
        if pid != 0:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old)
    return pid


def _close_all_but(keep: tuple[int, ...]) -> None:
    """Close every fd above 2 but those in `keep`."""
    fds = sorted(fd for fd in keep if fd > 2)
    for lo, hi in zip([2, *fds], [*fds, 1 << 20]):
        os.closerange(lo + 1, hi)


def path_candidates(name, path):  # type: ignore[no-untyped-def]
    """Where execvp looks for `name` (str or bytes) along `path` (of the same type): the
    name itself if it holds a slash, else each entry joined with it ("" is ".")."""
    if isinstance(name, str):
        slash, dot, sep = "/", ".", ":"
    else:
        slash, dot, sep = b"/", b".", b":"
    if slash in name:
        return [name]
    return [os.path.join(d or dot, name) for d in path.split(sep)]

READY, CTL, EXEC, SETUP, CWD = 0, 1, 2, 3, 4     # CTL, EXEC: the numbers bpsh has always used
ALL_RANKS = -1
REASON_MAX = 1024
# bproc's own per-node refusals (no x permission, node down, no such node): `N: strerror`
# says it all, and no reason comes with them; other failures (a request the master
# refused, a program that may not migrate, a restore that failed) come with the master's
# reason, printed once before the `N: strerror` lines.
NODE_REFUSALS = (_errno.EACCES, _errno.EHOSTDOWN, _errno.ENODEV)
_HEAD = Struct("=iiiH")             # rank, stage, errno, length of the reason


@record(frozen=True)
class Report:
    """One record on the status pipe (see the module docstring)."""
    rank: int
    stage: int
    errno: int
    reason: str = ""

    def pack(self) -> bytes:
        """The record's bytes: the reason made one line and cut at REASON_MAX bytes."""
        data = one_line(self.reason).encode("utf-8", "replace")[:REASON_MAX]
        return _HEAD.pack(self.rank, self.stage, self.errno, len(data)) + data

    @staticmethod
    def take(buf: bytearray) -> "Report | None":
        """The first whole record in `buf`, removed from it; None while it holds less."""
        if len(buf) < _HEAD.size:
            return None
        rank, stage, err, n = _HEAD.unpack_from(buf)
        end = _HEAD.size + n
        if len(buf) < end:
            return None
        reason = bytes(buf[_HEAD.size:end]).decode("utf-8", "replace")
        del buf[:end]
        return Report(rank, stage, err, reason)


def one_line(text: str) -> str:
    """A reason as one line of printable text."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


# ---- the execmove request, written by the child itself -------------------------------

class RequestRefused(OSError):
    """A ctl write that failed; `reason` is the master's text for it ("" if none)."""
    reason = ""


def write_request(mount: str, node: int, line: bytes) -> None:
    """One write of one line to MOUNT/nodes/N/ctl (bpfs.wire.execreq's request, from the
    process whose next execve it arms: bpsh's children, bpsh -N, bpfs.libbproc); a node
    that does not exist is ENODEV.

    A refused write raises RequestRefused with the master's reason, read back from the
    same handle (the ctl file keeps the last error text of each open handle)."""
    try:
        fd = os.open(os.path.join(mount, "nodes", str(node), "ctl"), os.O_RDWR)
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


def reason_of(e: OSError) -> str:
    """The master's reason of a refused request ("" if none, or not a RequestRefused)."""
    return getattr(e, "reason", "")

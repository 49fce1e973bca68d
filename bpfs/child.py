"""What every process about to be migrated does before its execve, and how it reports.

MIGRATION.md, dump step 1: the migrated program must not inherit the launcher's
caught signals, nor its signal mask (bpsh and the master are Python programs with
handlers of their own). Callers close their own extra fds.

Ignored signals are another matter: SIG_IGN survives execve, and `nohup cmd`,
`trap '' INT` or a shell's background job rely on it. bpsh passes `keep_ignored`:
a signal bpsh itself was started with ignored stays ignored for the program it
runs (bpsh never catches those), so the image the master dumps carries it to the
node, as a local run would have it. The exceptions are SIGPIPE and SIGXFSZ, which
the Python interpreter ignores at start-up whatever it inherited: they are reset,
the common case (a `bpsh N cmd | head` that ignored SIGPIPE would spin on EPIPE).
The master (`keep_ignored` False) resets everything: its own dispositions are no
user's.

A child that fails before its program runs tells its parent on a status pipe, one
`Report` a failure, each one atomic write (at most PIPE_BUF bytes):

    report := RANK(i32) STAGE(i32) ERRNO(i32) LEN(u16) REASON(LEN bytes, UTF-8)    native order
    STAGE  := READY      the child is set up and waits (no failure; the master's exec)
            | SETUP      credentials, fds, umask: before anything else
            | CTL        the execmove request written to nodes/N/ctl was refused
            | CWD        changing to the writer's cwd (the master's exec)
            | EXEC       execve itself
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


READY, SETUP, CTL, CWD, EXEC = 0, 1, 2, 3, 4
ALL_RANKS = -1
REASON_MAX = 1024
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
        data = _one_line(self.reason).encode("utf-8", "replace")[:REASON_MAX]
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


def _one_line(text: str) -> str:
    """A reason as one line of printable text."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())

"""What the fs layer reads about its callers from /proc.

FUSE tells a handler only the caller's uid, gid and thread id. Supplementary
groups (for chgrp and node ACLs) come from /proc/TID/status `Groups:`, read
through a pin (bpfs/pin.py), never by the bare number.

Pending signals matter for blocked reads of /bproc/events: once a request has
been sent to us the kernel waits for our answer even if the reader is killed
(fs/fuse/dev.c request_wait_answer), and pyfuse3 does not pass FUSE_INTERRUPT
on. So a blocked read polls the reader's /proc status (bpfs/procstatus.py) and
answers EINTR when a signal is pending that will kill it or run a handler; stop
and ignore-by-default signals do not count, so Ctrl-Z does not fail the read.
The reader stands for the handle's opener (pyfuse3 gives `read` no context),
by its bare number: this only observes, and a wrong answer (the opener gone,
its number reused by a process with a signal pending) is one spurious EINTR.
"""

from __future__ import annotations

import signal

from bpfs import procstatus

_QUIET_BY_DEFAULT = (signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                     signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
_ALL = (1 << 64) - 1
_LOUD_BY_DEFAULT = _ALL & ~sum(1 << (s - 1) for s in _QUIET_BY_DEFAULT)


def _status(tid: int) -> dict[str, str]:
    """The fields of /proc/TID/status; empty if the task is gone or unreadable."""
    if tid <= 0:
        return {}
    try:
        return procstatus.read(tid)
    except OSError:
        return {}


def interrupting_signal(tid: int) -> bool:
    """True if `tid` has an unblocked pending signal that kills it or runs a handler."""
    st = _status(tid)
    try:
        pending = int(st.get("SigPnd", "0"), 16) | int(st.get("ShdPnd", "0"), 16)
        pending &= ~int(st.get("SigBlk", "0"), 16)
        caught = int(st.get("SigCgt", "0"), 16)
    except ValueError:
        return False
    return bool(pending & (caught | _LOUD_BY_DEFAULT))

"""A process on a node that launched a program on another node stands in for it.

Launching from a node (bpsh on a node, bproc_execmove): the process writes an execmove to
MOUNT/nodes/T/ctl and calls execve; its node's supervisor has the master run that execve
in the process's ghost and migrate it to node T (bpfs/node/supervisor.py,
bpfs/master/nodeexec.py). The execve then fails with LAUNCHED (EINPROGRESS, which no
execve gives of its own) on the caller's node: the program runs elsewhere under the same
cluster PID, and the caller stays behind as its stand-in,
the child its parent waits for. `stand_in` passes on every signal it gets (through
MOUNT/procs/PID/signal) and ends the way the program ended: the same exit code, or death
by the same signal.

How it learns the end: WAIT_CALL, a getpgid() of a PID that cannot exist, which the node's
supervisor answers only once the master has said how the program ended (its wait status);
a signal interrupts it, is passed on, and the call is made again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from typing import NoReturn

LAUNCHED = errno.EINPROGRESS    # execve's answer: "it runs, elsewhere"
SYS_GETPGID = 121
WAIT_ARG = -0x42504653          # getpgid(-"BPFS"): the stand-in's question
PASSED_ON = tuple(s for s in signal.valid_signals()
                  if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def wait_status() -> int:
    """The program's wait status (blocks; -1 with errno set if interrupted or refused)."""
    return _libc.syscall(ctypes.c_long(SYS_GETPGID), ctypes.c_long(WAIT_ARG))


def stand_in(pid: int, mount: str) -> NoReturn:
    """Stand in for cluster process `pid` (ourselves, run elsewhere) until it ends."""
    sigfile = os.path.join(mount, "procs", str(pid), "signal")

    def pass_on(sig: int, _frame: object) -> None:
        try:
            fd = os.open(sigfile, os.O_WRONLY)
            try:
                os.write(fd, b"%d\n" % sig)
            finally:
                os.close(fd)
        except OSError:
            pass
    for sig in PASSED_ON:
        try:
            signal.signal(sig, pass_on)
        except (OSError, ValueError):
            pass
    while True:
        status = wait_status()
        if status >= 0:
            break
        if ctypes.get_errno() not in (4, 512, 513, 514, 516):   # EINTR and restarts
            os._exit(255)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255)

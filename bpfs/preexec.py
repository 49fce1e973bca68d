"""What every process about to be migrated does before its execve.

MIGRATION.md, dump step 1: the migrated program must not inherit the launcher's
ignored or caught signals, nor its signal mask (bpsh and the master are Python
programs with handlers of their own). Callers close their own extra fds.
"""

from __future__ import annotations

import signal


def reset_signals() -> None:
    """Default disposition for every signal, an empty mask, no wakeup fd; never raises."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, set())

"""What every process about to be migrated does before its execve.

MIGRATION.md, dump step 1: the migrated program must not inherit the launcher's
ignored or caught signals, nor its signal mask (bpsh and the master are Python
programs with handlers of their own). Callers close their own extra fds.

`_signal`, not `signal`: the same functions without the enum wrappers (`signal`
imports `enum`, ~2 ms of every bpsh run); bpsh imports this module at start-up.
"""

import _signal


def reset_signals() -> None:
    """Default disposition for every signal, an empty mask, no wakeup fd; never raises."""
    _signal.set_wakeup_fd(-1)
    for sig in _signal.valid_signals():
        if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
            try:
                _signal.signal(sig, _signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())

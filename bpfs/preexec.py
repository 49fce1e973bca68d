"""What every process about to be migrated does before its execve.

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

`_signal`, not `signal`: the same functions without the enum wrappers (`signal`
imports `enum`, ~2 ms of every bpsh run); bpsh imports this module at start-up.
"""

import _signal

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

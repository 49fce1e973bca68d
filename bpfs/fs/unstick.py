"""A tick that gets the FUSE loop out of a read of an empty /dev/fuse.

pyfuse3 waits until /dev/fuse is readable, then reads it with a blocking read, holding
the GIL. The kernel can take back what made it readable: a FUSE_INTERRUPT it queued for
a request (its caller got a signal, or was stopped with PTRACE_INTERRUPT: a process that
moves itself, bproc_move) leaves the queue unread once that request is answered first
(fs/fuse/dev.c, request_end). The read then waits for the next request, and with it the
whole daemon (trio's loop, and every thread, for the GIL), while its nodes or its master
take its silence for a death.

So a kernel timer (timer_create, SIGEV_THREAD_ID) sends the loop's own thread a signal
every TICK seconds, with a handler that does nothing and no SA_RESTART: a read blocked
in /dev/fuse returns EINTR, which pyfuse3 takes as "wait for readiness again"; anything
else the signal meets is retried (PEP 475, trio's epoll wait). A kernel timer, because
no thread of ours could run to send it while that read holds the GIL.

    tick = Tick.start()         in the thread that runs pyfuse3's loop (the main thread)
    tick.stop()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import struct
import threading

log = logging.getLogger("bpfs.fs")

SIGNAL = signal.SIGRTMIN + 5
TICK = 0.2
CLOCK_MONOTONIC, SIGEV_THREAD_ID = 1, 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _ignore(signum: int, frame: object) -> None:
    """Nothing: the signal is there to end a blocked read."""


class Tick:
    def __init__(self, timer: ctypes.c_void_p) -> None:
        self.timer = timer

    @classmethod
    def start(cls, every: float = TICK) -> "Tick | None":
        """None (logged) where it cannot be had: not the main thread, no timer."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("the FUSE loop is not in the main thread: no tick for it")
            return None
        signal.signal(SIGNAL, _ignore)
        signal.siginterrupt(SIGNAL, True)
        # struct sigevent: sigev_value (8), sigev_signo, sigev_notify, then _tid
        event = ctypes.create_string_buffer(struct.pack("<Qiii", 0, SIGNAL, SIGEV_THREAD_ID,
                                                        threading.get_native_id()), 64)
        timer = ctypes.c_void_p()
        if _libc.timer_create(CLOCK_MONOTONIC, event, ctypes.byref(timer)) != 0:
            log.warning("no tick for the FUSE loop: timer_create: errno %d",
                        ctypes.get_errno())
            return None
        sec, nsec = int(every), int((every % 1) * 1e9)
        spec = ctypes.create_string_buffer(struct.pack("<qqqq", sec, nsec, sec, nsec))
        if _libc.timer_settime(timer, 0, spec, None) != 0:
            _libc.timer_delete(timer)
            log.warning("no tick for the FUSE loop: timer_settime: errno %d",
                        ctypes.get_errno())
            return None
        return cls(timer)

    def stop(self) -> None:
        if self.timer is not None:
            _libc.timer_delete(self.timer)
            self.timer = None       # type: ignore[assignment]

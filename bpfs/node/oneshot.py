"""A one-shot timer for an epoll: a timerfd (Linux), armed and disarmed from any thread.

Why: the supervisor's watcher thread sleeps in its epoll until something hangs up. A child
forked a moment ago that is not there yet must be looked for a little later, unless its
execve takes it first (the usual case): a timer set by the thread that let the fork go,
and unset when the execve took the child, wakes the watcher only when a look is due, where
a pipe written at each fork woke it at once, for nothing most of the time (Python 3.11 has
no os.timerfd_create: ctypes)."""

from __future__ import annotations

import ctypes
import os
import struct

CLOCK_MONOTONIC = 1
_libc = ctypes.CDLL(None, use_errno=True)
_SPEC = struct.Struct("<qqqq")          # struct itimerspec: interval, then value


class OneShot:
    """`fd` becomes readable once, `arm`'s seconds from now (re-arming moves it)."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd

    def arm(self, seconds: float) -> None:
        ns = max(1, int(seconds * 1e9))
        self._set(ns // 1_000_000_000, ns % 1_000_000_000)

    def disarm(self) -> None:
        self._set(0, 0)

    def drain(self) -> None:
        """After it fired: readable no more until armed again."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def _set(self, sec: int, nsec: int) -> None:
        spec = ctypes.create_string_buffer(_SPEC.pack(0, 0, sec, nsec), _SPEC.size)
        if _libc.timerfd_settime(self.fd, 0, spec, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

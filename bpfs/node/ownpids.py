"""The node daemon's own threads and processes are numbered only with the counter parked.

The daemon runs in the node's PID namespace, so each thread it starts and each process it
spawns takes a number from the same counter that a directed fork points just below a
cluster PID for a moment (bpfs/node/pidcounter.py). One made in that moment takes the
child's PID. They are made in many places, some not ours (trio's worker threads come and
go with its thread cache; subprocess for stdio relays and pidfd proxies), so `install`
puts the counter's guard on every way Python makes one: threading's thread start,
subprocess's fork_exec, os.posix_spawn(p), and os.fork (its at-fork hooks).

Only the node daemon installs it (bpfs/node/service.py), once, for its whole life.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
from typing import Any, Callable

from bpfs.node.pidcounter import Counter

_counter: Counter | None = None


def install(counter: Counter) -> None:
    """From now on every thread and process this daemon makes waits for `counter`'s
    directed fork to settle (a later call only changes the counter)."""
    global _counter
    first = _counter is None
    _counter = counter
    if not first:
        return
    for module, name in ((threading, "_start_new_thread"),
                         (threading, "_start_joinable_thread"),
                         (subprocess, "_fork_exec"), (os, "posix_spawn"),
                         (os, "posix_spawnp")):
        fn = getattr(module, name, None)
        if fn is not None:
            setattr(module, name, _guarded(fn))
    os.register_at_fork(before=_hold, after_in_parent=_release, after_in_child=_release)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        assert _counter is not None         # installed only with one
        with _counter.guard():
            return fn(*args, **kwargs)
    return call


_held: list[Counter] = []       # the counter os.fork's `before` took (per fork, nested)


def _hold() -> None:
    counter = _counter
    if counter is not None:
        counter.hold()
        _held.append(counter)


def _release() -> None:
    if _held:
        _held.pop().release()

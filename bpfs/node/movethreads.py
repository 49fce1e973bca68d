"""The threads that run moves (bpfs/node/mover.py): kept once started, for the next move.

    threads = MoveThreads()
    threads.run(fn, *args)          fn(*args) in an idle thread, or a new one; kept
                                    after only if it returns True

Why: each move's ptrace requests come from one thread, its process's tracer for the
whole move (seize, dump, then the verdict's kill or release). Started anew for every move,
that thread cost 0.3-0.5 ms between the `dump` and the seize (bench/results-move.md,
branch move-small2), and the node's event loop waits through that time (the seize is
made before `dump`'s handler returns). A kept thread wakes from a queue instead.

A thread is kept only when it traces nothing: `fn` says so (True: its process was
released, or killed and its end consumed). Else it ends, as every move's thread did
before, and the kernel lets go of what it still traced: a process that died under it (a
move that failed half way) is then reaped by its parent and its end reported, where a
kept tracer would hold its end for ever. A thread idle for IDLE_TIMEOUT ends; at most
MAX_IDLE wait. `fn` must not raise (a move's thread catches everything itself); if it
does, the error is logged and the thread ends.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("bpslave")

IDLE_TIMEOUT = 60.0
MAX_IDLE = 4


class MoveThreads:
    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()
        self.started = 0                    # threads started so far (tests)

    def run(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            q = self._idle.pop() if self._idle else None
        if q is None:
            q = queue.SimpleQueue()
            self.started += 1
            threading.Thread(target=self._loop, args=(q,), name=f"move-{self.started}",
                             daemon=True).start()
        q.put((fn, args))

    def _loop(self, q: queue.SimpleQueue) -> None:
        while True:
            try:
                fn, args = q.get(timeout=IDLE_TIMEOUT)
            except queue.Empty:
                with self._lock:
                    if q in self._idle:     # else `run` just took it: its work is coming
                        self._idle.remove(q)
                        return
                continue
            try:
                keep = fn(*args) is True
            except BaseException:           # noqa: BLE001 (logged; the thread ends)
                log.exception("a move's thread failed")
                keep = False
            finally:
                del fn, args
            if not keep:
                return
            with self._lock:
                if len(self._idle) >= MAX_IDLE:
                    return
                self._idle.append(q)

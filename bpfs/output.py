"""What a process the master started itself wrote: stdout and stderr, kept for /bproc.

`ProcOutput`, for processes started by `exec` on nodes/N/ctl: stdout and stderr kept
as two bounded rings of the newest OUTPUT_CAPACITY bytes each; a stream is at EOF once
the process has ended *and* its link delivered everything (`link_done`). The master
(bpfs/master/exec.py) feeds and closes the links; the fs layer reads with per-handle
offsets; model.Cluster tells its subscribers of every change (`notify`).
"""

from __future__ import annotations

from typing import Callable

OUTPUT_CAPACITY = 1 << 20           # bytes kept per output stream of a process
OUTPUT_STREAMS = ("stdout", "stderr")


class OutputRing:
    """What a process wrote to one stream: the newest `capacity` bytes, by absolute offset.

    Offsets count every byte ever received; `first` is the oldest one kept, `end` the
    next to come. A reader keeps its own offset; one that falls more than `capacity`
    behind skips what was dropped (as events readers do). EOF: `closed` and offset at
    `end`. `eof_read` records that someone has read it to EOF.
    """

    def __init__(self, capacity: int = OUTPUT_CAPACITY) -> None:
        self.capacity = capacity
        self._buf = bytearray()
        self.first = 0
        self.link_done = False          # the link is over (EOF), or will never come
        self.closed = False             # nothing more will be appended
        self.eof_read = False

    @property
    def end(self) -> int:
        return self.first + len(self._buf)

    def append(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if len(data) >= self.capacity:
            self.first += len(self._buf) + len(data) - self.capacity
            self._buf = bytearray(data[-self.capacity:])
            return
        self._buf += data
        excess = len(self._buf) - self.capacity
        if excess > 0:
            del self._buf[:excess]
            self.first += excess

    def read(self, offset: int, size: int) -> tuple[bytes, int]:
        """Up to `size` bytes from `offset` (or the oldest kept), and the offset after them."""
        start = max(offset, self.first)
        i = start - self.first
        data = bytes(self._buf[i:i + size])
        return data, start + len(data)

    def at_eof(self, offset: int) -> bool:
        return self.closed and offset >= self.end


class ProcOutput:
    """stdout and stderr of a process the master started itself (see the module doc)."""

    def __init__(self, capacity: int = OUTPUT_CAPACITY,
                 notify: Callable[[], None] = lambda: None) -> None:
        self.streams = {name: OutputRing(capacity) for name in OUTPUT_STREAMS}
        self.notify = notify
        self.ended = False

    def append(self, name: str, data: bytes) -> None:
        self.streams[name].append(data)
        self.notify()

    def link_over(self, name: str) -> None:
        """The stream's link reached EOF or will never come."""
        self.streams[name].link_done = True
        self._update()

    def end(self) -> None:
        """The process has ended (or never ran): streams close as their links finish."""
        self.ended = True
        self._update()

    def close(self) -> None:
        """Give up on every link (a bound was reached): everything is at EOF now."""
        self.ended = True
        for ring in self.streams.values():
            ring.link_done = True
        self._update()

    def _update(self) -> None:
        for ring in self.streams.values():
            if self.ended and ring.link_done:
                ring.closed = True
        self.notify()

    @property
    def all_read(self) -> bool:
        return all(ring.eof_read for ring in self.streams.values())

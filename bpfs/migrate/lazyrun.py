"""A run of a stopped process's memory that is read when it is sent, not at the dump.

    run = LazyRun(pid, addr, size)     len(run) == size; nothing read yet
    run.cut(off, n) -> LazyRun         a part of it, still unread
    run.read() -> bytearray            its bytes now (process_vm_readv, straight into it)
    materialize(buf) -> buffer         a LazyRun read, anything else as it is

Why: a moved process's image was read whole (process_vm_readv of every page into one
populated buffer, then a scan for zero blocks) before its first byte was sent, and at
100 MB that dump cost as much as the transfer (bench/results-move.md). A process that
moves stays stopped until its verdict, so its memory does not change meanwhile: its big
anonymous runs go in the image as their address and size only, and each piece of them is
read when it is sent, while the pieces before it travel and the target writes them.
Such runs travel whole (no zero blocks left out: that needs the bytes before the header,
which lists the runs); small runs and private file pages are read and sifted as before.

Errors: read() raises MigrateError (ESRCH the process is gone, EFAULT a short read).
"""

from __future__ import annotations

import ctypes
from typing import Any

from bpfs.migrate import ptrace as pt

LAZY_MIN = 2 << 20          # anonymous runs from this size are read as they are sent


class LazyRun:
    __slots__ = ("pid", "addr", "size")

    def __init__(self, pid: int, addr: int, size: int) -> None:
        self.pid, self.addr, self.size = pid, addr, size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"LazyRun(pid={self.pid}, addr={self.addr:#x}, size={self.size})"

    def cut(self, off: int, n: int) -> "LazyRun":
        return LazyRun(self.pid, self.addr + off, max(0, min(n, self.size - off)))

    def read(self) -> bytearray:
        buf = bytearray(self.size)
        if self.size:
            pt.read_into(self.pid, [(self.addr, self.size)],
                         ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        return buf


def materialize(buf: object) -> object:
    """A LazyRun's bytes (read now); any other buffer as it is."""
    return buf.read() if isinstance(buf, LazyRun) else buf


def page_runs(image: Any) -> list[tuple[int, object]]:
    """The image's (address, bytes) runs, its LazyRuns read now: for a restore straight
    from a dump (the engine used without a cluster), where nothing was sent."""
    return [(addr, materialize(data)) for r in image.regions for addr, data in r.pages]

"""The daemons' heap: a move's buffers reused from one move to the next, not faulted in
afresh each time (`keep_buffers`, called once at a daemon's start).

A move of a 1 MB process makes several buffers of about its size in each daemon it
crosses (the dump's read, its frame, the frame received, a join) and frees them after.
glibc serves a buffer beyond its mmap threshold (128 KiB at first, raised to the size of
the last such buffer freed) from a fresh mapping, and a smaller one from the heap, whose
top it gives back to the kernel once more than twice that threshold is free there: the
two or three 1 MB buffers of a move, freed together, went back, and the next move faulted
every page in again, a trap a page (0.5-0.9 ms a MB on this machine, a VM; joining a
1 MB image took 0.6-0.9 ms so, 0.14-0.28 ms from warm memory: bench/results-move.md).

With both thresholds fixed, a buffer below MMAP_THRESHOLD comes from the heap, and up to
TRIM_THRESHOLD of free heap stays mapped for the next. That includes a big image's 8 MiB
pieces (a `part` or `chunk` the source reads with process_vm_readv, a frame the master
or a node receives): from fresh mappings, each piece's 2048 pages were faulted in and
zeroed afresh, about 2-3 ms a MB at the source alone (240-320 ms for 96 MB read in 8 MiB
pieces, against 28-67 ms from warm heap memory, load 4.6), as much as the target's own
fresh pages. TRIM_THRESHOLD holds the pieces one move has in flight (read ahead, queued,
being sent: AHEAD + 2 of them) with room to spare. Cost: that much more resident memory,
at most, per malloc arena of a daemon that moved processes (trio's thread and a move's
thread, which the next move's thread takes over); buffers from MMAP_THRESHOLD up (an image
put together whole uses its own mapping anyway) are mappings as before.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt(3) parameters (glibc)
MMAP_THRESHOLD = 16 << 20      # above a part's frame (8 MiB and its head); glibc's most: 32 MiB
TRIM_THRESHOLD = 64 << 20


def keep_buffers() -> bool:
    """Fix glibc's thresholds (above); False if this C library has no mallopt or refused
    (nothing changed then: only slower)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

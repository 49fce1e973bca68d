"""A big image in pieces: cut for the wire without a copy, put together with one.

    for piece in pieces(parts, PART): ...          views of `parts` (dumps_parts), <= PART
    buf = ImageBuffer(total); buf.add(piece) ...   then buf.view(): the image, contiguous

Why: a moved process's image (100 MB, 1 GB) went through several copies at each hop:
joined, sliced into pieces, joined again where it arrived, each copy into fresh memory
whose page faults cost more than the copy (bench/results-move.md). `pieces` cuts the
dump's own buffers; `ImageBuffer` is one mapping of the announced size, faulted in as
pieces arrive (so a size that lies costs only address space), and the image is a view of
it: loads() takes its runs as views. In 4 KB pages: 1 GB received at 640-660 MB/s here,
in huge pages (MADV_HUGEPAGE) at 200-340 MB/s: with THP defrag "madvise" each huge page
fault may wait for compaction on a machine whose memory others use (kernel 6.18).

Errors: ImageBuffer raises MigrateError EFBIG when the pieces go beyond the size announced,
ENOMEM when the mapping cannot be made, EINVAL from view() when pieces are missing.
"""

from __future__ import annotations

import errno
import mmap
from typing import Iterable, Iterator

from bpfs.migrate.errors import MigrateError
from bpfs.migrate.imageframe import Buffer


def pieces(parts: Iterable[Buffer], size: int) -> Iterator[Buffer]:
    """The bytes of `parts`, in order, as buffers of at most `size` bytes, none empty: the
    big parts as views of themselves, the small ones gathered into bytes (one copy)."""
    small: list[Buffer] = []
    held = 0
    for part in parts:
        view = memoryview(part).cast("B")
        if len(view) >= size // 4:
            if small:
                yield b"".join(small)
                small, held = [], 0
            for at in range(0, len(view), size):
                yield view[at:at + size]
            continue
        if held + len(view) > size:
            yield b"".join(small)
            small, held = [], 0
        if len(view):
            small.append(view)
            held += len(view)
    if small:
        yield b"".join(small)


class ImageBuffer:
    """`total` bytes arriving in pieces, in order."""

    def __init__(self, total: int) -> None:
        self.total, self.size = total, 0
        try:
            self._map = mmap.mmap(-1, max(total, 1), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError, OverflowError):
            raise MigrateError(errno.ENOMEM, f"no room for an image of {total} bytes") from None

    def add(self, data: Buffer) -> None:
        end = self.size + len(data)
        if end > self.total:
            raise MigrateError(errno.EFBIG, f"image beyond the {self.total} bytes announced")
        self._map[self.size:end] = data
        self.size = end

    def view(self) -> memoryview:
        """The whole image (EINVAL if pieces are missing); valid while this buffer lives."""
        if self.size != self.total:
            raise MigrateError(errno.EINVAL, f"image of {self.size} bytes, {self.total} "
                               "announced")
        return memoryview(self._map)[:self.total]



def gather(held: "list[Buffer] | ImageBuffer", data: Buffer, total: int | None,
           bound: int) -> "list[Buffer] | ImageBuffer":
    """One more piece of an image coming in pieces (a move's, either way): the first
    one that announces its `total` gets a buffer it is put into as it comes; without one
    they are kept as they are. EFBIG beyond `bound` bytes (MigrateError)."""
    if isinstance(held, list) and not held and total is not None:
        if total > bound:
            raise MigrateError(errno.EFBIG, f"an image of {total} bytes is too large")
        held = ImageBuffer(total)
    if isinstance(held, ImageBuffer):
        held.add(data)
        return held
    if sum(map(len, held)) + len(data) > bound:
        raise MigrateError(errno.EFBIG, "the image is too large")
    held.append(data)
    return held


def whole(held: "list[Buffer] | ImageBuffer", last: Buffer, bound: int) -> Buffer:
    """The image: what was gathered, then its `last` piece (EFBIG, EINVAL)."""
    held = gather(held, last, None, bound)
    return held.view() if isinstance(held, ImageBuffer) else b"".join(held)

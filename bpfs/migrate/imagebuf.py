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

An image can also be used before it is whole (`Incoming`): pieces arrive at known offsets,
in order; once the header has come, `image()` decodes it (the runs are views of the
mapping, never faulted in unless pieces are copied there) and `runs_in(at, data)` says
where each byte of a piece goes in the process (its address): the node writes pieces
straight into the process it builds, the master forwards them and keeps the header only.

Errors: ImageBuffer raises MigrateError EFBIG when the pieces go beyond the size announced,
ENOMEM when the mapping cannot be made, EINVAL from view() when pieces are missing.
"""

from __future__ import annotations

import bisect
import errno
import mmap
from typing import TYPE_CHECKING, Iterable, Iterator

from bpfs.migrate import imageframe
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.imageframe import Buffer
from bpfs.migrate.lazyrun import LazyRun

if TYPE_CHECKING:
    from bpfs.migrate.image import Image


def pieces(parts: Iterable[Buffer], size: int) -> Iterator[Buffer]:
    """The bytes of `parts`, in order, as buffers of at most `size` bytes, none empty: the
    big parts as views of themselves, the small ones gathered into bytes (one copy), a
    LazyRun as LazyRuns (the sender reads each: lazyrun.materialize)."""
    small: list[Buffer] = []
    held = 0
    for part in parts:
        if isinstance(part, LazyRun):        # read by the sender, piece by piece
            if small:
                yield b"".join(small)
                small, held = [], 0
            for at in range(0, len(part), size):
                yield part.cut(at, size)     # type: ignore[misc]
            continue
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


class Incoming:
    """An image of `total` bytes arriving in pieces, in order, usable before it is whole.

    `take(at, data)` checks a piece (EPROTO out of order, EFBIG beyond the total) and
    copies into the mapping only what is needed: the header, or everything once
    `keep_all` is set (a restore that must wait for the whole image). `image()` is the
    decoded image once the header is in (None before: EINVAL if it is corrupt).
    """

    def __init__(self, total: int, bound: int) -> None:
        if total > bound:
            raise MigrateError(errno.EFBIG, f"an image of {total} bytes is too large")
        self.buf = ImageBuffer(total)
        self.total, self.got = total, 0
        self.keep_all = False
        self.header_end: int | None = None
        self._image: "Image | None" = None
        self._starts: list[int] = []            # each run's offset in the image
        self._runs: list[tuple[int, int]] = []  # each run's (address, size)

    @property
    def complete(self) -> bool:
        return self.got == self.total

    def take(self, at: int, data: Buffer) -> None:
        if at != self.got:
            raise MigrateError(errno.EPROTO, f"a piece at byte {at}, where {self.got} was "
                               "expected")
        view = memoryview(data).cast("B")
        end, head = at + len(view), imageframe.HEAD.size
        if end > self.total:
            raise MigrateError(errno.EFBIG, f"image beyond the {self.total} bytes announced")
        if self.header_end is None and at < head and end >= head:
            self.buf._map[at:head] = view[:head - at]
            size = imageframe.HEAD.unpack_from(self.buf._map)[1]
            if size > self.total - head:
                raise MigrateError(errno.EINVAL, "corrupt image: header longer than the "
                                   "image")
            self.header_end = head + size
        keep = end if self.keep_all else min(end, self.header_end or head)
        if keep > at:
            self.buf._map[at:keep] = view[:keep - at]
        self.got = end

    def keep_everything(self, first: Buffer) -> None:
        """From now on every piece is put in place, and `first`, the only piece so far,
        too (for a restore that must wait for the whole image)."""
        if self.got != len(first):
            raise MigrateError(errno.EINVAL, "more than the first piece came already")
        self.buf._map[:self.got] = memoryview(first).cast("B")
        self.keep_all = True

    def image(self) -> "Image | None":
        """The decoded image (its runs views of the mapping), once the header is in."""
        if self._image is None and self.header_end is not None \
                and self.got >= self.header_end:
            from bpfs.migrate.image import loads
            # the pages may be unwritten yet: loads reads only the header
            image = loads(memoryview(self.buf._map)[:self.total])
            pos = self.header_end
            for region in image.regions:
                for addr, data in region.pages:
                    self._starts.append(pos)
                    self._runs.append((addr, len(data)))
                    pos += len(data)
            self._image = image
        return self._image

    def runs_in(self, at: int, data: Buffer) -> list[tuple[int, memoryview]]:
        """(address, bytes) of the process's memory that the piece `data` at offset `at`
        holds, as views of `data` (the header's bytes in it left out); image() first."""
        view = memoryview(data).cast("B")
        end = at + len(view)
        out: list[tuple[int, memoryview]] = []
        k = max(bisect.bisect_right(self._starts, at) - 1, 0)
        while k < len(self._starts) and self._starts[k] < end:
            start, (addr, size) = self._starts[k], self._runs[k]
            lo, hi = max(start, at), min(start + size, end)
            if lo < hi:
                out.append((addr + lo - start, view[lo - at:hi - at]))
            k += 1
        return out

    def view(self) -> memoryview:
        """The whole image, once every piece came and was kept (EINVAL otherwise)."""
        if not self.keep_all and self.total > (self.header_end or 0):
            raise MigrateError(errno.EINVAL, "the image's pages were not kept")
        if not self.complete:
            raise MigrateError(errno.EINVAL, f"image of {self.got} bytes, {self.total} "
                               "announced")
        return memoryview(self.buf._map)[:self.total]

"""One image, many ranks: BProc's vexecmove placeholder in an image's environment.

Kept apart from the format (`image`), which it only edits: the rank goes over the Xs of
`BPROC_RANK=XXXXXXX` in each node's copy of one dump.
"""

from __future__ import annotations

import errno

from bpfs.migrate.errors import MigrateError
from bpfs.migrate.image import Image

RANK_MARK = b"BPROC_RANK=XXXXXXX"
RANK_DIGITS = 7


def set_rank(img: Image, rank: int) -> bool:
    """Write `rank` over the Xs of `BPROC_RANK=XXXXXXX` in the image's environment.

    BProc's vexecmove: one exec and one dump serve every rank of a multi-node run, the
    environment holding the placeholder; each node's copy gets its own rank (7 digits,
    as bproc's kernel wrote it). Only a whole environment string counts, and only inside
    mm.env_start..env_end (argv may hold the same text). False if there is none.
    """
    if not 0 <= rank < 10 ** RANK_DIGITS:
        raise MigrateError(errno.EINVAL, f"rank {rank} does not fit in {RANK_DIGITS} digits")
    lo, hi = img.mm["env_start"], img.mm["env_end"]
    digits = f"{rank:0{RANK_DIGITS}d}".encode()
    for region in img.regions:
        if region.end <= lo or region.start >= hi:
            continue
        for i, (addr, run) in enumerate(region.pages):
            data = bytes(run)     # a loaded image's runs are views (imageframe)
            at = data.find(RANK_MARK)
            while at >= 0:
                where = addr + at
                end = where + len(RANK_MARK)
                if lo <= where and end < hi and _byte_at(img, where - 1) in (0, None) \
                        and _byte_at(img, end) == 0:
                    start = at + len(RANK_MARK) - RANK_DIGITS
                    region.pages[i] = (addr, data[:start] + digits + data[at + len(RANK_MARK):])
                    return True
                at = data.find(RANK_MARK, at + 1)
    return False


def _byte_at(img: Image, addr: int) -> int | None:
    """The image's byte at `addr` (0 where no run covers it: zero pages do not travel);
    None if no region maps it."""
    for region in img.regions:
        if region.start <= addr < region.end:
            for start, data in region.pages:
                if start <= addr < start + len(data):
                    return data[addr - start]
            return 0
    return None

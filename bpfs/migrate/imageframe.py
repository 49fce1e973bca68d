"""The outer frame of a version 4 image: a msgpack header, then the page bytes raw.

    image4 = FRAME (8 bytes) | header length (u64, little-endian) | header | pages
    header = the image map of bpfs.migrate.image's grammar, each run as [addr, size]
    pages  = every run's bytes, region after region, run after run, nothing else

Why: a gigabyte of memory went through msgpack twice, packed into one growing buffer and
unpacked into new bytes objects, each time a copy into fresh memory (page faults included,
about 0.5 ms a MB here). Raw, a dump's runs are joined once (or sent part by part: `parts`)
and a loaded image's runs are views of the bytes received. Images of versions 2 and 3 are a
plain msgpack map whose runs are [addr, bin]: `split` returns None for them.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

from bpfs.migrate.errors import corrupt

FRAME = b"bpfsimg\x04"
HEAD = struct.Struct("<8sQ")
Buffer = bytes | bytearray | memoryview


def parts(header: bytes, runs: Iterable[Buffer]) -> list[Buffer]:
    """The image as buffers to write one after the other (no copy of the runs)."""
    return [HEAD.pack(FRAME, len(header)), header, *runs]


def split(data: Buffer) -> tuple[memoryview, memoryview] | None:
    """(header, pages) views of a framed image; None if `data` is not framed."""
    view = memoryview(data).cast("B")
    if len(view) < HEAD.size or view[:len(FRAME)] != FRAME:
        return None
    size = HEAD.unpack_from(view)[1]
    if size > len(view) - HEAD.size:
        raise corrupt("header longer than the image")
    return view[HEAD.size:HEAD.size + size], view[HEAD.size + size:]


def attach(obj: Any, pages: memoryview) -> None:
    """Replace each run's [addr, size] in the decoded header by [addr, view of its bytes].

    Every run must be a pair of ints whose sizes use the page section exactly, else
    corrupt; the image's own checks then see the runs as a version 3 image had them.
    """
    regions = obj.get("regions") if type(obj) is dict else None
    if type(regions) is not list:
        raise corrupt("regions is not a list")
    pos = 0
    for i, region in enumerate(regions):
        runs = region.get("pages") if type(region) is dict else None
        if type(runs) is not list:
            raise corrupt(f"regions[{i}].pages is not a list")
        for j, run in enumerate(runs):
            if not (type(run) is list and len(run) == 2 and type(run[1]) is int
                    and 0 < run[1] <= len(pages) - pos):
                raise corrupt(f"regions[{i}].pages[{j}] is not [addr, size] within the pages")
            run[1], pos = pages[pos:pos + run[1]], pos + run[1]
    if pos != len(pages):
        raise corrupt(f"{len(pages) - pos} page bytes belong to no run")

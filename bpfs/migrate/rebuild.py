"""The syscall batches that rebuild an `Image` inside a process, shared by the node's restore
(`bpfs.migrate.restore`: a fresh clone of its helper) and the master's return into a ghost
(`bpfs.migrate.ghost_restore`: the ghost itself).

Each function adds calls to a `stub.Batch` the target process then runs itself; none reads
or writes the target. What differs between the two callers is passed in: where the mapped
files' descriptors are in the target (`fd_of`), which exe_fd PR_SET_MM_MAP gets, and where
the target's vvar/vdso are now. The checks an image must pass before any of it runs are
here too (`check_reserved`, `refuse_setid`, `rlimit_wanted`).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import Sequence

from bpfs.migrate import image as imagefmt, stub
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.helper import (
    BOUNCE, MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_GROWSDOWN, MAP_PRIVATE, MOVABLE, MREMAP_FIXED,
    MREMAP_MAYMOVE, PR_SET_MM, PR_SET_MM_MAP, PR_SET_NAME, PROT_WRITE, RESERVED)
from bpfs.migrate.image import Image, Region

KEEP_EXE = 0xFFFFFFFF   # PR_SET_MM_MAP's exe_fd -1: mm->exe_file stays (needs no capability)


def mm_map(a: stub.Batch, image: Image, exe_fd: int) -> None:
    """PR_SET_MM_MAP: the image's code/data/brk/stack/arg/env bounds and auxv; `exe_fd`
    the new exe file (the node's, which needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE) or
    KEEP_EXE (allowed to anyone)."""
    mm = image.mm
    auxv = a.data(image.auxv)
    fields = [mm[k] for k in imagefmt.MM_KEYS]
    prctl_map = struct.pack("<12QII", *fields, auxv, len(image.auxv), exe_fd)
    a.call("prctl", PR_SET_MM, PR_SET_MM_MAP, a.data(prctl_map), len(prctl_map), 0,
           what="PR_SET_MM_MAP (" + ", ".join(f"{k} {v:#x}" for k, v in zip(
               imagefmt.MM_KEYS, fields)) + f", auxv {len(image.auxv)} bytes)")


def move_special(a: stub.Batch, have: dict[str, tuple[int, int]], image: Image) -> None:
    """mremap vvar/vvar_vclock/vdso from `have` to the image's addresses, via BOUNCE if
    ranges meet."""
    moves = [(have[n], image.special[n]) for n in MOVABLE if n in have and n in image.special]
    if all(src == dst for src, dst in moves):
        return
    clash = any(d[0] < s[1] and s[0] < d[1] for _, d in moves for s, _ in moves)
    if clash:
        base = min(s[0] for s, _ in moves)
        bounced = []
        for src, dst in moves:
            tmp = BOUNCE + src[0] - base
            a.call("mremap", src[0], src[1] - src[0], src[1] - src[0],
                   MREMAP_MAYMOVE | MREMAP_FIXED, tmp)
            bounced.append(((tmp, tmp + src[1] - src[0]), dst))
        moves = bounced
    for src, dst in moves:
        a.call("mremap", src[0], src[1] - src[0], src[1] - src[0],
               MREMAP_MAYMOVE | MREMAP_FIXED, dst[0])


def map_regions(a: stub.Batch, image: Image, fd_of: Sequence[int],
                regions: Sequence[Region] | None = None, noreplace: bool = False
                ) -> list[Region]:
    """mmap every region (or those of `regions`; file i from the target's fd `fd_of[i]`);
    those with pages to write get PROT_WRITE until `protect`. Returns those. `noreplace`:
    MAP_FIXED_NOREPLACE, so a mapping already there is never replaced (EEXIST instead)."""
    writable = []
    fixed = MAP_FIXED | (MAP_FIXED_NOREPLACE if noreplace else 0)
    for r in image.regions if regions is None else regions:
        prot = r.prot
        if r.pages and not prot & PROT_WRITE:
            prot |= PROT_WRITE
            writable.append(r)
        if r.kind == "anon":
            flags = MAP_PRIVATE | fixed | MAP_ANONYMOUS | (MAP_GROWSDOWN if r.growsdown
                                                           else 0)
            a.call("mmap", r.start, r.end - r.start, prot, flags, -1, 0)
        else:
            a.call("mmap", r.start, r.end - r.start, prot, MAP_PRIVATE | fixed,
                   fd_of[r.file], r.offset)
    return writable


def process_state(a: stub.Batch, image: Image) -> None:
    """Dispositions (the image's non-default ones: the target's others must be default
    already), personality, umask, name, robust list, clear-child-tid address."""
    for sig, handler, flags, restorer, mask in image.sigactions:
        a.call("rt_sigaction", sig, a.data(struct.pack("<4Q", handler, flags, restorer,
                                                       mask)), 0, 8)
    a.call("personality", image.personality)
    a.call("umask", image.umask)
    a.call("prctl", PR_SET_NAME, a.cstr(image.comm), what="PR_SET_NAME")
    if image.robust:
        a.call("set_robust_list", image.robust[0], image.robust[1])
    if image.tid_address:
        a.call("set_tid_address", image.tid_address)


def protect(a: stub.Batch, image: Image, writable: list[Region]) -> None:
    """The part after the page writes: final protections, then rseq (after the writes, so
    the kernel's cpu_id update stays)."""
    for r in writable:
        a.call("mprotect", r.start, r.end - r.start, r.prot)
    if image.rseq:
        a.call("rseq", image.rseq[0], image.rseq[1], 0, image.rseq[2])


def check_reserved(image: Image) -> None:
    lo, hi = RESERVED
    for r in image.regions:
        if r.start < hi and lo < r.end:
            raise MigrateError(errno.EOPNOTSUPP, f"image maps {r.start:#x}-{r.end:#x}, which "
                               "this restorer reserves for its scratch area")


def rlimit_wanted(soft: int, hard: int, own_hard: int) -> tuple[int, int]:
    """The image's limit clamped to what the target may raise to.

    A hard limit can only be raised with CAP_SYS_RESOURCE (root in a container may lack it),
    so limits above the hard limit the target inherited from the helper are lowered to it.
    """
    hard = min(hard, own_hard)
    return min(soft, hard), hard


def refuse_setid(fd: int, name: str) -> None:
    """EPERM for a set-user-ID, set-group-ID or file-capability executable (as on the master)."""
    mode = os.fstat(fd).st_mode
    try:
        os.getxattr(fd, "security.capability")
        caps = True
    except OSError:
        caps = False
    if mode & stat.S_ISUID or (mode & stat.S_ISGID and mode & stat.S_IXGRP) or caps:
        raise MigrateError(errno.EPERM, f"{name}: set-ID or file-capability programs cannot "
                           "migrate")

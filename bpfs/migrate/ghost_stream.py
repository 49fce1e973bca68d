"""An image streaming back into its ghost: its memory built in the ghost as the pieces
come, the ghost still a ghost until the last byte is in (`Tracer.stream_in`, `write_in`,
`abort_in`; then `restore_in` does the rest).

    stream_in(pid, image)     image: the header (its runs not there yet): the halted ghost
                              maps the image's regions beside its own pages, writable, and
                              goes back to sleep in pause(); (bytes mapped, bytes later)
    write_in(pid, runs)       (address, bytes) of the image, in order: written straight
                              into those mappings (process_vm_writev, from the frame)
    restore_in(pid, image, fds, ...)   the rest, with the same image: the point of no
                              return is where it was (its batch A)
    abort_in(pid)             what was built unmapped, the files closed: the ghost as before

Why: back from a node, the image was put together in the master's fresh memory and then
written into the ghost's fresh memory: two first touches of every page (1.3-3 s a GB here),
one after the other, the second only once the last byte had come. Built as it comes, each
byte is written once, into the page the process will use, while the next piece travels.

Why the ghost stays a ghost meanwhile: a move can still fail (the source fails half way, a
piece out of order, beyond the total, none for 30 s): the process must then go on where it
was, and its ghost with it, signals forwarded, its end the real one. So nothing of the
ghost's own is touched before `restore_in`'s batch A: the image's regions are mapped with
MAP_FIXED_NOREPLACE *beside* the ghost's pages (its argument pages, a rename's page,
vvar/vdso), and the ghost sleeps in pause() as before, its signals reported as before. A
region that overlaps one of the ghost's pages (its stack, where the argument pages of the
same program are kept; a library where a rename's page went) cannot be mapped yet: its
runs are kept (copied, as they come) and written at the end, after batch A has mapped it,
as `restore_in` writes every run without a stream. The begin's checks are `restore_in`'s
(uid, room, the files: ESTALE, EPERM, EACCES; the kernel and CPU), so a failure there
fails the move as restore_in would; the mapped files go into the ghost at the begin and
stay open there (the regions mapped at the end need them) until batch A closes them.

Runs are the image's (its header says where each goes; `loads` checked that every run lies
inside its region and that regions do not overlap), each one within one region: written if
that region is mapped, kept if it comes later; anything else is EFAULT. Every function runs
in the tracer thread (`Streaming` is mixed into `Ghosts`); the writes too, so the ghost
written to is the tracee held (a pid is reused only once the tracer consumed its end).
"""

from __future__ import annotations

import bisect
import errno
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from bpfs.migrate import ghost_files, ghost_restore, hostinfo, procfs, rebuild, stub
from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.helper import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PROT_RWX,
                                 SCRATCH, SCRATCH_SIZE)
from bpfs.migrate.image import Image, Region
from bpfs.migrate.tracee import GHOST, Future

log = logging.getLogger("bpfs.migrate.ghost")


@dataclass
class Built:
    """What `begin` made in a ghost: the regions mapped now (`mapped`, `writable` those
    given PROT_WRITE for their pages), those that come at the end (`later`) and their runs
    as they came (`kept`), the mapped files' fds in the ghost (`inside`)."""

    image: Image
    mapped: list[Region]
    later: list[Region]
    writable: list[Region]
    inside: list[int]
    kept: list[tuple[int, bytes]] = field(default_factory=list)
    written: int = 0                        # bytes written into the ghost as they came
    _starts: list[int] = field(default_factory=list)
    _regions: list[Region] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._regions = sorted(self.image.regions, key=lambda r: r.start)
        self._starts = [r.start for r in self._regions]
        self._now = {id(r) for r in self.mapped}

    @property
    def kept_bytes(self) -> int:
        return sum(len(d) for _, d in self.kept)

    def summary(self) -> tuple[int, int]:
        """(bytes of runs written as they come, bytes of runs kept for the end)."""
        def runs(regions: list[Region]) -> int:
            return sum(len(d) for r in regions for _, d in r.pages)
        return runs(self.mapped), runs(self.later)

    def region_of(self, addr: int, size: int) -> Region:
        k = bisect.bisect_right(self._starts, addr) - 1
        if k < 0 or addr + size > self._regions[k].end:
            raise MigrateError(errno.EFAULT, f"{size} bytes at {addr:#x}: in no region of "
                               "the image")
        return self._regions[k]

    def mapped_now(self, r: Region) -> bool:
        return id(r) in self._now


def split(regions: Sequence[Region], own: list[tuple[int, int]]
          ) -> tuple[list[Region], list[Region]]:
    """(regions that can be mapped beside the ghost's own pages `own`, those that meet
    one of them)."""
    now, later = [], []
    for r in regions:
        meets = any(lo < r.end and r.start < hi for lo, hi in own)
        (later if meets else now).append(r)
    return now, later


def own_ranges(pid: int) -> list[tuple[int, int]]:
    """The ghost's mappings now ([vsyscall], above user space, left out)."""
    maps = procfs.parse_maps(procfs.read_text(pid, "maps"))
    return [(m.start, m.end) for m in maps if m.path != "[vsyscall]"]


def begin(pid: int, regs: pt.Regs, gadget: int, signals: list[int], plan: Any) -> Built:
    """In the halted ghost `pid` (`plan`: ghost_restore.prepare's, its files ours): the
    checks of the module doc, the files into it, the regions that can be mapped mapped.
    A failure leaves it as it was (halted) and raises MigrateError (or gp.Gone)."""
    image = plan.image
    xstate = pt.get_xstate(pid)
    hostinfo.check_compatible(image.host, image.special,
                              hostinfo.host(pt.xstate_xcr0(xstate), len(xstate)))
    now, later = split(image.regions, own_ranges(pid))
    ghost_restore._check(pid, "mapping the scratch area", gp.inject(
        pid, regs, gadget, signals, pt.SYS["mmap"], SCRATCH, SCRATCH_SIZE, PROT_RWX,
        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0))
    inside: list[int] = []
    try:
        stub.install(pid, SCRATCH)
        ghost_restore._check_access(pid, regs, signals, image)
        inside = ghost_files.send_into(pid, regs, gadget, signals,
                                       SCRATCH + ghost_restore.CHANNEL, plan.files)
        writable = _map(pid, regs, gadget, signals, image, now, inside)
    except gp.Gone:
        raise
    except BaseException:
        ghost_files.close_in(pid, regs, gadget, signals, inside)
        raise
    finally:
        _unmap_scratch(pid, regs, gadget, signals)
    return Built(image, now, later, writable, inside)


def _map(pid: int, regs: pt.Regs, gadget: int, signals: list[int], image: Image,
         regions: list[Region], inside: list[int]) -> list[Region]:
    """The regions mapped (MAP_FIXED_NOREPLACE, one batch); on failure those mapped
    already unmapped again."""
    a = stub.Batch(SCRATCH)
    writable = rebuild.map_regions(a, image, inside, regions, noreplace=True)
    pt.write_memory(pid, a.writes())
    stub.start(pid, regs, SCRATCH, a.count())
    try:
        ghost_restore.run(pid, a, signals)
    except MigrateError:
        done = a.entry_at(pt.getregs(pid).rbx)
        unmap(pid, regs, gadget, signals, regions[:max(done, 0)])
        raise
    return writable


def _unmap_scratch(pid: int, regs: pt.Regs, gadget: int, signals: list[int]) -> None:
    try:
        gp.inject(pid, regs, gadget, signals, pt.SYS["munmap"], SCRATCH, SCRATCH_SIZE)
    except MigrateError:
        pass    # a stale scratch mapping is no harm to a ghost (restore_in maps it anew)


def unmap(pid: int, regs: pt.Regs, gadget: int, signals: list[int],
          regions: Sequence[Region]) -> None:
    for r in regions:
        ghost_restore._check(pid, f"munmap {r.start:#x}-{r.end:#x}", gp.inject(
            pid, regs, gadget, signals, pt.SYS["munmap"], r.start, r.end - r.start))


def unbuild(pid: int, regs: pt.Regs, gadget: int, signals: list[int], built: Built) -> None:
    """The halted ghost as it was before `begin`: what it mapped unmapped, its files
    closed."""
    unmap(pid, regs, gadget, signals, built.mapped)
    ghost_files.close_in(pid, regs, gadget, signals, built.inside)
    built.mapped, built.inside, built.kept = [], [], []


def write(pid: int, built: Built, runs: Sequence[tuple[int, Any]]) -> None:
    """(address, bytes) into the ghost's new mappings, or kept for the end (module doc)."""
    now = []
    for addr, data in runs:
        size = len(data)
        if not size:
            continue
        if built.mapped_now(built.region_of(addr, size)):
            now.append((addr, data))
            built.written += size
        else:
            built.kept.append((addr, bytes(data)))
    if now:
        pt.write_memory(pid, now)


class Streaming:
    """stream_in, write_in and abort_in of `Ghosts` (tracer thread; see the module doc)."""

    tracees: dict[Any, Any]
    building: dict[int, Built]

    def _parked_ghost(self, pid: int, err: int) -> Any:
        raise NotImplementedError

    def _halted(self, t: Any, what: str, step: Any) -> Any:
        raise NotImplementedError

    def stream_in(self, fut: Future, pid: int, image: Image) -> None:
        """EBUSY: a stream into it under way already, or a job-control stop; the checks
        of `restore_in` (its errors); ESRCH as for `fork`. The ghost asleep as before."""
        t = self._parked_ghost(pid, errno.ESRCH)
        if pid in self.building:
            raise MigrateError(errno.EBUSY, f"an image streams into ghost {pid} already", pid)
        if t.stopped or t.stopping or t.stop_sent or t.cont_sent:
            raise MigrateError(errno.EBUSY, f"ghost {pid} is in a job-control stop", pid)
        plan = ghost_restore.prepare(pid, image, None)
        try:
            built = self._halted(t, "stream_in", lambda h: begin(
                t.pid, h.regs, h.gadget, h.signals, plan))
        finally:
            plan.close()
        self.building[pid] = built
        log.debug("ghost %d: %d regions mapped for its image, %d later", pid,
                  len(built.mapped), len(built.later))
        fut.set_result(built.summary())

    def write_in(self, fut: Future, pid: int, runs: list[tuple[int, Any]]) -> None:
        """ESRCH: no image streams into `pid` (it ended, or was aborted); EFAULT: a run
        in no region of the image; process_vm_writev's errors."""
        built = self.building.get(pid)
        if built is None or pid not in self.tracees:
            raise MigrateError(errno.ESRCH, f"no image streams into ghost {pid}", pid)
        write(pid, built, runs)
        fut.set_result(None)

    def abort_in(self, fut: Future, pid: int) -> None:
        """Nothing streaming into `pid` (any more): done. A ghost that is ending or
        gone keeps what it had (it goes with it)."""
        built = self.building.pop(pid, None)
        t = self.tracees.get(pid)
        if built is not None and t is not None and t.state == GHOST and not t.killed:
            self._halted(t, "abort_in", lambda h: unbuild(t.pid, h.regs, h.gadget,
                                                          h.signals, built))
        fut.set_result(None)

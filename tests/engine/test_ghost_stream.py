"""An image streaming back into its ghost (Tracer.stream_in, write_in, abort_in, then
restore_in; bpfs/migrate/ghost_stream.py): the regions built beside the ghost's own pages
while it sleeps on as a ghost, each piece written straight into them, the rest at the end;
a stream that stops half way leaves the ghost exactly as it was. Real processes, real
ptrace (the rig: tests/engine/ghostrig.py).
"""

from __future__ import annotations

import errno
import os
import signal

import pytest

from bpfs.migrate.errors import MigrateError
from bpfs.migrate.ghost_stream import split
from bpfs.migrate.image import Image, Region, dumps
from bpfs.migrate.imagebuf import Incoming
from tests.engine.ghostrig import Rig, asleep, proc_state, until, vm_rss_kb
from tests.engine.test_ghost_fork import fd_count
from tests.engine.test_ghost_restore import pipe, pipes, snapshot, unchanged  # noqa: F401
from tests.engine.test_ghost_restore_moved import counter, take  # noqa: F401

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]

PIECE = 1 << 20
MB = 24


def moved(rig: Rig, counter: str, pipes, mb: int = MB):
    """A counter holding `mb` MB run in its ghost, then moved away as `move` does:
    (pid, its running image, its stdin pipe, its stdout pipe)."""
    pid, img = rig.ghost([counter, str(mb)])
    inp, out = pipe(pipes), pipe(pipes)
    rig.tracer.restore_in(pid, img, {0: inp.r, 1: out.w}).result(10)
    assert out.line() == b"before 1000\n"
    assert until(lambda: proc_state(pid) == "S")   # in read(0)
    return pid, take(rig, pid), inp, out


def stream(rig: Rig, pid: int, img: Image, stop_after: int | None = None
           ) -> tuple[Incoming, tuple[int, int]]:
    """`img` sent as the master gets it from a node: the header first (stream_in), then
    each piece's runs (write_in), PIECE bytes at a time; only `stop_after` pieces."""
    data = dumps(img)
    inc = Incoming(len(data), 1 << 34)
    inc.take(0, data[:PIECE])
    header = inc.image()
    assert header is not None
    summary = rig.tracer.stream_in(pid, header).result(10)
    runs = inc.runs_in(inc.header_end, memoryview(data)[inc.header_end:PIECE])
    rig.tracer.write_in(pid, runs).result(10)
    for k, at in enumerate(range(PIECE, len(data), PIECE)):
        if stop_after is not None and k >= stop_after:
            break
        piece = memoryview(data)[at:at + PIECE]
        inc.take(at, piece)
        rig.tracer.write_in(pid, inc.runs_in(at, piece)).result(10)
    return inc, summary


def test_an_image_streams_into_its_ghost_and_the_process_goes_on(rig: Rig, counter: str,
                                                                  pipes) -> None:
    pid, img, inp, out = moved(rig, counter, pipes)
    rss = vm_rss_kb(pid)
    inc, (now, later) = stream(rig, pid, img)
    assert now >= MB << 20                  # its heap, written as it came
    assert 0 < later < 1 << 20              # its stack: over the ghost's argument pages
    assert rig.tracer.ghosts() == [pid] and asleep(pid)     # a ghost still, meanwhile
    assert vm_rss_kb(pid) - rss >= (MB << 20) >> 10         # in the ghost's own pages
    rig.tracer.restore_in(pid, inc.image()).result(10)
    os.write(inp.w, b"x")
    out.close_w()
    assert out.rest() == b"after 1234 bad 0 got x\n"
    assert rig.bpsh.status(pid) == 7 << 8
    assert rig.rec.exits == {} and rig.tracer.ghosts() == []


def test_a_region_over_a_renamed_ghosts_page_comes_at_the_end(rig: Rig, counter: str,
                                                              pipes) -> None:
    """A rename's page lands where the kernel finds room: regions over it (and the stack,
    over the argument pages) are mapped at the end, their runs kept till then."""
    pid, img, inp, out = moved(rig, counter, pipes, 4)
    rig.tracer.rename(pid, [b"renamed", b"x" * 5000]).result(5)
    inc, (now, later) = stream(rig, pid, img)
    assert now > 4 << 20 and later > 0
    rig.tracer.restore_in(pid, inc.image()).result(10)
    os.write(inp.w, b"y")
    out.close_w()
    assert out.rest() == b"after 1234 bad 0 got y\n"
    assert rig.bpsh.status(pid) == 7 << 8


def test_a_stream_stopped_half_way_leaves_the_ghost_as_it_was(rig: Rig, counter: str,
                                                              pipes) -> None:
    """Aborted after 8 of its pieces: the ghost's maps, fds, command line as before, our
    fds too; it is a ghost (a signal is reported, its end is the one it is given); it can
    take a stream again."""
    pid, img, inp, out = moved(rig, counter, pipes)
    before, ours = snapshot(pid), fd_count()
    stream(rig, pid, img, stop_after=8)
    assert snapshot(pid) != before
    with pytest.raises(MigrateError) as exc:
        rig.tracer.stream_in(pid, img).result(10)
    assert exc.value.errno == errno.EBUSY
    rig.tracer.abort_in(pid).result(10)
    assert unchanged(pid, before) and fd_count() == ours
    rig.tracer.abort_in(pid).result(10)         # again: nothing to do
    os.kill(pid, signal.SIGUSR1)
    rig.rec.wait(lambda: (pid, signal.SIGUSR1) in rig.rec.signals)
    inc, _ = stream(rig, pid, img)              # and again, to the end this time
    rig.tracer.abort_in(pid).result(10)
    assert unchanged(pid, before)
    rig.tracer.finish(pid, exit_code=5).result(10)
    assert rig.bpsh.status(pid) == 5 << 8


def test_a_ghost_killed_while_its_image_streams(rig: Rig, counter: str, pipes) -> None:
    pid, img, inp, out = moved(rig, counter, pipes)
    stream(rig, pid, img, stop_after=2)
    os.kill(pid, signal.SIGKILL)
    rig.rec.wait(lambda: pid in rig.rec.exits)
    assert rig.rec.exits[pid] == signal.SIGKILL
    with pytest.raises(MigrateError) as exc:
        rig.tracer.write_in(pid, [(0x10000, b"x")]).result(10)
    assert exc.value.errno == errno.ESRCH
    rig.tracer.abort_in(pid).result(10)
    assert rig.bpsh.status(pid) == signal.SIGKILL


def test_a_run_in_no_region_of_the_image_is_refused(rig: Rig, counter: str, pipes) -> None:
    pid, img, inp, out = moved(rig, counter, pipes, 1)
    before = snapshot(pid)
    inc, _ = stream(rig, pid, img, stop_after=0)
    stack = next(r for r in img.regions if r.growsdown)
    for addr in (0x1000, stack.end - 8):
        with pytest.raises(MigrateError) as exc:
            rig.tracer.write_in(pid, [(addr, b"0123456789abcdef")]).result(10)
        assert exc.value.errno == errno.EFAULT
    rig.tracer.abort_in(pid).result(10)
    assert unchanged(pid, before)
    rig.tracer.kill(pid).result(10)


def test_split_by_the_ghosts_own_pages() -> None:
    def region(lo: int, hi: int) -> Region:
        return Region(lo, hi, 3, "anon", False, -1, 0, [])
    a, b, c = region(0x1000, 0x3000), region(0x5000, 0x8000), region(0x9000, 0xa000)
    assert split([a, b, c], [(0x3000, 0x5000), (0x7000, 0x7001)]) == ([a, c], [b])
    assert split([a, b, c], []) == ([a, b, c], [])


def test_batch_a_unmaps_the_ghosts_own_pages_only() -> None:
    """What the stream built stays, even inside one line of maps merged with a page of
    the ghost's own; vvar/vdso and the scratch area stay."""
    from bpfs.migrate.ghost_restore import own_unmaps
    from bpfs.migrate.helper import SCRATCH, SCRATCH_SIZE
    from bpfs.migrate.procfs import Mapping

    def line(lo: int, hi: int, path: str = "") -> Mapping:
        return Mapping(lo, hi, "rw-p", 0, "00:00", 0, path)
    built = [Region(0x10000, 0x20000, 3, "anon"), Region(0x30000, 0x40000, 3, "anon")]
    maps = [line(0x10000, 0x21000), line(0x2f000, 0x40000), line(0x50000, 0x51000),
            line(SCRATCH, SCRATCH + SCRATCH_SIZE), line(0x7000, 0x9000, "[vdso]")]
    assert own_unmaps(maps, built) == [(0x20000, 0x21000), (0x2f000, 0x30000),
                                       (0x50000, 0x51000)]

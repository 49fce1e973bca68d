"""Back into the ghost (Tracer.restore_in) for a process that had run: one run here
first, then moved away as `move` does it (`take`: seized, stopped, dumped where it stands,
parked as its ghost), then restored into that ghost: it goes on where it was (heap,
counter, a read, its open files, its handlers). And restore_in's cost. Real processes,
real ptrace (the rig: tests/engine/ghostrig.py).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

import pytest

from bpfs.migrate.errors import MigrateError
from bpfs.migrate.image import Image, OpenFile
from tests.engine.ghostrig import Rig, asleep, proc_state, until
from tests.engine.test_ghost_fork import fd_count, read
from tests.engine.test_ghost_restore import (ECHO, Pipe, pipe, pipes, snapshot,  # noqa: F401
                                             unchanged)

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]

COUNTER_C = r'''
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) << 20;
    unsigned char *heap = malloc(n);
    for (size_t i = 0; i < n; i++) heap[i] = (unsigned char)(i * 7 + 1);
    volatile long counter = 0;
    for (int i = 0; i < 1000; i++) counter++;
    printf("before %ld\n", counter);
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1) return 2;
    for (int i = 0; i < 234; i++) counter++;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += heap[i] != (unsigned char)(i * 7 + 1);
    printf("after %ld bad %zu got %c\n", counter, bad, c);
    return 7;
}
'''


@pytest.fixture(scope="module")
def counter() -> Iterator[str]:
    """COUNTER_C built in a world-readable directory (skipped without gcc)."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc is not available")
    d = tempfile.mkdtemp(prefix="bpfs-restore-")
    os.chmod(d, 0o755)
    try:
        src = os.path.join(d, "counter.c")
        with open(src, "w") as f:
            f.write(COUNTER_C)
        subprocess.run([gcc, "-O1", src, "-o", os.path.join(d, "counter")], check=True)
        yield os.path.join(d, "counter")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def take(rig: Rig, pid: int, links: tuple[int, ...] = (0, 1, 2)) -> Image:
    """The running `pid` (no tracee) moved away from the master as `move` does it: seized,
    stopped, dumped where it stands (its fds but `links`, which a move carries as stdio
    links, among the image's open files), parked as its ghost."""
    rig.tracer.seize_running(pid).result(5)
    img = rig.tracer.dump_moving(pid, set(links)).result(10)
    rig.tracer.park_moved(pid).result(5)
    return img


# ---- a process that had run ----

def test_a_process_that_had_run_goes_on_where_it_was(rig: Rig, counter: str, pipes) -> None:
    pid, img = rig.ghost([counter, "4"])
    inp, out = pipe(pipes), pipe(pipes)
    rig.tracer.restore_in(pid, img, {0: inp.r, 1: out.w}).result(10)
    assert out.line() == b"before 1000\n"
    assert until(lambda: proc_state(pid) == "S")   # in read(0)
    running = take(rig, pid)
    assert running.pid == pid and rig.tracer.ghosts() == [pid] and asleep(pid)
    assert running.page_bytes() > 4 << 20        # its heap
    rig.tracer.restore_in(pid, running).result(10)   # fds 0 and 1: the ghost's own
    os.write(inp.w, b"x")
    out.close_w()
    assert out.rest() == b"after 1234 bad 0 got x\n"
    assert rig.bpsh.status(pid) == 7 << 8
    assert rig.rec.exits == {} and rig.tracer.ghosts() == []


PY_RUNNING = """
import signal, sys
signal.signal(signal.SIGUSR1, lambda *a: print("usr1", flush=True))
signal.signal(signal.SIGINT, signal.SIG_IGN)
data = [i * i for i in range(100000)]
print("ready", flush=True)
got = sys.stdin.read(1)
print("got", got, sum(data), flush=True)
"""


def test_a_python_program_that_had_run(rig: Rig, pipes) -> None:
    """Its handler and ignored signal survive; a signal that comes while it is restored
    is its own; its read goes on."""
    pid, img = rig.ghost([sys.executable, "-c", PY_RUNNING])
    inp, out = pipe(pipes), pipe(pipes)
    rig.tracer.restore_in(pid, img, {0: inp.r, 1: out.w, 2: out.w}).result(10)
    assert out.line() == b"ready\n"
    assert until(lambda: proc_state(pid) == "S")
    running = take(rig, pid)
    gate = threading.Event()
    rig.tracer.submit(gate.wait, 5)             # the tracer waits: the next two run as one
    rig.tracer.submit(os.kill, pid, signal.SIGUSR1)   # comes while the ghost is restored
    done = rig.tracer.restore_in(pid, running)
    gate.set()
    done.result(10)
    os.kill(pid, signal.SIGINT)                  # ignored
    os.write(inp.w, b"z")
    # the SIGUSR1 was the process's, not a ghost's: queued for it, caught by its handler
    # (which Python runs once the restarted read returns: it came just before the read)
    assert out.rest() == f"usr1\ngot z {sum(i * i for i in range(100000))}\n".encode()
    assert rig.bpsh.status(pid) == 0 and rig.rec.signals == []


PY_FILES = """
import os, sys
data = os.open(sys.argv[1], os.O_RDONLY)
print(os.read(data, 6).decode(), end="", flush=True)
log = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND)
os.write(log, b"a\\n")
extra = os.open("/dev/null", os.O_RDONLY)
os.read(0, 1)
print(os.read(data, 6).decode(), end="", flush=True)
os.write(log, b"b\\n")
os.read(0, 1)
"""


@pytest.fixture
def files() -> Iterator[tuple[str, str]]:
    d = tempfile.mkdtemp(prefix="bpfs-restore-")
    try:
        data, log = os.path.join(d, "data"), os.path.join(d, "log")
        with open(data, "w") as f:
            f.write("line1\nline2\n")
        open(log, "w").close()
        yield data, log
    finally:
        shutil.rmtree(d, ignore_errors=True)


def moved_with_files(rig: Rig, pipes, files) -> tuple[int, Image, Pipe, Pipe]:
    """PY_FILES run here, at its first wait, moved away: its files in the image."""
    pid, img = rig.ghost([sys.executable, "-c", PY_FILES, *files])
    inp, out = pipe(pipes), pipe(pipes)
    rig.tracer.restore_in(pid, img, {0: inp.r, 1: out.w}).result(10)
    assert out.line() == b"line1\n"
    assert until(lambda: proc_state(pid) == "S")
    moved = take(rig, pid)
    assert [(f.fd, f.path, f.offset) for f in moved.open_files] == [
        (3, files[0], 6), (4, files[1], 2), (5, "/dev/null", 0)]
    return pid, moved, inp, out


def test_open_files_come_back_at_their_numbers_and_offsets(rig: Rig, pipes, files) -> None:
    """The image's open files are opened again by the process itself, at their numbers,
    flags and offsets; with close_others the fd table is the image's exactly (the ghost
    kept fd 5, which the image no longer has)."""
    pid, moved, inp, out = moved_with_files(rig, pipes, files)
    moved.open_files = moved.open_files[:2]                 # as if it had closed fd 5
    rig.tracer.restore_in(pid, moved, {0: inp.r, 1: out.w, 2: out.w},
                          close_others=True).result(10)
    assert sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2, 3, 4]
    assert "pos:\t6" in read(pid, "fdinfo/3").decode()
    os.write(inp.w, b"x")
    assert out.line() == b"line2\n"
    os.write(inp.w, b"x")
    assert rig.bpsh.status(pid) == 0
    assert open(files[1]).read() == "a\nb\n"


def test_an_open_file_the_master_lacks_leaves_the_ghost(rig: Rig, pipes, files) -> None:
    """Opened before the point of no return: ENOENT naming the file, those opened before
    it closed again, the ghost as it was; without close_others the ghost's fds stay."""
    pid, moved, inp, out = moved_with_files(rig, pipes, files)
    before = snapshot(pid)
    bad = dataclasses.replace(moved, open_files=[
        *moved.open_files, OpenFile(7, "/nonexistent/file", os.O_RDONLY, 0)])
    with pytest.raises(MigrateError) as exc:
        rig.tracer.restore_in(pid, bad).result(10)
    assert exc.value.errno == errno.ENOENT and "/nonexistent/file" in str(exc.value)
    assert unchanged(pid, before) and rig.tracer.ghosts() == [pid]
    rig.tracer.restore_in(pid, moved).result(10)
    assert sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2, 3, 4, 5]
    os.write(inp.w, b"xx")
    assert out.line() == b"line2\n"
    assert rig.bpsh.status(pid) == 0


# ---- cost ----

def timed_restore(rig: Rig, pid: int, img: Image, fds: dict | None = None) -> float:
    t0 = time.perf_counter()
    rig.tracer.restore_in(pid, img, fds).result(30)
    return (time.perf_counter() - t0) * 1000


@pytest.mark.timeout(180)
def test_restore_in_time(rig: Rig, counter: str, pipes) -> None:
    """A small program at its entry point, ten times; one of 1 MB and one of 100 MB that
    had run (heap filled, counter, asleep in read)."""
    small = []
    fds = fd_count()
    for _ in range(10):
        pid, img = rig.ghost([ECHO, "x"])
        out = pipe(pipes)
        small.append(timed_restore(rig, pid, img, {1: out.w}))
        assert out.rest() == b"x\n" and rig.bpsh.status(pid) == 0
    ran = {mb: ran_and_restored(rig, counter, pipes, mb) for mb in (1, 100)}
    assert fd_count() <= fds + sum(1 + (p.w >= 0) for p in pipes)   # none leaked
    print(f"\nrestore_in: small program at its entry median {statistics.median(small):.2f} ms"
          f" (min {min(small):.2f}, max {max(small):.2f}); that had run: " +
          ", ".join(f"{mb} MB {ms:.1f} ms" for mb, ms in ran.items()))


def ran_and_restored(rig: Rig, counter: str, pipes, mb: int) -> float:
    """COUNTER_C with `mb` MB of heap run here, taken back as a ghost, restored into it
    (timed), and checked: its heap and counter as they were."""
    pid, img = rig.ghost([counter, str(mb)])
    inp, out = pipe(pipes), pipe(pipes)
    rig.tracer.restore_in(pid, img, {0: inp.r, 1: out.w}).result(10)
    assert out.line(60) == b"before 1000\n"
    assert until(lambda: proc_state(pid) == "S")
    running = take(rig, pid)
    assert running.page_bytes() >= mb << 20
    ms = timed_restore(rig, pid, running)
    os.write(inp.w, b"y")
    out.close_w()
    assert out.rest() == b"after 1234 bad 0 got y\n"
    assert rig.bpsh.status(pid) == 7 << 8
    return ms

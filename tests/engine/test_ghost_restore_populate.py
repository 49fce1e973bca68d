"""Back into the ghost with a big anonymous run (a process coming home: restore_in): the
run's bytes are as they were (the program's own checksum), it is resident, and its THP
advice (smaps' VmFlags hg/nh) is what it was before the move. Kept for any change to how
the runs are mapped and filled (populated at once was tried, and measured slower:
bench/results-move.md, "branch populate"). Real processes, real ptrace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Iterator

import pytest

from tests.engine.ghostrig import Rig, proc_state, until
from tests.engine.test_ghost_restore import pipe, pipes  # noqa: F401
from tests.engine.test_ghost_restore_moved import take

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]

MB = 24
RUN_C = r'''
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
static unsigned long sum(unsigned char *p, size_t n) {
    unsigned long s = 0;
    for (size_t i = 0; i < n; i++) s = s * 31 + p[i];
    return s;
}
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) << 20;
    unsigned char *p = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 3;
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 13 + (i >> 12) + 1);
    printf("%lx %lu\n", (unsigned long)p, sum(p, n));
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1) return 2;
    printf("%lu\n", sum(p, n));
    return 0;
}
'''


@pytest.fixture(scope="module")
def holder() -> Iterator[str]:
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc is not available")
    d = tempfile.mkdtemp(prefix="bpfs-populate-")
    os.chmod(d, 0o755)
    try:
        src = os.path.join(d, "run.c")
        with open(src, "w") as f:
            f.write(RUN_C)
        subprocess.run([gcc, "-O1", src, "-o", os.path.join(d, "run")], check=True)
        yield os.path.join(d, "run")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def region(pid: int, addr: int) -> dict[str, str]:
    """smaps' fields of the mapping that holds `addr` (VmFlags as a set's sorted string)."""
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.read().splitlines()
    out: dict[str, str] = {}
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
            if inside:
                out["range"] = head
            continue
        if inside:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def thp_advice(fields: dict[str, str]) -> set[str]:
    return set(fields["VmFlags"].split()) & {"hg", "nh"}


def test_a_big_anonymous_run_comes_back_whole_with_its_advice(rig: Rig, holder: str,
                                                             pipes) -> None:
    pid, img = rig.ghost([holder, str(MB)])
    inp, out = pipe(pipes), pipe(pipes)
    rig.tracer.restore_in(pid, img, {0: inp.r, 1: out.w}).result(10)
    addr_hex, before_sum = out.line(30).split()
    addr = int(addr_hex, 16)
    assert until(lambda: proc_state(pid) == "S")        # in read(0)
    before = region(pid, addr)
    moved = take(rig, pid)
    assert any(len(data) >= MB << 20 for r in moved.regions for _, data in r.pages)
    rig.tracer.restore_in(pid, moved).result(30)
    after = region(pid, addr)
    assert thp_advice(after) == thp_advice(before)
    assert int(after["Rss"].split()[0]) >= MB << 10     # resident: written
    os.write(inp.w, b"x")
    out.close_w()
    assert out.rest().strip() == before_sum
    assert rig.bpsh.status(pid) == 0

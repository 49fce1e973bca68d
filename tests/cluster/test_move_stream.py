"""A big process's image streams through the cluster (bpfs/node/streamin.py): the target
builds the process as its pieces come. A move that fails half way through leaves it
running where it was, its memory intact, and nothing of it on the target.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.cluster.test_move import (PY, hostname_of, master_name, node_copies, node_of,
                                     read_line, start_bpsh, stop)

pytestmark = pytest.mark.timeout(120)


def holder(mb: int) -> tuple[str, int]:
    """A program holding `mb` MB that, at each stdin line, changes a byte and prints the
    sum of one byte a page and its node's name; and that sum before any line."""
    return (("import os, sys\n"
             f"mem = bytearray(b'\\x5a') * ({mb} << 20)\n"
             "print(os.getpid(), flush=True)\n"
             "for line in sys.stdin:\n"
             "    mem[0] = (mem[0] + 1) % 256\n"
             "    print(sum(mem[::4096]), os.uname().nodename, flush=True)\n"),
            0x5a * ((mb << 20) // 4096))


MB = 300
HOLDER, SUM = holder(MB)


def ask(p: subprocess.Popen) -> tuple[int, str]:
    assert p.stdin is not None
    p.stdin.write(b"?\n")
    p.stdin.flush()
    total, host = read_line(p).split()
    return int(total), host


def mover(cluster, pid: int, target: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", "import os, sys\ntry:\n"
                             "    fd = os.open(sys.argv[1], os.O_WRONLY)\n"
                             "    os.write(fd, sys.argv[2].encode())\n"
                             "except OSError as e: sys.exit(e.errno)",
                             os.path.join(cluster.mount, "procs", str(pid), "ctl"),
                             f"move {target}"])


def test_a_move_whose_target_fails_half_way_leaves_the_process_where_it_was(cluster) -> None:
    """The process being built on node 2 is killed while its pages stream in: the move
    fails, the process goes on on node 1 with every byte it had, and node 2 keeps
    nothing of it; it then moves to node 2 for real."""
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == (SUM + 1, hostname_of(1))
        (source,) = node_copies(pid)
        m = mover(cluster, pid, "2")
        deadline = time.monotonic() + 30
        killed = []
        while not killed and m.poll() is None and time.monotonic() < deadline:
            for copy in node_copies(pid):
                if copy != source:
                    os.kill(copy, signal.SIGKILL)   # the copy being built on node 2
                    killed.append(copy)
        code = m.wait(timeout=60)
        if not killed:
            pytest.skip("the move was over before its copy could be caught")
        assert code != 0
        assert node_of(cluster, pid) == "1"
        assert ask(p) == (SUM + 2, hostname_of(1))      # its memory, as it was
        cluster.wait_for(lambda: node_copies(pid) == [source], timeout=10,
                         what="nothing of it left on node 2")
        assert mover(cluster, pid, "2").wait(timeout=60) == 0
        assert ask(p) == (SUM + 3, hostname_of(2))
    finally:
        stop(p)


@pytest.mark.parametrize("way", [("2", "master", "1"), ("master", "2")])
def test_a_big_process_streams_every_way_with_its_memory(cluster, way) -> None:
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        for n, target in enumerate(way, 1):
            assert mover(cluster, pid, target).wait(timeout=60) == 0
            host = master_name() if target == "master" else hostname_of(int(target))
            assert ask(p) == (SUM + n, host)
    finally:
        stop(p)

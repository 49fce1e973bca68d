"""A process back from a node into its ghost, its image streamed into the ghost as the
parts come (bpfs/master/homecoming.py, bpfs/migrate/ghost_stream.py): its memory intact,
the master's log saying how much was written as it came; a move home that fails once the
image is in, or half way, leaves the ghost a working ghost (signals reach the process on
its node, its end is the ghost's) with nothing of the image left in it; a ghost killed
meanwhile takes its process along.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.test_move import (PY, hostname_of, master_name, node_copies, node_of,
                                     read_line, start_bpsh, stop)
from tests.cluster.test_move_stream import mover

pytestmark = pytest.mark.timeout(120)

# Holds MB of memory and an open file; answers each stdin line with a checksum of it and
# where it runs; "usr1" on SIGUSR1; exits 7 at "quit".
HOLDER = ("import os, signal, sys\n"
          "mb = int(sys.argv[1])\n"
          "f = open(sys.argv[2]) if len(sys.argv) > 2 else None\n"
          "mem = bytearray(b'\\x5a') * (mb << 20)\n"
          "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', flush=True))\n"
          "print(os.getpid(), flush=True)\n"
          "for line in sys.stdin:\n"
          "    if line.strip() == 'quit':\n"
          "        sys.exit(7)\n"
          "    mem[0] = (mem[0] + 1) % 256\n"
          "    print(sum(mem[::4096]), os.uname().nodename, flush=True)\n")


def total(mb: int) -> int:
    return 0x5a * ((mb << 20) // 4096)


def ask(p: subprocess.Popen, line: bytes = b"?\n") -> list[str]:
    assert p.stdin is not None
    p.stdin.write(line)
    p.stdin.flush()
    return read_line(p).split()


def streamed_home(cluster, pid: int) -> list[int]:
    """MB written into `pid`'s ghost as they came, by move home (the master's log)."""
    text = "".join(p.read_text(errors="replace")
                   for p in Path(cluster.state_dir).rglob("master.log"))
    return [int(mb) for mb in re.findall(rf"move \d+: (\d+) MB of pid {pid} written into "
                                         "its ghost as they came", text)]


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])
    except (OSError, StopIteration):
        return 0


def move_home_half_way(cluster, pid: int) -> tuple[subprocess.Popen, bool]:
    """`move master` of `pid`, started and watched until its ghost has grown by 50 MB:
    (the mover, True if the move was still under way then)."""
    small = rss_kb(pid)
    m = mover(cluster, pid, "master")
    deadline = time.monotonic() + 30
    while m.poll() is None and time.monotonic() < deadline and rss_kb(pid) < small + 50_000:
        time.sleep(0.002)
    return m, m.poll() is None


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_big_process_streams_home_into_its_ghost_with_its_memory(cluster, users,
                                                                   who) -> None:
    user = users["alice"] if who == "alice" else None
    mb = 40
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, str(mb), user=user, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == [str(total(mb) + 1), hostname_of(1)]
        assert mover(cluster, pid, "master").wait(timeout=60) == 0
        assert ask(p) == [str(total(mb) + 2), master_name()]
        assert streamed_home(cluster, pid) and streamed_home(cluster, pid)[-1] >= mb
        assert mover(cluster, pid, "2").wait(timeout=60) == 0      # and out again
        assert ask(p) == [str(total(mb) + 3), hostname_of(2)]
        assert ask(p, b"quit\n") == []
        assert p.wait(timeout=30) == 7
    finally:
        stop(p)


def test_a_small_process_comes_home_whole(cluster) -> None:
    """An image in one message is restored as before, not streamed."""
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, "1", stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert mover(cluster, pid, "master").wait(timeout=60) == 0
        assert ask(p) == [str(total(1) + 1), master_name()]
        assert streamed_home(cluster, pid) == []
    finally:
        stop(p)


def is_a_working_ghost(cluster, p: subprocess.Popen, pid: int, mb: int, n: int) -> None:
    """P goes on on node 1 with its memory; the ghost holds none of it; a signal to the
    ghost reaches P; P's end is the ghost's (bpsh's status); nothing left on the nodes."""
    assert node_of(cluster, pid) == "1"
    assert ask(p) == [str(total(mb) + n), hostname_of(1)]
    assert rss_kb(pid) < 8 << 10, rss_kb(pid)
    os.kill(pid, signal.SIGUSR1)
    assert read_line(p) == "usr1"
    assert ask(p, b"quit\n") == []
    assert p.wait(timeout=30) == 7
    cluster.wait_for(lambda: not node_copies(pid), timeout=10, what="nothing on the nodes")


def test_a_move_home_refused_once_its_image_is_in_leaves_a_working_ghost(
        cluster, users) -> None:
    """alice's process holds a file she may no longer read: the image streams in whole,
    then the ghost, opening it as alice, is refused (EACCES): the move fails, the stream
    is undone."""
    d = tempfile.mkdtemp(prefix="bpfs-home-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "held")
    with open(path, "w") as f:
        f.write("x")
    os.chown(path, users["alice"].uid, users["alice"].gid)
    mb = 40
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, str(mb), path, user=users["alice"],
                   stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == [str(total(mb) + 1), hostname_of(1)]
        os.chmod(path, 0)
        before = len(streamed_home(cluster, pid))
        assert mover(cluster, pid, "master").wait(timeout=60) != 0
        assert len(streamed_home(cluster, pid)) == before
        is_a_working_ghost(cluster, p, pid, mb, 2)
    finally:
        stop(p)
        os.unlink(path)
        os.rmdir(d)


def test_a_move_home_whose_file_goes_half_way_leaves_a_working_ghost(cluster) -> None:
    """The file P holds is removed while its image streams into the ghost (seen growing):
    the ghost cannot open it (ENOENT), the move fails, the stream is undone."""
    d = tempfile.mkdtemp(prefix="bpfs-home-")
    path = os.path.join(d, "held")
    with open(path, "w") as f:
        f.write("x")
    mb = 300
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, str(mb), path, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == [str(total(mb) + 1), hostname_of(1)]
        m, half = move_home_half_way(cluster, pid)
        os.unlink(path)
        code = m.wait(timeout=60)
        if not half:
            pytest.skip("the move was over before its stream could be caught")
        assert code != 0
        is_a_working_ghost(cluster, p, pid, mb, 2)
    finally:
        stop(p)
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(d)


def test_a_source_that_fails_half_way_ends_the_ghost_as_its_process_ended(cluster) -> None:
    """P is killed on node 1 while its image streams into the ghost (seen growing): the
    node's dump fails, the stream is undone, and the ghost ends as P did (by a signal,
    SIGKILL): bpsh sees that end, nothing is left on the nodes or the master."""
    mb = 300
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, str(mb), stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        (copy,) = node_copies(pid)
        m, half = move_home_half_way(cluster, pid)
        os.kill(copy, signal.SIGKILL)
        code = m.wait(timeout=60)
        if not half:
            pytest.skip("the move was over before its stream could be caught")
        assert code != 0
        _, err = p.communicate(timeout=30)      # bpsh: its process died of a signal
        assert p.returncode == 255 and b"exited abnormally" in err, (p.returncode, err)
        cluster.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10,
                         what="the ghost gone")
        assert not node_copies(pid)
    finally:
        stop(p)


def test_a_ghost_killed_while_its_image_streams_in_takes_its_process_along(cluster) -> None:
    """SIGKILL of the ghost half way through the stream: the move fails, node 1 drops P,
    bpsh sees the end by a signal, nothing is left anywhere."""
    mb = 300
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, str(mb), stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        m, half = move_home_half_way(cluster, pid)
        os.kill(pid, signal.SIGKILL)                    # the ghost
        code = m.wait(timeout=60)
        if not half:
            pytest.skip("the move was over before its stream could be caught")
        assert code != 0
        _, err = p.communicate(timeout=30)
        assert p.returncode == 255 and b"exited abnormally" in err, (p.returncode, err)
        cluster.wait_for(lambda: not node_copies(pid), timeout=10, what="P dropped on node 1")
    finally:
        stop(p)

"""Node-to-node moves send the pages straight (bpfs/node/direct.py, bpfs/master/tonode.py).

A real cluster, real processes: a small one (a counter with 1 MB of ballast) and a big one
(40 MB of memory) move between nodes; the master's log line for each move says how many
bytes went straight and how many through it (only the header: a few KiB), and the process
has all its memory after. A tiny one (`cat`: under DIRECT_MIN of pages) goes through the
master at once, in one message, not waiting for the target's `taking`. A cluster whose nodes name a port nobody listens on
(BPFS_DIRECT_PORT) still moves, every byte through the master.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Iterator

import pytest

from tests.cluster.test_move import (COUNTER, PY, hostname_of, node_of, read_line,
                                     start_bpsh, stop, write_ctl)
from tests.cluster.test_move_stream import ask, holder
from tests.conftest import Cluster, _new_cluster, _teardown, is_root

pytestmark = pytest.mark.timeout(120)

MB = 40
HOLDER, SUM = holder(MB)


def master_log(c: Cluster) -> str:
    """The master's log: an embedded cluster's, or a netcluster's."""
    for path in (os.path.join(c.state_dir, "logs", "master.log"),
                 os.path.join(c.state_dir, "master.log")):
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
    raise AssertionError(f"no master log in {c.state_dir}")


def node_log(c: Cluster, n: int) -> str:
    for path in (os.path.join(c.state_dir, "logs", f"node-{n}.log"),
                 os.path.join(c.state_dir, f"node{n}.log")):
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
    raise AssertionError(f"no log of node {n} in {c.state_dir}")


def way_of(c: Cluster, pid: int, source: int, target: int) -> tuple[int, int]:
    """(bytes straight, bytes through the master) of the last move of `pid` between them."""
    found = re.findall(rf"move \d+: pid {pid} \(.*\) from node {source} to node {target} "
                       r"\((?:(\d+) bytes straight, (\d+) through the master|all (\d+) "
                       r"bytes through the master)\)", master_log(c))
    assert found, f"no move of {pid} from node {source} to node {target} in the log"
    straight, through, everything = found[-1]
    return (int(straight), int(through)) if straight else (0, int(everything))


def test_a_big_process_moves_node_to_node_straight_with_its_memory(cluster) -> None:
    p = start_bpsh(cluster, 1, PY, "-c", HOLDER, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == (SUM + 1, hostname_of(1))
        for n, (source, target) in enumerate(((1, 2), (2, 0)), 2):
            assert write_ctl(cluster, pid, f"move {target}") == 0
            assert ask(p) == (SUM + n, hostname_of(target))     # every page, and it runs
            straight, through = way_of(cluster, pid, source, target)
            assert straight >= MB << 20 and through < 1 << 20, (straight, through)
    finally:
        stop(p)


def test_a_small_process_moves_node_to_node_straight_and_counts_on(cluster) -> None:
    p = start_bpsh(cluster, 0, PY, "-c", COUNTER, "40", "0.05")
    try:
        seen = [read_line(p).split()]
        pid = int(seen[0][2])
        for source, target in ((0, 1), (1, 2)):
            assert write_ctl(cluster, pid, f"move {target}") == 0
            while seen[-1][1] != hostname_of(target):
                seen.append(read_line(p).split())
            straight, through = way_of(cluster, pid, source, target)
            assert straight > 1 << 20 and through < 1 << 20, (straight, through)
        out, _ = p.communicate(timeout=30)
        lines = seen + [ln.split() for ln in out.decode().splitlines()]
        assert [int(ln[0]) for ln in lines] == list(range(1, 41))   # nothing lost or twice
        assert p.returncode == 7
    finally:
        stop(p)


def test_a_tiny_process_moves_node_to_node_through_the_master_in_one_message(cluster
                                                                          ) -> None:
    p = start_bpsh(cluster, 1, "/bin/sh", "-c", "echo $$; exec cat", stdin=subprocess.PIPE)
    assert p.stdin is not None
    try:
        pid = int(read_line(p))
        p.stdin.write(b"one\n")
        p.stdin.flush()
        assert read_line(p) == "one"                    # cat runs (no move while sh starts)
        for source, target in ((1, 2), (2, 1)):
            assert write_ctl(cluster, pid, f"move {target}") == 0
            assert node_of(cluster, pid) == str(target)
            p.stdin.write(f"at {target}\n".encode())
            p.stdin.flush()
            assert read_line(p) == f"at {target}"        # it runs there, stdin and out
            straight, through = way_of(cluster, pid, source, target)
            assert straight == 0 and 0 < through < 2 << 20, (straight, through)
    finally:
        stop(p)


@pytest.fixture(scope="module")
def unreachable(src_dir: str) -> Iterator[Cluster]:
    """A cluster whose nodes name, in `taking`, a port nothing listens on."""
    if not is_root():
        pytest.skip("the embedded cluster needs root (FUSE mount, namespaces)")
    with socket.socket() as s:              # a port that was free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = _new_cluster(src_dir, 3)
    c.env["BPFS_DIRECT_PORT"] = str(port)
    try:
        c.up()
        yield c
    finally:
        _teardown(c)


def test_a_source_that_cannot_reach_the_target_sends_through_the_master(unreachable) -> None:
    c = unreachable
    p = start_bpsh(c, 1, PY, "-c", HOLDER, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == (SUM + 1, hostname_of(1))
        assert write_ctl(c, pid, "move 2") == 0
        assert ask(p) == (SUM + 2, hostname_of(2))
        straight, through = way_of(c, pid, 1, 2)
        assert straight == 0 and through >= MB << 20
        assert re.search(r"restore \d+: cannot reach 127\.1\.0\.3:\d+ \(.*\): its pages go "
                         "through the master", node_log(c, 1))
    finally:
        stop(p)

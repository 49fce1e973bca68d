"""Running processes move over the wire: node daemons in a network namespace of their own.

The same moves as test_move's, where the nodes reach the master only over a veth link:
the image goes node -> master -> node over it, and a moved process's stdio links are made
again over it too (to bpsh, or to the relay the master starts for a process of its own).
What a user sees: the counter's output goes on in order, nothing lost or twice, from the
host it runs on; the echo's stdin goes on from the byte it had read; root and a user alike.
Between nodes that reach each other (one namespace here) the pages go straight; between
nodes that cannot (each in a namespace that reaches only the master), through the master.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Iterator

import pytest

from tests import netcluster
from tests.cluster.test_move import (COUNTER, ECHO, PY, hostname_of, master_name, node_of,
                                     read_line, start_bpsh, stop, write_ctl)
from tests.cluster.test_move_direct import HOLDER, SUM, MB, node_log, way_of
from tests.cluster.test_move_stream import ask
from tests.conftest import as_user, is_root, pid_alive

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def net(src_dir: str) -> Iterator[netcluster.NetCluster]:
    if not is_root():
        pytest.skip("network namespaces and the master's mount need root")
    yield from netcluster.make(src_dir, nodes=2)


def host_of(target: str) -> str:
    return master_name() if target == "master" else hostname_of(int(target))


def follow(p: subprocess.Popen, seen: list[list[str]], host: str) -> None:
    """Read the counter's lines until one comes from `host`."""
    while True:
        line = read_line(p).split()
        assert line, f"output ended; so far {seen}"
        seen.append(line)
        if line[1] == host:
            return
        assert len(seen) < 60, seen


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_counter_moves_node_to_node_to_master_and_back_over_the_wire(net, users, who
                                                                        ) -> None:
    user = users["alice"] if who == "alice" else None
    p = start_bpsh(net, 0, PY, "-c", COUNTER, "30", "0.05", user=user)
    try:
        first = read_line(p).split()
        pid = int(first[2])
        assert first[1] == hostname_of(0)
        seen = [first]
        for target in ("1", "master", "0"):
            assert write_ctl(net, pid, f"move {target}", user) == 0
            if target != "master":
                assert node_of(net, pid) == target
            follow(p, seen, host_of(target))
        out, err = p.communicate(timeout=30)
        lines = seen + [ln.split() for ln in out.decode().splitlines()]
        assert [int(ln[0]) for ln in lines] == list(range(1, 31))  # nothing lost or twice
        assert all(ln[2] == str(pid) and ln[3] == str(1 << 20) for ln in lines)
        assert p.returncode == 7, err.decode()
    finally:
        stop(p)
    assert not pid_alive(pid)


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_master_process_moves_out_and_back_over_the_wire(net, users, who) -> None:
    user = users["alice"] if who == "alice" else None
    child = subprocess.Popen(as_user([PY, "-c", COUNTER, "30", "0.05"], user),
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        seen = [read_line(child).split()]
        assert seen[0][1] == master_name()
        for target in ("1", "0", "master"):
            assert write_ctl(net, child.pid, f"move {target}", user) == 0
            follow(child, seen, host_of(target))
        out, _ = child.communicate(timeout=30)
        lines = seen + [ln.split() for ln in out.decode().splitlines()]
        assert [int(ln[0]) for ln in lines] == list(range(1, 31))
        assert child.returncode == 7                    # our own child's end, as it was
    finally:
        stop(child)


def test_stdin_goes_on_across_moves_over_the_wire(net, users) -> None:
    p = start_bpsh(net, 1, PY, "-c", ECHO, user=users["alice"], stdin=subprocess.PIPE)
    assert p.stdin is not None
    try:
        pid = int(read_line(p).split()[1])
        got = []
        for k, target in enumerate(("0", "master", "1", None)):
            for i in range(3):
                p.stdin.write(f"line{k * 3 + i}\n".encode())
            p.stdin.flush()
            got += [read_line(p).split() for _ in range(3)]
            if target is not None:
                p.stdin.write(f"early{k}\n".encode())        # written before the move ...
                p.stdin.flush()
                assert write_ctl(net, pid, f"move {target}", users["alice"]) == 0
                got.append(read_line(p).split())            # ... read once
        p.stdin.close()
        assert p.wait(timeout=20) == 3
        assert [g[0] for g in got] == ["line0", "line1", "line2", "early0",
                                       "line3", "line4", "line5", "early1",
                                       "line6", "line7", "line8", "early2",
                                       "line9", "line10", "line11"], got
        assert [got[k][1] for k in (4, 8, 12)] == [hostname_of(0), master_name(),
                                                   hostname_of(1)]
    finally:
        stop(p)
    assert not pid_alive(pid)


def test_a_big_process_moves_and_no_daemon_keeps_its_image(net) -> None:
    """200 MB of memory go node 0 -> node 1 -> master -> node 1 -> node 0 in pieces;
    afterwards no node daemon holds a copy (its dump, the pieces it sent or put together)."""
    holder = ("import os, sys\n"
              "mem = bytearray(b'\\x5a\\xa5' * (100 << 20))\n"
              "print(os.getpid(), flush=True)\n"
              "for line in sys.stdin:\n"
              "    print(sum(mem[::4096]), flush=True)\n")
    daemons = [p.pid for p in net.procs[1:]]
    before = {pid: _rss_mb(pid) for pid in daemons}
    p = start_bpsh(net, 0, PY, "-c", holder, stdin=subprocess.PIPE)
    assert p.stdin is not None
    try:
        pid = int(read_line(p))
        for target in ("1", "master", "1", "0"):
            assert write_ctl(net, pid, f"move {target}") == 0
            p.stdin.write(b"sum\n")
            p.stdin.flush()
            assert int(read_line(p)) == (0x5a * ((200 << 20) // 4096))   # intact
        grown = {pid: _rss_mb(pid) - before[pid] for pid in daemons}
        assert all(mb < 100 for mb in grown.values()), grown
    finally:
        stop(p)


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_child_forked_on_a_node_moves_over_the_wire(net, users, who) -> None:
    """sh's child on node 0 moves to node 1, the master, node 0 (into its stand-in) and
    node 1: its output goes on through the relay on node 0 (reached over the veth), and
    sh's wait gets its exit code."""
    user = users["alice"] if who == "alice" else None
    script = f"{PY} -c \"$0\" 40 0.05 & echo $!; wait $!; echo status=$?"
    p = start_bpsh(net, 0, "/bin/sh", "-c", script, COUNTER, user=user)
    try:
        child = int(read_line(p))
        seen = [read_line(p).split()]
        for target in ("1", "master", "0", "1"):
            assert write_ctl(net, child, f"move {target}", user) == 0
            follow(p, seen, host_of(target))
        rest = []
        while (line := read_line(p)) and not line.startswith("status="):
            rest.append(line.split())
        assert line == "status=7", (seen, rest, line)
        assert [int(ln[0]) for ln in seen + rest] == list(range(1, 41))
        assert p.wait(timeout=20) == 0
    finally:
        stop(p)


def test_a_big_process_moves_node_to_node_straight_over_the_wire(net) -> None:
    p = start_bpsh(net, 0, PY, "-c", HOLDER, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == (SUM + 1, hostname_of(0))
        for n, (source, target) in enumerate(((0, 1), (1, 0)), 2):
            assert write_ctl(net, pid, f"move {target}") == 0
            assert ask(p) == (SUM + n, hostname_of(target))
            straight, through = way_of(net, pid, source, target)
            assert straight >= MB << 20 and through < 1 << 20, (straight, through)
        assert "its pages straight from 10." in node_log(net, 1)
    finally:
        stop(p)


@pytest.fixture(scope="module")
def apart(src_dir: str) -> Iterator[netcluster.NetCluster]:
    if not is_root():
        pytest.skip("network namespaces and the master's mount need root")
    yield from netcluster.make(src_dir, nodes=2, apart=True)


def test_nodes_that_cannot_reach_each_other_move_through_the_master(apart) -> None:
    """Each node in a namespace of its own that reaches only the master: the source
    cannot connect to the target, and sends the pages through the master."""
    p = start_bpsh(apart, 0, PY, "-c", HOLDER, stdin=subprocess.PIPE)
    try:
        pid = int(read_line(p))
        assert ask(p) == (SUM + 1, hostname_of(0))
        for n, (source, target) in enumerate(((0, 1), (1, 0)), 2):
            assert write_ctl(apart, pid, f"move {target}") == 0
            assert ask(p) == (SUM + n, hostname_of(target))
            straight, through = way_of(apart, pid, source, target)
            assert straight == 0 and through >= MB << 20, (straight, through)
        assert "cannot reach 10." in node_log(apart, 0)
    finally:
        stop(p)


def test_a_big_master_process_goes_out_and_home_straight_over_the_wire(net) -> None:
    """Master -> node 1 -> master -> node 0: the pages go straight each way, on
    connections between the master's and the nodes' real addresses; every byte kept."""
    from tests.cluster.test_move_direct import master_log
    from tests.cluster.test_move_out import ask as ask_digest, finish, start_holder
    p, pid, digest = start_holder()
    try:
        for target in ("1", "master", "0"):
            assert write_ctl(net, pid, f"move {target}") == 0
            assert ask_digest(p) == (digest, host_of(target))
        log = master_log(net)
        assert re.findall(rf"pid {pid} \(.*\) from the master to node \d \(its pages (.*)\)",
                          log) == ["straight, by the process"] * 2
        assert re.findall(rf"MB of pid {pid} written into its ghost as they came "
                          r"\(([a-z ]+)\)", log) == ["straight from the process"]
        assert "its pages straight from 10." in node_log(net, 1)    # the master's, veth
    finally:
        finish(p)

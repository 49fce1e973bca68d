"""bpsh on several nodes: one exec, one dump, a ghost per rank (bproc's vexecmove).

What a user sees: every rank runs on its node with its own BPROC_RANK and its ghost's
PID; the ghosts are bpsh's children with the program's name; a rank that may not run
says why while the others run; a signal to one ghost reaches that rank only. And what
the master did: it captured the program once for the whole run (its log says so).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time

import pytest

from tests.cluster.test_bpsh import ok, real_process
from tests.conftest import Cluster, command, pid_alive

pytestmark = pytest.mark.timeout(120)


def fan_outs(c: Cluster) -> list[int]:
    """Rank counts of the multi-node migrations in the master's log, in order."""
    log = open(os.path.join(c.state_dir, "logs", "master.log")).read()
    return [int(n) for n in re.findall(r"fans out to (\d+) ranks", log)]


def test_every_rank_runs_on_its_node_with_its_rank_and_pid(cluster: Cluster) -> None:
    before = len(fan_outs(cluster))
    r = cluster.run("bpsh", "0-2,1", "sh", "-c", 'echo "$BPROC_RANK $(hostname) $$"')
    lines = sorted(ok(r).splitlines())
    ranks = [line.split() for line in lines]
    assert [(rank, host) for rank, host, _ in ranks] == [
        ("0000000", "n0"), ("0000001", "n1"), ("0000002", "n2"), ("0000003", "n1")]
    assert len({pid for _, _, pid in ranks}) == 4
    assert fan_outs(cluster)[before:] == [4]        # one capture for the four ranks


def test_twenty_ranks_cloned_in_chunks_each_run_once(cluster: Cluster) -> None:
    """More ranks than the master clones in its first chunks (3, then 9, then the rest):
    every rank runs exactly once, with its own PID, whichever chunk made its ghost."""
    before = len(fan_outs(cluster))
    spec = ",".join(str(n % cluster.nodes) for n in range(20))
    r = cluster.run("bpsh", spec, "sh", "-c", 'echo "$BPROC_RANK $(hostname) $$"')
    ranks = sorted(line.split() for line in ok(r).splitlines())
    assert [(rank, host) for rank, host, _ in ranks] == [
        (f"{n:07d}", f"n{n % cluster.nodes}") for n in range(20)]
    assert len({pid for _, _, pid in ranks}) == 20
    assert fan_outs(cluster)[before:] == [20]


def test_ghosts_are_bpsh_children_and_a_signal_reaches_only_its_rank(cluster: Cluster
                                                                     ) -> None:
    p = subprocess.Popen(command("bpsh") + ["0,1,2", "sh", "-c",
                                            'echo "$BPROC_RANK $$"; exec sleep 60'],
                         env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pids: dict[int, int] = {}
        while len(pids) < 3:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            rank, pid = line.split()
            pids[int(rank)] = int(pid)
        for rank, pid in pids.items():
            ps = subprocess.run(["ps", "-o", "ppid=,comm=,args=", "-p", str(pid)],
                                capture_output=True, text=True).stdout.split(None, 2)
            assert int(ps[0]) == p.pid and ps[1] in ("sh", "sleep"), ps
            assert ps[2].strip() in ('sh -c echo "$BPROC_RANK $$"; exec sleep 60',
                                     "sleep 60"), ps   # renamed when the node's exec is seen
            assert real_process(cluster, rank, pid) is not None
        reals = {rank: real_process(cluster, rank, pid) for rank, pid in pids.items()}
        os.kill(pids[1], signal.SIGTERM)            # rank 1 runs on node 1
        cluster.wait_for(lambda: not pid_alive(reals[1]), 10, "rank 1 to end on node 1")
        time.sleep(0.2)
        assert pid_alive(reals[0]) and pid_alive(reals[2])
        for rank in (0, 2):
            os.kill(pids[rank], signal.SIGKILL)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 255
        assert "Child process on node 1 exited abnormally" in err.decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_exit_status_is_the_largest_of_the_ranks(cluster: Cluster) -> None:
    r = cluster.run("bpsh", "0-2", "sh", "-c", 'exit $((BPROC_RANK * 20 + 1))')
    assert r.returncode == 41, r.stderr


def test_a_rank_that_may_not_run_says_so_and_the_others_run(cluster: Cluster, users
                                                            ) -> None:
    bob = users["bob"]
    node = f"{cluster.mount}/nodes/1"
    try:
        ok(cluster.sh(f"chmod 0100 {node}"))
        r = cluster.run("bpsh", "0,1,2", "sh", "-c", 'echo "$BPROC_RANK $(id -u)"', user=bob)
        assert r.returncode == 1
        assert r.stderr.decode() == "1: Permission denied\n"
        assert sorted(r.stdout.decode().splitlines()) == [f"0000000 {bob.uid}",
                                                          f"0000002 {bob.uid}"]
        r = cluster.run("bpsh", "1,1", "true", user=bob)
        assert r.returncode == 1
        assert r.stderr.decode() == "1: Permission denied\n" * 2
    finally:
        ok(cluster.sh(f"chmod 0111 {node}"))


def test_no_io_forwarding_on_several_nodes(cluster: Cluster) -> None:
    r = cluster.run("bpsh", "-N", "0,1", "sh", "-c", "exit 3")
    assert r.returncode == 3 and r.stdout == b"" and r.stderr == b""


def test_stdin_goes_to_every_rank_and_nothing_is_left(cluster: Cluster) -> None:
    data = os.urandom(1 << 20)
    r = cluster.run("bpsh", "-a", "sh", "-c", "md5sum", input=data)
    assert ok(r).split() == [hashlib.md5(data).hexdigest(), "-"] * cluster.nodes
    cluster.wait_for(lambda: os.listdir(f"{cluster.mount}/procs") == [], 5, "procs/ to empty")

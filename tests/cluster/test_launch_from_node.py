"""bpsh on a node launches on another node (the way MPI launchers start their daemons).

The request goes to the master; the program runs in the launching process's ghost there and
migrates: it keeps that process's cluster PID, its ghost is a child of bpsh's ghost, and on
the launching node that process stands in for it (bpfs/standin.py). Real nodes, real
programs, a plain user; over the wire too (node daemons in a network namespace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from tests import netcluster
from tests.cluster.test_pidspace import _children, ps
from tests.conftest import as_user, command, is_root

pytestmark = pytest.mark.timeout(120)

BPSH = [sys.executable, "-m", "bpfs.cli.bpsh"]      # bpsh as a node runs it (PYTHONPATH)


def nested(c, outer: str, *argv: str, user=None, timeout: float = 60
           ) -> subprocess.CompletedProcess:
    return c.run("bpsh", outer, *BPSH, *argv, user=user, timeout=timeout)


@pytest.fixture(scope="module")
def net(src_dir: str) -> Iterator[netcluster.NetCluster]:
    if not is_root():
        pytest.skip("network namespaces and the master's mount need root")
    yield from netcluster.make(src_dir, nodes=3)


@pytest.mark.parametrize("where", ["embedded", "net"])
def test_bpsh_on_a_node_runs_on_another(request, where: str, users) -> None:
    c = request.getfixturevalue("cluster" if where == "embedded" else "net")
    r = nested(c, "1", "2", "hostname")
    assert (r.returncode, r.stdout) == (0, b"n2\n"), r.stderr
    r = nested(c, "1", "2", "sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr
    r = nested(c, "1", "2", "id", "-un", user=users["alice"])
    assert (r.returncode, r.stdout) == (0, b"bpfs-alice\n"), r.stderr
    r = nested(c, "0", "-a", "hostname")
    assert r.returncode == 0 and sorted(r.stdout.split()) == [b"n0", b"n1", b"n2"], r.stderr


def test_a_program_killed_ends_its_stand_in_the_same_way(cluster) -> None:
    r = nested(cluster, "1", "2", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 255, r
    assert r.stderr == b"bpsh: Child process on node 2 exited abnormally.\n"  # the inner's


def test_the_tree_and_the_signals_go_through_the_master(cluster) -> None:
    p = subprocess.Popen(command("bpsh") + ["1", *BPSH, "2", "sh", "-c",
                                            "echo $$ $PPID; exec sleep 30"],
                         env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd="/", start_new_session=True)
    try:
        assert p.stdout is not None
        pid, ppid = (int(x) for x in p.stdout.readline().split())
        inner = _children(p.pid)[0]            # bpsh on node 1: its ghost, our child
        assert ppid == inner                    # the program's parent is bpsh on node 1
        assert int(ps(pid)["ppid"]) == inner    # ... and so is its ghost's on the master
        assert cluster.read(f"procs/{pid}/node").strip() == "2"
        assert cluster.read(f"procs/{inner}/node").strip() == "1"
        os.kill(pid, signal.SIGINT)             # the ghost on the master: reaches node 2
        out, err = p.communicate(timeout=20)
        assert p.returncode == 255, (out, err)
        assert err == b"bpsh: Child process on node 2 exited abnormally.\n"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    cluster.wait_for(lambda: os.listdir(os.path.join(cluster.mount, "procs")) == [],
                     timeout=10, what="nothing left in procs")


def test_the_nodes_acl_holds_for_a_launch_from_a_node(cluster, users) -> None:
    node2 = os.path.join(cluster.mount, "nodes", "2")
    os.chmod(node2, 0o100)                       # root only
    try:
        r = nested(cluster, "1", "2", "true", user=users["alice"])
        assert r.returncode != 0 and b"2: Permission denied" in r.stderr, r
        r = nested(cluster, "1", "2", "true")
        assert r.returncode == 0, r.stderr
    finally:
        os.chmod(node2, 0o111)


def test_a_launch_to_the_node_it_is_on_runs_there(cluster) -> None:
    r = nested(cluster, "1", "1", "sh", "-c", "hostname; echo $PPID")
    lines = r.stdout.decode().split()
    assert r.returncode == 0 and lines[0] == "n1", r.stderr


def test_many_launches_from_a_node_leave_nothing(cluster) -> None:
    t = time.monotonic()
    r = cluster.run("bpsh", "1", "sh", "-c",
                    f"for i in 1 2 3 4 5 6 7 8; do {' '.join(BPSH)} 2 true || echo fail; done",
                    timeout=120)
    assert r.returncode == 0 and b"fail" not in r.stdout, r
    print(f"8 launches from node 1 to node 2: {time.monotonic() - t:.2f} s")
    cluster.wait_for(lambda: os.listdir(os.path.join(cluster.mount, "procs")) == [],
                     timeout=10, what="nothing left in procs")

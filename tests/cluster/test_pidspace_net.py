"""One PID space over the wire: node daemons in a network namespace of their own.

The same checks as test_pidspace's, where the nodes reach the master only over a veth link:
a fork on a node gets its PID from the master's answer, exec renames its ghost, and a kill
from one node to the other goes through the master.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Iterator

import pytest

from tests import netcluster
from tests.cluster.test_pidspace import _children, bpsh_bg, first_line, ps
from tests.conftest import is_root

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def net(src_dir: str) -> Iterator[netcluster.NetCluster]:
    if not is_root():
        pytest.skip("network namespaces and the master's mount need root")
    yield from netcluster.make(src_dir, nodes=2)


def test_the_nodes_are_elsewhere(net) -> None:
    info = net.read("nodes/0/info")
    assert "127.0.0.1" not in info, info


def test_fork_exec_and_end_over_the_wire(net, users) -> None:
    alice = users["alice"]
    p = bpsh_bg(net, "0", "sh", "-c", "sleep 30 & echo $$ $!; wait $!; echo status $?",
                user=alice)
    try:
        sh_pid, child = (int(x) for x in first_line(p).split())
        net.wait_for(lambda: ps(child).get("args") == "sleep 30", timeout=5,
                     what="the ghost renamed")
        assert int(ps(child)["ppid"]) == sh_pid
        assert net.read(f"procs/{child}/node").strip() == "0"
        # from alice on node 1, over the master, to alice's sleep on node 0
        r = net.run("bpsh", "1", "kill", "-TERM", str(child), user=alice)
        assert r.returncode == 0, r.stderr
        out, err = p.communicate(timeout=20)
        assert out.decode().strip() == f"status {128 + signal.SIGTERM}", err.decode()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_ppid_over_the_wire(net) -> None:
    p = subprocess.Popen(netcluster.command("bpsh") + ["1", "sh", "-c", "echo $PPID"],
                         env=net.env, stdout=subprocess.PIPE, cwd="/")
    out, _ = p.communicate(timeout=30)
    assert int(out) == p.pid


def test_kill_refused_over_the_wire(net, users) -> None:
    mine = subprocess.Popen(["sleep", "30"])
    try:
        r = net.run("bpsh", "1", "kill", "-TERM", str(mine.pid), user=users["bob"])
        assert r.returncode != 0 and b"not permitted" in r.stderr
        assert mine.poll() is None
        assert _children(os.getpid())   # (sleep is ours)
    finally:
        mine.kill()
        mine.wait()

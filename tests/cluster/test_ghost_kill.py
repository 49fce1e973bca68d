"""A ghost that dies takes its process with it: SIGKILL of a moved process's ghost on the
master (the one signal its tracer cannot intercept) after each kind of move ends the real
process where it runs, within a couple of seconds; procs/ forgets it; its parent sees it
killed by SIGKILL. Nothing runs on a node without a ghost.

Kinds: master -> node (a relay made), node -> node, node -> master -> node (h->n: its
links kept from its stay home, no relay), a bpsh job's node -> node, and a process forked
on a node that moved away (its stand-in there ends too).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.cluster.test_move import (PY, hostname_of, master_name, node_copies, read_line,
                                     start_bpsh, stop, write_ctl)
from tests.cluster.test_nodefork_move import lines_until_status, on_node, start
from tests.conftest import pid_alive

pytestmark = pytest.mark.timeout(120)

# One line "n hostname pid" every `pause` s, for ever (or `n` lines).
COUNTER = ("import os, socket, sys, time\n"
           "n, pause = int(sys.argv[1]), float(sys.argv[2])\n"
           "for i in range(1, n + 1):\n"
           "    print(i, socket.gethostname(), os.getpid(), flush=True)\n"
           "    time.sleep(pause)\n")


def until_on(p: subprocess.Popen, host: str) -> None:
    """Lines until one comes from `host`: it runs there."""
    for _ in range(400):
        words = read_line(p).split()
        assert words, "its output ended"
        if words[1] == host:
            return
    raise AssertionError(f"no line from {host}")


def gone_everywhere(cluster, pid: int, nodes: tuple[int, ...]) -> None:
    """No copy of `pid` on any node within 3 s (the host's view of their namespaces), the
    nodes say so too, and procs/ has no entry for it."""
    cluster.wait_for(lambda: not node_copies(pid), timeout=3,
                     what=f"no copy of {pid} on any node")
    for n in nodes:
        assert not on_node(cluster, n, pid), f"{pid} still on node {n}"
    cluster.wait_for(lambda: str(pid) not in os.listdir(os.path.join(cluster.mount, "procs")),
                     timeout=5, what="procs/PID gone")
    cluster.wait_for(lambda: not pid_alive(pid), timeout=5, what="no ghost")


@pytest.mark.parametrize("path", [("1",), ("1", "2"), ("1", "2", "master", "1")],
                         ids=["m-n", "m-n-n", "h-n"])
def test_sigkill_of_a_master_process_s_ghost_ends_it_on_its_node(cluster, path) -> None:
    child = subprocess.Popen([PY, "-c", COUNTER, "100000", "0.02"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        pid = int(read_line(child).split()[2])
        for target in path:
            assert write_ctl(cluster, pid, f"move {target}") == 0
            until_on(child, master_name() if target == "master" else hostname_of(int(target)))
        os.kill(pid, signal.SIGKILL)                    # the ghost
        assert child.wait(timeout=10) == -signal.SIGKILL
        gone_everywhere(cluster, pid, (int(path[-1]),))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


@pytest.mark.parametrize("path", [("2",), ("2", "master", "0")], ids=["n-n", "n-m-n"])
def test_sigkill_of_a_bpsh_job_s_ghost_ends_it_on_its_node(cluster, path) -> None:
    p = start_bpsh(cluster, 1, PY, "-c", COUNTER, "100000", "0.02")
    try:
        pid = int(read_line(p).split()[2])
        for target in path:
            assert write_ctl(cluster, pid, f"move {target}") == 0
            until_on(p, master_name() if target == "master" else hostname_of(int(target)))
        os.kill(pid, signal.SIGKILL)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 255 and b"exited abnormally" in err, (p.returncode, err)
        gone_everywhere(cluster, pid, (1, int(path[-1])))
    finally:
        stop(p)


@pytest.mark.parametrize("path", [("2",), ("master", "2"), ("2", "master", "0")],
                         ids=["n-n", "n-m-n", "n-n-m-n"])
def test_sigkill_of_a_forked_child_s_ghost_ends_it_and_its_stand_in(cluster, path) -> None:
    p, child = start(cluster, 100000, 0.02)
    try:
        read_line(p)
        for target in path:
            assert write_ctl(cluster, child, f"move {target}\n") == 0
            until_on(p, master_name() if target == "master" else hostname_of(int(target)))
        os.kill(child, signal.SIGKILL)                  # its ghost, sh's ghost's child
        seen, status = lines_until_status(p)
        assert status == "status=137", (seen[-3:], status)     # sh: killed by SIGKILL
        assert p.wait(timeout=20) == 0
        gone_everywhere(cluster, child, (1, int(path[-1])))
    finally:
        stop(p)

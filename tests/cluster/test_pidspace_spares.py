"""Spare ghosts (docs/pidspace.md, "Spares"): a process on a node that forks again and
again gets PIDs from the master ahead of its next forks (two in hand), which take them
with no round trip and, in a steady loop, with no wait. Proved by the master's own count
(its log line when the forking process ends), not by timing; every child still has its
ghost, parent, name and end; and no spare is left once its parent is done, moves, or its
node reboots. Real nodes, real shells.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cluster.test_pidspace import PY, bpsh_bg, first_line, ps
from tests.cluster.test_pidspace_storm import children_of
from tests.conftest import pid_alive

pytestmark = pytest.mark.timeout(120)


def spare_counts(cluster, pid: int) -> tuple[int, int, int] | None:
    """(forks on spares, forks asking, forks that waited for their spare at the node) of
    `pid`, as the master logged them at its end."""
    text = Path(cluster.state_dir, "logs", "master.log").read_text(errors="replace")
    found = re.findall(rf"pid {pid} forked (\d+) times on spares, (\d+) times asking "
                       rf"\((\d+) waited", text)
    return tuple(int(x) for x in found[-1]) if found else None     # type: ignore[return-value]


def test_a_shells_loop_takes_spares_and_each_child_is_as_before(cluster) -> None:
    """60 rounds of a program and of `sh -c 'exit 3'`: most forks take spares (the
    master's count); each child's end on the master (its ghost's `exit` event) is its
    own; then a background child (a spare too) is a ghost under the shell's, renamed,
    on node 1, and its end is the shell's `wait`. The two unused spares (the pair was
    refilled after that fork) go back once idle, and are gone with the shell."""
    n = 60
    script = (f"i=0; while [ $i -lt {n} ]; do /bin/true; sh -c 'exit 3'; i=$((i+1)); done; "
              "sleep 30 & echo $$ $!; wait $!; echo status $?")
    reader = subprocess.Popen(["cat", os.path.join(cluster.mount, "events")],
                              stdout=subprocess.PIPE, text=True)
    p = bpsh_bg(cluster, "1", "sh", "-c", script)
    try:
        sh_pid, child = (int(x) for x in first_line(p).split())
        cluster.wait_for(lambda: ps(child).get("args") == "sleep 30", timeout=10,
                         what="the background child's ghost renamed")
        seen = ps(child)
        assert int(seen["ppid"]) == sh_pid and seen["comm"] == "sleep"
        assert cluster.read(f"procs/{child}/node").strip() == "1"
        cluster.wait_for(lambda: len(children_of(sh_pid)) == 3, timeout=5,
                         what="two spares under the shell's ghost")
        spares = [c for c in children_of(sh_pid) if c != child]
        assert len(spares) == 2 and all(ps(s).get("comm") == "sh" for s in spares), spares
        listed = os.listdir(os.path.join(cluster.mount, "procs"))
        assert not any(str(s) in listed for s in spares)
        # unused for a while: given back and gone, the child stays
        cluster.wait_for(lambda: children_of(sh_pid) == [child], timeout=15,
                         what="the idle spares given back")
        assert not any(pid_alive(s) for s in spares)
        os.kill(child, signal.SIGTERM)
        out, err = p.communicate(timeout=20)
        assert out.decode().split() == ["status", str(128 + signal.SIGTERM)], err.decode()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        cluster.wait_for(lambda: os.listdir(os.path.join(cluster.mount, "procs")) == [],
                         timeout=10, what="no process left in /bproc/procs")
        reader.kill()
        events = reader.communicate()[0]
    cluster.wait_for(lambda: spare_counts(cluster, sh_pid) is not None, timeout=10,
                     what="the master's count of the shell's forks")
    took, asked, waited = spare_counts(cluster, sh_pid)    # type: ignore[misc]
    assert took + asked == 2 * n + 1 and took >= n, (took, asked)
    ends = [line.split(" ", 4)[4] for line in events.splitlines()
            if line.split(" ")[1:4:2] == ["proc", "exit"]]
    assert ends[:2 * n] == ["0", "3"] * n
    print(f"{2 * n + 1} forks of one shell on node 1: {took} on spares ({waited} waited "
          f"for theirs), {asked} asking")


def test_a_steady_loop_of_forks_takes_spares_and_leaves_none(cluster) -> None:
    """200 rounds of /bin/true: the forks take spares (the master's count; with two ahead,
    one is in hand while the next is made), and none is left after the shell. How many
    forks waited for theirs is printed, not judged: it is the machine's load that decides
    (0.5-4% of them most of the time on 2 cores, one in five in a minute at load 3; with
    one spare ahead 8-15% at best), and the pair's bookkeeping is judged exactly in
    tests/hostile/test_pidspace_peer.py."""
    n = 200
    took, asked, waited = _loop(cluster, n)
    assert took + asked == n and took >= n // 2, (took, asked, waited)


def _loop(cluster, n: int) -> tuple[int, int, int]:
    """A shell's loop of `n` /bin/true on node 1: the master's count of its forks."""
    p = bpsh_bg(cluster, "1", "sh", "-c",
                f"echo $$; i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done")
    try:
        sh_pid = int(first_line(p))
        p.communicate(timeout=60)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    cluster.wait_for(lambda: spare_counts(cluster, sh_pid) is not None, timeout=10,
                     what="the master's count of the shell's forks")
    cluster.wait_for(lambda: not pid_alive(sh_pid) and children_of(sh_pid) == [],
                     timeout=10, what="no spare left after the shell")
    took, asked, waited = spare_counts(cluster, sh_pid)    # type: ignore[misc]
    print(f"{n} forks of one shell on node 1: {took} on spares ({waited} waited for "
          f"theirs), {asked} asking")
    return took, asked, waited


def test_a_process_with_a_spare_moves_and_leaves_none_behind(cluster) -> None:
    """A process that forked repeatedly holds two spares; it moves to node 2: node 1
    gives them back, and the master kills them: no child ghost left under its ghost."""
    from tests.cluster.test_move import write_ctl
    script = ("import os, sys, time\n"
              "for i in range(30):\n"
              "    pid = os.fork()\n"
              "    if pid == 0: os._exit(0)\n"
              "    os.waitpid(pid, 0)\n"
              "print(os.getpid(), flush=True)\n"
              "time.sleep(30)\n")
    p = bpsh_bg(cluster, "1", PY, "-c", script)
    try:
        pid = int(first_line(p))
        cluster.wait_for(lambda: len(children_of(pid)) == 2, timeout=5,
                         what="its two spares under its ghost")
        spares = children_of(pid)
        cluster.wait_for(lambda: write_ctl(cluster, pid, "move 2") == 0, timeout=10,
                         what="the move")
        assert cluster.read(f"procs/{pid}/node").strip() == "2"
        cluster.wait_for(lambda: children_of(pid) == [] and
                         not any(pid_alive(s) for s in spares), timeout=5,
                         what="no spare left after the move")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    cluster.wait_for(lambda: os.listdir(os.path.join(cluster.mount, "procs")) == [],
                     timeout=10, what="no process left in /bproc/procs")


def test_a_spare_goes_with_its_node_rebooting(cluster) -> None:
    """A shell on node 1 holds spares; node 1 reboots: they die with the rest."""
    q = bpsh_bg(cluster, "1", "sh", "-c",
                "/bin/true; /bin/true; /bin/true; echo $$; while :; do sleep 1; done")
    try:
        shell = int(first_line(q))
        cluster.wait_for(lambda: len(children_of(shell)) >= 1, timeout=5,
                         what="the shell's spare")
        kids = children_of(shell)
        with open(os.path.join(cluster.mount, "nodes", "1", "ctl"), "w") as f:
            f.write("reboot\n")
        q.wait(timeout=30)
        cluster.wait_for(lambda: not any(pid_alive(k) for k in kids) and
                         not pid_alive(shell), timeout=10, what="its ghosts gone")
    finally:
        if q.poll() is None:
            os.killpg(q.pid, signal.SIGKILL)
            q.wait()
        cluster.wait_for(lambda: cluster.read("nodes/1/status").strip() == "up",
                         timeout=40, what="node 1 up again")

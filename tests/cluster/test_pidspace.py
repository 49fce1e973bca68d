"""One PID space, both ways: processes forked on a node are cluster processes.

Real nodes, real programs (sh, sleep, python3, kill), a plain user beside root. What a user
sees: `$!` on a node names a process that `ps` on the master shows under its parent's ghost,
that /bproc/procs and `bpstat -p` list with its node, and that `kill` on the master reaches;
`$PPID`, getpgid and getsid agree with the master's `ps`; kill from a node reaches any
process of the cluster its user may signal, with kill(2)'s errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import command, pid_alive

pytestmark = pytest.mark.timeout(120)

PY = sys.executable


def ps(pid: int) -> dict[str, str]:
    """What `ps` on the master says of `pid` ({} if nothing)."""
    r = subprocess.run(["ps", "-o", "ppid=,pgid=,sid=,user:32=,comm=", "-p", str(pid)],
                       capture_output=True, text=True)
    parts = r.stdout.split()
    if len(parts) < 5:
        return {}
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().rstrip(b"\0").replace(b"\0", b" ").decode()
    return dict(zip(("ppid", "pgid", "sid", "user", "comm"), parts[:5]), args=args)


def bpsh_bg(cluster, *argv: str, user=None) -> subprocess.Popen:
    from tests.conftest import as_user
    return subprocess.Popen(as_user(command("bpsh") + list(argv), user), env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                            start_new_session=True)


def first_line(p: subprocess.Popen) -> str:
    assert p.stdout is not None
    return p.stdout.readline().decode().strip()


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_background_child_on_a_node_is_a_ghost_under_its_parent(cluster, users, who) -> None:
    user = users["alice"] if who == "alice" else None
    p = bpsh_bg(cluster, "2", "sh", "-c", "sleep 30 & echo $$ $!; wait $!; echo status $?",
                user=user)
    try:
        sh_pid, child = (int(x) for x in first_line(p).split())
        cluster.wait_for(lambda: ps(child).get("args") == "sleep 30", timeout=5,
                         what="the ghost renamed to the exec'd program")
        seen = ps(child)
        assert int(seen["ppid"]) == sh_pid                  # under its parent's ghost
        assert seen["user"] == (user.name if user else "root")
        assert int(seen["pgid"]) == int(ps(sh_pid)["pgid"])
        assert cluster.read(f"procs/{child}/node").strip() == "2"
        bpstat = cluster.run("bpstat", "-p").stdout.decode()
        assert any(line.split()[:2] == [str(child), "2"] for line in bpstat.splitlines()), \
            bpstat
        os.kill(child, signal.SIGTERM) if user is None else \
            cluster.sh(f"kill -TERM {child}", user=user)
        out, err = p.communicate(timeout=20)
        assert out.decode().strip() == f"status {128 + signal.SIGTERM}", err.decode()
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    cluster.wait_for(lambda: not os.path.exists(os.path.join(cluster.mount, "procs",
                                                             str(child))),
                     timeout=5, what="procs/PID gone")
    assert not pid_alive(child)


def test_ppid_pgid_and_sid_on_a_node_are_the_masters(cluster) -> None:
    script = "import os; print(os.getppid(), os.getpgid(0), os.getsid(0), os.getpgrp())"
    p = bpsh_bg(cluster, "1", PY, "-c", script)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode()
    ppid, pgid, sid, pgrp = (int(x) for x in out.split())
    assert ppid == p.pid                # bpsh, on the master
    assert pgid == pgrp == p.pid        # bpsh leads its own session and group here
    assert sid == p.pid


def test_children_of_children_and_exit_statuses(cluster) -> None:
    r = cluster.run("bpsh", "1", "sh", "-c",
                    "(exit 3); echo $?; sh -c 'kill -9 $$'; echo $?; "
                    "sh -c 'echo $PPID > /dev/null; sh -c \"exit 7\"'; echo $?; "
                    "echo me $$ parent $(sh -c 'echo $PPID')")
    lines = r.stdout.decode().split("\n")
    assert lines[:3] == ["3", "137", "7"], r.stderr.decode()
    me, parent = lines[3].split()[1], lines[3].split()[3]
    assert me == parent                 # $( ) forks: its child's parent is the shell


def test_a_fork_storm_leaves_nothing_behind(cluster) -> None:
    n = 300
    t = time.monotonic()
    r = cluster.run("bpsh", "0", "sh", "-c",
                    f"i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; echo ok",
                    timeout=120)
    took = time.monotonic() - t
    assert r.stdout == b"ok\n", r.stderr.decode()
    cluster.wait_for(lambda: os.listdir(os.path.join(cluster.mount, "procs")) == [],
                     timeout=10, what="no process left in /bproc/procs")
    print(f"{n} fork+exec+wait on a node: {took:.2f} s")


def test_threads_need_no_ghost_and_may_fork(cluster) -> None:
    script = ("import os, threading, time\n"
              "tids = []\n"
              "def run(): tids.append(threading.get_native_id()); time.sleep(0.2)\n"
              "ts = [threading.Thread(target=run) for _ in range(20)]\n"
              "[t.start() for t in ts]\n"
              "pid = os.fork()\n"
              "if pid == 0: os._exit(5)\n"
              "print(pid, os.waitpid(pid, 0)[1] >> 8)\n"
              "[t.join() for t in ts]\n"
              "print(min(tids))\n")
    r = cluster.run("bpsh", "1", PY, "-c", script)
    (pid, code), (lowest_tid,) = (line.split() for line in r.stdout.decode().splitlines())
    assert code == "5", r.stderr.decode()
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    assert int(pid) < pid_max           # a cluster PID: the master's
    assert int(lowest_tid) > pid_max     # threads: numbers no cluster PID can have


def test_an_orphan_lives_on_and_its_ghost_goes_with_it(cluster, tmp_path) -> None:
    """bpsh's output to files: with a pipe the node ends a job's orphans together with
    their session (as it did before this work; see the closing note of issue 14)."""
    out = tmp_path / "out"
    with open(out, "wb") as f, open(tmp_path / "err", "wb") as e:
        r = subprocess.run(command("bpsh") + ["2", "sh", "-c",
                                              "sleep 2 >/dev/null 2>&1 & echo $!"],
                           env=cluster.env, stdout=f, stderr=e, cwd="/", timeout=30)
    assert r.returncode == 0, (tmp_path / "err").read_text()
    orphan = int(out.read_text())
    seen = ps(orphan)               # its parent's ghost has ended: re-parented on the master
    assert seen.get("args") in ("sleep 2", "sh -c sleep 2 >/dev/null 2>&1 & echo $!"), seen
    assert cluster.read(f"procs/{orphan}/node").strip() == "2"
    cluster.wait_for(lambda: not pid_alive(orphan), timeout=10, what="the orphan's ghost to go")
    cluster.wait_for(lambda: not os.path.exists(os.path.join(cluster.mount, "procs",
                                                             str(orphan))),
                     timeout=5, what="its procs entry to go")


def test_kill_from_a_node_reaches_the_master_and_other_nodes(cluster, users) -> None:
    alice = users["alice"]
    mine = subprocess.Popen(["sleep", "30"])
    theirs = bpsh_bg(cluster, "2", "sleep", "30", user=alice)
    try:
        cluster.wait_for(lambda: any(ps(pid).get("comm") == "sleep" and
                                     ps(pid).get("user") == alice.name
                                     for pid in _children(theirs.pid)),
                         timeout=10, what="alice's sleep migrated")
        # a plain user may not signal root's process on the master, nor a missing one
        r = cluster.run("bpsh", "1", "kill", "-TERM", str(mine.pid), user=alice)
        assert r.returncode != 0 and b"not permitted" in r.stderr, r.stderr
        r = cluster.run("bpsh", "1", "kill", "-0", "4194000", user=alice)
        assert r.returncode != 0 and b"No such process" in r.stderr, r.stderr
        assert mine.poll() is None
        # root on a node may (the cluster's root)
        r = cluster.run("bpsh", "1", "kill", "-TERM", str(mine.pid))
        assert r.returncode == 0, r.stderr
        assert mine.wait(timeout=5) == -signal.SIGTERM
        # alice's process on node 2, from alice on node 1: it dies of the signal
        target = _children(theirs.pid)[0]
        r = cluster.run("bpsh", "1", "kill", "-USR1", str(target), user=alice)
        assert r.returncode == 0, r.stderr
        theirs.wait(timeout=10)
        assert theirs.returncode == 255       # bpsh: died abnormally
    finally:
        for p in (mine, theirs):
            if p.poll() is None:
                p.kill()
                p.wait()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_a_pidfd_of_a_process_on_another_node(cluster, users) -> None:
    """pidfd_open of a process elsewhere gives a pidfd of a local proxy (bpfs/node/
    pidproxy.py): pidfd_send_signal reaches the process through the master with the
    caller's uids, and the pidfd reads as ended once the process has ended."""
    alice, bob = users["alice"], users["bob"]
    target = bpsh_bg(cluster, "2", "sh", "-c", "echo $$; exec sleep 30", user=alice)
    try:
        pid = int(first_line(target))
        script = ("import os, select, signal, sys\n"
                  "fd = os.pidfd_open(int(sys.argv[1]))\n"
                  "print(bool(select.select([fd], [], [], 0)[0]))\n"
                  "try:\n"
                  "    signal.pidfd_send_signal(fd, signal.SIGTERM)\n"
                  "except OSError as e:\n"
                  "    print('refused', e.errno)\n"
                  "print(bool(select.select([fd], [], [], float(sys.argv[2]))[0]))\n")
        # bob may open it (pidfd_open checks no permission) but not signal it: his proxy's
        # signal goes on with his uids and the master's kill refuses it; the target lives
        r = cluster.run("bpsh", "1", PY, "-c", script, str(pid), "1", user=bob, timeout=30)
        assert r.stdout == b"False\nFalse\n", r
        assert pid_alive(pid)
        # alice's reaches it: it ends, and her pidfd says so
        r = cluster.run("bpsh", "1", PY, "-c", script, str(pid), "10", user=alice, timeout=30)
        assert r.stdout == b"False\nTrue\n", r
        target.wait(timeout=10)
        r = cluster.run("bpsh", "1", PY, "-c", "import os; os.pidfd_open(4190000)")
        assert b"No such process" in r.stderr, r
    finally:
        if target.poll() is None:
            os.killpg(target.pid, signal.SIGKILL)
            target.wait()

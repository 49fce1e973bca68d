"""A process forked on a node moves (issue 15): its parent there waits for it, signals it,
and gets its real status; the node keeps it as its stand-in (bpfs/node/standins.py).

`bpsh 1 sh -c 'python3 counter & echo $!; wait $!; echo status=$?'`: the counter is sh's
child on node 1 (a cluster PID with a ghost under sh's ghost). It moves to node 2 or to
the master; its output goes on through the relay on node 1; sh's `wait` gets its real
exit code, or the signal that ended it; kill of its PID from the master or from sh
reaches it wherever it runs; a SIGKILL of the stand-in kills it. Nothing is left: no
ghost, stand-in, zombie or procs/ entry.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from tests.cluster.test_move import (PY, hostname_of, master_name, node_of, read_line,
                                     start_bpsh, stop, write_ctl)
from tests.conftest import as_user, command, pid_alive

pytestmark = pytest.mark.timeout(60)

# One line "n hostname pid" every `pause` s; exits 7 after `n` lines (or at SIGUSR1: 9).
COUNTER = ("import os, signal, socket, sys, time\n"
           "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(9))\n"
           "n, pause = int(sys.argv[1]), float(sys.argv[2])\n"
           "for i in range(1, n + 1):\n"
           "    print(i, socket.gethostname(), os.getpid(), flush=True)\n"
           "    time.sleep(pause)\n"
           "sys.exit(7)\n")


def start(cluster, n: int, pause: float, user=None, tail: str = ""):
    """bpsh 1 sh: the counter in the background, its pid first, then sh's wait status."""
    script = (f"{PY} -c \"$0\" {n} {pause} & echo child $!; wait $!; echo status=$?;"
              f"{tail}")
    p = start_bpsh(cluster, 1, "/bin/sh", "-c", script, COUNTER, user=user)
    words = read_line(p).split()
    assert words[0] == "child", words
    return p, int(words[1])


def lines_until_status(p) -> tuple[list[list[str]], str]:
    seen = []
    while True:
        line = read_line(p)
        if line.startswith("status=") or not line:
            return seen, line
        seen.append(line.split())


def until_host(p, host: str) -> list[str]:
    """The first line from `host` (lines written before a move come first), or the first
    that begins with `host` (a word the parent says)."""
    for _ in range(200):
        line = read_line(p).split()
        if not line or line[0] == host or (len(line) > 1 and line[1] == host):
            return line
    raise AssertionError(f"no line from {host}")


def relays_on(cluster, n: int) -> list[str]:
    """The stdio relays running on node `n`."""
    r = subprocess.run(command("bpsh") + [str(n), "pgrep", "-f", "bpfs.cli.bpsh.relay"],
                       env=cluster.env, capture_output=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    return r.stdout.decode().split()


def on_node(cluster, n: int, pid: int) -> bool:
    """`pid` is a process on node `n` (a zombie too)."""
    r = subprocess.run(command("bpsh") + [str(n), "test", "-e", f"/proc/{pid}"],
                       env=cluster.env, capture_output=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    return r.returncode == 0


def clean(cluster, pid: int) -> None:
    """No trace of `pid` left: not listed, no process (ghost) on the master."""
    cluster.wait_for(lambda: str(pid) not in os.listdir(os.path.join(cluster.mount, "procs"))
                     and not pid_alive(pid), timeout=10, what=f"{pid} gone")


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_forked_child_moves_to_another_node_and_its_parent_waits(cluster, users, who):
    user = users["alice"] if who == "alice" else None
    p, child = start(cluster, 30, 0.05, user)
    try:
        first = read_line(p).split()
        assert first[1] == hostname_of(1) and int(first[2]) == child
        assert write_ctl(cluster, child, "move 2\n", user) == 0
        assert node_of(cluster, child) == "2"
        seen, status = lines_until_status(p)
        assert status == "status=7", (seen, status)
        counts = [int(first[0])] + [int(w[0]) for w in seen]
        assert counts == list(range(1, 31)), counts
        assert seen[-1][1] == hostname_of(2)
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


def test_a_forked_child_moves_to_the_master_and_on(cluster):
    p, child = start(cluster, 40, 0.05)
    try:
        read_line(p)
        assert write_ctl(cluster, child, "move master\n") == 0
        assert str(child) not in os.listdir(os.path.join(cluster.mount, "procs"))
        time.sleep(0.3)
        assert write_ctl(cluster, child, "move 2\n") == 0
        assert node_of(cluster, child) == "2"
        seen, status = lines_until_status(p)
        assert status == "status=7", (seen, status)
        hosts = [w[1] for w in seen]
        assert master_name() in hosts and hosts[-1] == hostname_of(2), hosts
        assert [int(w[0]) for w in seen] == list(range(2, 41))
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


def kill_as(user, sig: int, pid: int) -> None:
    subprocess.run(as_user(["kill", f"-{sig}", str(pid)], user), check=True, timeout=20)


@pytest.mark.parametrize("who", ["root", "alice"])
@pytest.mark.parametrize("where", ["2", "master"])
def test_kill_from_the_master_reaches_the_moved_child(cluster, users, where, who):
    """SIGUSR1 (its handler exits 9) from the master; then SIGTERM: the shell sees the
    signal (143)."""
    user = users["alice"] if who == "alice" else None
    for sig, want in ((signal.SIGUSR1, "status=9"), (signal.SIGTERM, "status=143")):
        p, child = start(cluster, 400, 0.05, user)
        try:
            read_line(p)
            assert write_ctl(cluster, child, f"move {where}\n", user) == 0
            line = until_host(p, hostname_of(2) if where == "2" else master_name())
            assert line, "no line from where it moved"
            kill_as(user, sig, child)
            seen, status = lines_until_status(p)
            assert status == want, (seen, status)
            assert p.wait(timeout=20) == 0
            clean(cluster, child)
        finally:
            stop(p)


@pytest.mark.parametrize("who", ["root", "alice"])
@pytest.mark.parametrize("where", ["2", "master"])
def test_kill_from_the_parent_on_its_node_reaches_the_moved_child(cluster, users, where,
                                                                   who):
    """sh kills its child by its PID on node 1, where the stand-in takes the signal and
    passes it on: the handler runs where the child runs (exit 9)."""
    user = users["alice"] if who == "alice" else None
    script = (f"{PY} -c \"$0\" 400 0.05 & c=$!; echo child $c; sleep 1.5; kill -USR1 $c;"
              " wait $c; echo status=$?")
    p = start_bpsh(cluster, 1, "/bin/sh", "-c", script, COUNTER, user=user)
    try:
        child = int(read_line(p).split()[1])
        read_line(p)
        assert write_ctl(cluster, child, f"move {where}\n", user) == 0
        seen, status = lines_until_status(p)
        assert status == "status=9", (seen, status)
        host = hostname_of(2) if where == "2" else master_name()
        assert seen and seen[-1][1] == host, seen
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


@pytest.mark.parametrize("who", ["root", "alice"])
@pytest.mark.parametrize("where", ["2", "master"])
def test_a_sigkill_of_the_stand_in_kills_the_moved_child(cluster, users, where, who):
    """kill -9 of its PID on node 1 (another job there): the stand-in dies at once, the
    moved child too, and the shell sees SIGKILL (137)."""
    user = users["alice"] if who == "alice" else None
    p, child = start(cluster, 400, 0.05, user)
    try:
        read_line(p)
        assert write_ctl(cluster, child, f"move {where}\n", user) == 0
        read_line(p)
        r = subprocess.run(as_user(command("bpsh") + ["1", "kill", "-9", str(child)], user),
                           env=cluster.env, capture_output=True, timeout=20,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r
        seen, status = lines_until_status(p)
        assert status == "status=137", (seen, status)
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_forked_child_moves_back_into_its_stand_in_and_away_again(cluster, users, who):
    """node 1 -> 2 -> 1 (restored into its stand-in: sh's child there again) -> master
    -> 1 -> 0; its count goes on, and sh's wait gets its status."""
    user = users["alice"] if who == "alice" else None
    p, child = start(cluster, 400, 0.03, user)
    try:
        read_line(p)
        counts = []
        for target in ("2", "1", "master", "1", "0"):
            assert write_ctl(cluster, child, f"move {target}\n", user) == 0, target
            if target != "master":
                assert node_of(cluster, child) == target
            host = master_name() if target == "master" else hostname_of(int(target))
            for _ in range(100):            # lines written before the move, then its own
                line = read_line(p).split()
                counts.append(int(line[0]))
                if line[1] == host:
                    break
            else:
                raise AssertionError(f"no line from {host}")
        assert counts == list(range(2, 2 + len(counts))), counts
        kill_as(user, signal.SIGUSR1, child)
        seen, status = lines_until_status(p)
        assert status == "status=9", (seen, status)
        assert all(w[1] == hostname_of(0) for w in seen), seen
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


def test_a_child_back_in_its_stand_in_ends_as_sh_s_child(cluster):
    """Back on node 1 it is sh's child again: its end is sh's to see, by a signal from
    the master too."""
    p, child = start(cluster, 400, 0.03)
    try:
        read_line(p)
        assert write_ctl(cluster, child, "move 2\n") == 0
        assert write_ctl(cluster, child, "move 1\n") == 0
        assert read_line(p).split()[1] in (hostname_of(2), hostname_of(1))
        os.kill(child, signal.SIGTERM)
        seen, status = lines_until_status(p)
        assert status == "status=143", (seen, status)
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


@pytest.mark.parametrize("where", ["2", "master"])
def test_nothing_is_left_while_the_parent_lives_on(cluster, where):
    """Once the shell has waited for its moved child: no ghost or zombie of it on the
    master, no procs/ entry, no stand-in on node 1 (kill -0 there: no such process)."""
    p, child = start(cluster, 20, 0.05, tail="sleep 4")
    try:
        read_line(p)
        assert write_ctl(cluster, child, f"move {where}\n") == 0
        assert relays_on(cluster, 1)                # while it runs: its stdio's
        seen, status = lines_until_status(p)
        assert status == "status=7", (seen, status)
        cluster.wait_for(lambda: not os.path.exists(f"/proc/{child}"), timeout=2.5,
                         what="no ghost or zombie on the master")
        assert str(child) not in os.listdir(os.path.join(cluster.mount, "procs"))
        assert not on_node(cluster, 1, child)
        cluster.wait_for(lambda: not relays_on(cluster, 1), timeout=5,
                         what="no relay left on node 1")
        assert p.wait(timeout=20) == 0
    finally:
        stop(p)


def test_rforked_children_that_end_at_once_give_their_status(cluster):
    """The child ends right after its move (its end may reach the master before node 1
    has parked its stand-in): the parent's waitpid still gets each status."""
    from tests.cluster.test_libbproc_move import py
    from tests.cluster.test_libbproc import out
    r = py(cluster, """
import os
got = []
for i in range(8):
    pid = lb.rfork(2 if i % 2 else 0)
    if pid == 0:
        os._exit(20 + i)
    got.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
say(*got)
""", node=1, timeout=50)
    assert out(r).split() == [str(20 + i) for i in range(8)]


@pytest.mark.parametrize("where", ["2", "master"])
def test_an_orphan_forked_on_a_node_moves_and_ends(cluster, tmp_path, where):
    """sh exits at once: its child, writing to a file, is the node daemon's orphan there
    (its stand-in too, once it moved); it ends by itself, and nothing is left."""
    out = tmp_path / "out"
    os.chmod(tmp_path, 0o777)
    p = start_bpsh(cluster, 1, "/bin/sh", "-c", f"{PY} -c \"$0\" 30 0.05 > {out} 2>&1 & "
                   "echo child $!", COUNTER)
    try:
        child = int(read_line(p).split()[1])
        assert p.wait(timeout=20) == 0
        cluster.wait_for(lambda: out.exists() and out.read_text(), what="its first line")
        assert write_ctl(cluster, child, f"move {where}\n") == 0
        clean(cluster, child)
        cluster.wait_for(lambda: not on_node(cluster, 1, child), timeout=5,
                         what="no stand-in (nor its zombie) on node 1")
        lines = [ln.split() for ln in out.read_text().splitlines()]
        assert [int(w[0]) for w in lines] == list(range(1, 31))
        assert lines[-1][1] == (hostname_of(2) if where == "2" else master_name())
    finally:
        stop(p)


def test_a_moved_forked_child_reads_on_its_stdin(cluster):
    """sh's child reads the job's stdin (shared with sh): moved to node 2, what bpsh's
    stdin gives next still reaches it (through the relay on node 1), and its EOF."""
    from tests.cluster.test_move import ECHO
    p = start_bpsh(cluster, 1, "/bin/sh", "-c", f"{PY} -c \"$0\"; echo status=$?", ECHO,
                   stdin=subprocess.PIPE)
    try:
        assert p.stdin is not None
        words = read_line(p).split()
        assert words[0] == "ready", words
        child = int(words[1])
        p.stdin.write(b"a\n")
        p.stdin.flush()
        assert read_line(p) == f"a {hostname_of(1)}"
        assert write_ctl(cluster, child, "move 2\n") == 0
        p.stdin.write(b"b\n")
        p.stdin.flush()
        assert read_line(p) == f"b {hostname_of(2)}"
        assert write_ctl(cluster, child, "move 0\n") == 0
        p.stdin.write(b"c\n")
        p.stdin.close()
        assert read_line(p) == f"c {hostname_of(0)}"
        assert read_line(p) == "status=3"
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


def test_its_node_rebooting_takes_the_stand_in_and_the_parent(cluster):
    """Node 1 loses its master (reboot): sh and the stand-in die with everything there;
    the child on node 2 loses its stdio (the relay was on node 1) and ends; nothing is
    left, and node 1 comes back."""
    p, child = start(cluster, 400, 0.05)
    try:
        read_line(p)
        assert write_ctl(cluster, child, "move 2\n") == 0
        with open(os.path.join(cluster.mount, "nodes", "1", "ctl"), "w") as f:
            f.write("reboot\n")
        states = []
        cluster.wait_for(lambda: states.append(cluster.read("nodes/1/status").strip())
                         or states[-1] == "down", timeout=20, what="node 1 down")
        p.wait(timeout=20)
        clean(cluster, child)
    finally:
        stop(p)
        cluster.wait_for(lambda: cluster.read("nodes/1/status").strip() == "up", timeout=30,
                         what="node 1 up again")
    p, child = start(cluster, 30, 0.02)         # and serves as before
    try:
        read_line(p)        # it runs: python's start-up reads directories (fd 3), no move
        assert write_ctl(cluster, child, "move 2\n") == 0
        assert lines_until_status(p)[1] == "status=7"
        assert p.wait(timeout=20) == 0
    finally:
        stop(p)


@pytest.mark.parametrize("where", ["2", "master"])
def test_a_moved_child_that_dies_of_a_signal_of_its_own(cluster, where):
    """It aborts where it runs (SIGABRT): the shell on node 1 sees that signal (134)."""
    prog = ("import os, sys, time\nprint('up', flush=True)\ntime.sleep(0.6)\n"
            "os.abort()\n")
    script = f"{PY} -c \"$0\" & c=$!; echo child $c; wait $c; echo status=$?"
    p = start_bpsh(cluster, 1, "/bin/sh", "-c", script, prog)
    try:
        child = int(read_line(p).split()[1])
        assert read_line(p) == "up"
        assert write_ctl(cluster, child, f"move {where}\n") == 0
        assert read_line(p) == "status=134"
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


# The parent: forks the counter (exec'd), says its PID, then reports each waitpid
# (WUNTRACED | WCONTINUED) until the child has ended.
PARENT = ("import os, sys\n"
          "pid = os.fork()\n"
          "if pid == 0:\n"
          "    os.execv(sys.executable, [sys.executable, '-c', sys.argv[1], '400', '0.05'])\n"
          "print('child', pid, flush=True)\n"
          "while True:\n"
          "    _, st = os.waitpid(pid, os.WUNTRACED | os.WCONTINUED)\n"
          "    if os.WIFSTOPPED(st):\n"
          "        print('stopped', os.WSTOPSIG(st), flush=True)\n"
          "    elif os.WIFCONTINUED(st):\n"
          "        print('continued', flush=True)\n"
          "    else:\n"
          "        print('status', os.waitstatus_to_exitcode(st), flush=True)\n"
          "        break\n")


@pytest.mark.parametrize("where", ["2", "0"])
def test_its_parent_sees_the_moved_child_stop_and_go_on(cluster, where):
    p = start_bpsh(cluster, 1, PY, "-c", PARENT, COUNTER)
    try:
        child = int(read_line(p).split()[1])
        read_line(p)
        assert write_ctl(cluster, child, f"move {where}\n") == 0
        assert until_host(p, hostname_of(int(where)))
        os.kill(child, signal.SIGSTOP)
        assert until_host(p, "stopped") == ["stopped", str(int(signal.SIGSTOP))]
        os.kill(child, signal.SIGCONT)
        assert until_host(p, "continued") == ["continued"]
        os.kill(child, signal.SIGTERM)
        assert until_host(p, "status") == ["status", str(-signal.SIGTERM)]
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)


def test_a_sigkill_while_it_moves_ends_it_and_its_shell_sees_it(cluster):
    """kill -9 on node 1 the moment the node's tracer has the child (seized, stopped,
    dumped, waiting for its verdict: wherever the race falls): the move fails or
    succeeds, but the child dies, its shell sees SIGKILL, and nothing is left."""
    watch = ("while kill -0 {0} 2>/dev/null; do "
             "grep -q 'TracerPid:[[:space:]]*[1-9]' /proc/{0}/status && "
             "{{ kill -9 {0}; break; }}; done")
    for _ in range(5):
        p, child = start(cluster, 400, 0.05)
        try:
            read_line(p)
            killer = subprocess.Popen(command("bpsh") + ["1", "sh", "-c",
                                                         watch.format(child)],
                                      env=cluster.env, stdin=subprocess.DEVNULL)
            time.sleep(0.3)
            write_ctl(cluster, child, "move 2\n")   # ok, or the errno of its death
            out = p.communicate(timeout=20)[0].decode()
            assert "status=137\n" in out, out
            killer.wait(timeout=20)
            clean(cluster, child)
        finally:
            stop(p)


# Holds `mb` MB of random bytes; each line "n hostname pid crc" (the crc of all of them).
BIG = ("import os, socket, sys, time, zlib\n"
       "mb = int(sys.argv[1])\n"
       "buf = bytearray(os.urandom(1 << 20)) * mb\n"
       "for i in range(1, 400):\n"
       "    print(i, socket.gethostname(), os.getpid(), zlib.crc32(buf), flush=True)\n"
       "    time.sleep(0.05)\n"
       "sys.exit(7)\n")


@pytest.mark.timeout(120)
def test_a_big_forked_child_streams_away_and_back_into_its_stand_in(cluster):
    """48 MB (an image of several pieces, streamed to a node as it is dumped): node 1 ->
    2 -> 1 (put together, then restored into its stand-in) -> master -> 1; its memory is
    the same at every stop, and sh's wait gets its status."""
    p = start_bpsh(cluster, 1, "/bin/sh", "-c",
                   f"{PY} -c \"$0\" 48 & echo child $!; wait $!; echo status=$?", BIG)
    try:
        words = read_line(p).split()
        assert words[0] == "child", words
        child = int(words[1])
        crc = read_line(p).split()[3]
        for target in ("2", "1", "master", "1"):
            assert write_ctl(cluster, child, f"move {target}\n") == 0, target
            host = master_name() if target == "master" else hostname_of(int(target))
            line = until_host(p, host)
            assert line[1] == host and line[3] == crc, (target, line, crc)
        os.kill(child, signal.SIGUSR1)          # no handler: it dies of it
        seen, status = lines_until_status(p)
        assert status == f"status={128 + signal.SIGUSR1}", (seen, status)
        assert p.wait(timeout=20) == 0
        clean(cluster, child)
    finally:
        stop(p)

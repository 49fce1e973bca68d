"""Running processes move: `move N` / `move master` on /bproc/procs/P/ctl.

Real nodes, real programs (python3 holding state in memory, a reader of stdin, a reader
of a growing file), root and a plain user. What a user sees: the write returns once the
process runs where it was sent, its PID is the same everywhere, `procs/P/node` says where
at once, its output goes on in order with nothing lost or repeated, its stdin too, and its
end is its parent's to see; a move that cannot be done fails with a clear errno and the
process goes on where it was.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import time

import pytest

from tests.conftest import as_user, command, pid_alive

pytestmark = pytest.mark.timeout(120)

PY = "/usr/bin/python3"

# Counts, one line "n hostname pid" every `pause` s, its count in a dict (memory state);
# ends with exit code 7 after `n` lines.
COUNTER = ("import os, socket, sys, time\n"
           "state = {'n': 0}\n"
           "ballast = bytearray(os.urandom(1 << 20))\n"
           "n, pause = int(sys.argv[1]), float(sys.argv[2])\n"
           "while state['n'] < n:\n"
           "    state['n'] += 1\n"
           "    print(state['n'], socket.gethostname(), os.getpid(), len(ballast), flush=True)\n"
           "    time.sleep(pause)\n"
           "sys.exit(7)\n")

# Echoes each stdin line with where it was read; ends at EOF with exit code 3.
ECHO = ("import os, socket, sys\n"
        "print('ready', os.getpid(), flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(line.strip(), socket.gethostname(), flush=True)\n"
        "sys.exit(3)\n")


def move_when_it_can(cluster, pid: int, target: str, timeout: float = 10.0) -> int:
    """`move target`, written again while it is refused EBUSY: a python3 still starting
    holds a directory open (fd 3, "a directory being read": it cannot move), for longer
    than a test's pause on a loaded machine. 0, or the last errno."""
    deadline = time.monotonic() + timeout
    while True:
        err = write_ctl(cluster, pid, f"move {target}")
        if err != errno.EBUSY or time.monotonic() > deadline:
            return err
        time.sleep(0.02)


def write_ctl(cluster, pid: int, text: str, user=None) -> int:
    """Write `text` to procs/PID/ctl as `user`; 0, or the write's errno."""
    path = os.path.join(cluster.mount, "procs", str(pid), "ctl")
    if user is None:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            return exc.errno or -1
        try:
            os.write(fd, text.encode())
            return 0
        except OSError as exc:
            return exc.errno or -1
        finally:
            os.close(fd)
    script = ("import os, sys\n"
              "try:\n"
              "    fd = os.open(sys.argv[1], os.O_WRONLY); os.write(fd, sys.argv[2].encode())\n"
              "except OSError as e:\n"
              "    sys.exit(e.errno)\n")
    r = subprocess.run(as_user([PY, "-c", script, path, text], user), timeout=60,
                       capture_output=True)
    return r.returncode


def node_of(cluster, pid: int) -> str:
    return cluster.read(f"procs/{pid}/node").strip()


def hostname_of(n: int) -> str:
    return f"n{n}"


def master_name() -> str:
    return os.uname().nodename


def start_bpsh(cluster, node: int, *argv: str, user=None, stdin=subprocess.DEVNULL
               ) -> subprocess.Popen:
    return subprocess.Popen(as_user(command("bpsh") + [str(node), *argv], user),
                            env=cluster.env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/", start_new_session=True)


def read_line(p: subprocess.Popen) -> str:
    assert p.stdout is not None
    return p.stdout.readline().decode().strip()


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)


@pytest.mark.parametrize("who", ["root", "alice"])
def test_a_running_process_moves_from_node_to_node_and_back_with_its_state(
        cluster, users, who) -> None:
    user = users["alice"] if who == "alice" else None
    p = start_bpsh(cluster, 1, PY, "-c", COUNTER, "40", "0.05", user=user)
    try:
        first = read_line(p).split()
        pid = int(first[2])
        assert first[1] == hostname_of(1)
        seen = [first]
        for target in ("2", "0", "master", "1", "2"):
            t0 = time.monotonic()
            assert write_ctl(cluster, pid, f"move {target}\n", user) == 0
            took = time.monotonic() - t0
            if target != "master":
                assert node_of(cluster, pid) == target       # at once
            else:           # a master process again: not listed; its procs/P has a ctl only
                assert str(pid) not in os.listdir(os.path.join(cluster.mount, "procs"))
                assert os.listdir(os.path.join(cluster.mount, "procs", str(pid))) == ["ctl"]
            want = master_name() if target == "master" else hostname_of(int(target))
            while True:
                line = read_line(p).split()
                seen.append(line)
                if line[1] == want:
                    break
                assert len(seen) < 40, seen
            assert took < 5, took
            assert os.path.exists(f"/proc/{pid}")           # the same PID on the master
        out, err = p.communicate(timeout=30)
        lines = seen + [ln.split() for ln in out.decode().splitlines()]
        numbers = [int(ln[0]) for ln in lines]
        assert numbers == list(range(1, 41)), numbers        # nothing lost, nothing twice
        assert all(ln[2] == str(pid) and ln[3] == str(1 << 20) for ln in lines)
        assert p.returncode == 7, err.decode()               # its end is bpsh's to see
    finally:
        stop(p)
    assert not pid_alive(pid)


def test_a_master_process_moves_to_a_node_and_its_parent_sees_its_end(cluster, tmp_path) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as f:
        child = subprocess.Popen([PY, "-c", COUNTER, "30", "0.05"], stdout=f,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        cluster.wait_for(lambda: out.read_text().count("\n") >= 3, what="first lines")
        assert write_ctl(cluster, child.pid, "move 2") == 0
        assert node_of(cluster, child.pid) == "2"
        with open(f"/proc/{child.pid}/status") as st:
            assert "TracerPid:\t0" not in st.read()         # its ghost, here
        assert child.wait(timeout=30) == 7                   # our waitpid: its real end
        lines = [ln.split() for ln in out.read_text().splitlines()]
        assert [int(ln[0]) for ln in lines] == list(range(1, 31))
        hosts = [ln[1] for ln in lines]
        assert hosts[0] == master_name() and hosts[-1] == hostname_of(2), hosts
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_stdin_goes_on_across_moves(cluster) -> None:
    p = start_bpsh(cluster, 0, PY, "-c", ECHO, stdin=subprocess.PIPE)
    assert p.stdin is not None
    try:
        pid = int(read_line(p).split()[1])
        got = []
        for k, target in enumerate(("1", "master", "2", None)):
            for i in range(5):
                p.stdin.write(f"line{k * 5 + i}\n".encode())
            p.stdin.flush()
            for i in range(5):
                got.append(read_line(p).split())
            if target is not None:
                p.stdin.write(f"early{k}\n".encode())        # written before the move ...
                p.stdin.flush()
                assert write_ctl(cluster, pid, f"move {target}") == 0
                got.append(read_line(p).split())            # ... read after it, once
        p.stdin.close()
        assert p.wait(timeout=20) == 3
        words = [g[0] for g in got]
        assert words == ["line0", "line1", "line2", "line3", "line4", "early0",
                         "line5", "line6", "line7", "line8", "line9", "early1",
                         "line10", "line11", "line12", "line13", "line14", "early2",
                         "line15", "line16", "line17", "line18", "line19"], words
        assert got[6][1] == hostname_of(1) and got[12][1] == master_name()
        assert got[-1][1] == hostname_of(2)
    finally:
        stop(p)


def test_a_file_being_read_is_read_on_from_where_it_was(cluster, tmp_path) -> None:
    data = tmp_path / "data"
    data.write_text("".join(f"rec{i}\n" for i in range(5)))
    os.chmod(tmp_path, 0o755)
    reader = ("import socket, sys, time\n"
              "f = open(sys.argv[1])\n"
              "while True:\n"
              "    line = f.readline()\n"
              "    if not line:\n"
              "        time.sleep(0.02); continue\n"
              "    print(line.strip(), socket.gethostname(), flush=True)\n"
              "    if line.startswith('end'): break\n")
    p = start_bpsh(cluster, 1, PY, "-c", reader, str(data))
    try:
        got = [read_line(p).split() for _ in range(5)]
        pid = int(cluster.read("nodes/1/procs").split()[0])
        assert write_ctl(cluster, pid, "move 2") == 0
        with open(data, "a") as f:
            f.write("rec5\nend\n")
        got += [read_line(p).split() for _ in range(2)]
        assert [g[0] for g in got] == ["rec0", "rec1", "rec2", "rec3", "rec4", "rec5", "end"]
        assert got[-1][1] == hostname_of(2)
        assert p.wait(timeout=20) == 0
    finally:
        stop(p)


def test_moves_that_cannot_be_done_fail_clearly_and_the_process_goes_on(cluster, users) -> None:
    alice, bob = users["alice"], users["bob"]
    p = start_bpsh(cluster, 1, PY, "-c", COUNTER, "1000", "0.05", user=alice)
    holder = None
    try:
        pid = int(read_line(p).split()[2])
        assert write_ctl(cluster, pid, "move 2", bob) == errno.EPERM      # not bob's
        assert write_ctl(cluster, pid, "move 9") == errno.ENODEV           # no node 9
        assert write_ctl(cluster, pid, "move nowhere") == errno.EINVAL
        assert write_ctl(cluster, pid, "move 1") == 0                      # there already
        node2 = os.path.join(cluster.mount, "nodes", "2")
        os.chmod(node2, 0o100)                                             # root only
        try:
            assert write_ctl(cluster, pid, "move 2", alice) == errno.EPERM
        finally:
            os.chmod(node2, 0o111)
        cluster.run("bpctl", "-S", "2", "-s", "unavailable", check=True)
        try:
            assert write_ctl(cluster, pid, "move 2") == errno.EHOSTDOWN      # not up
        finally:
            cluster.run("bpctl", "-S", "2", "-s", "up", check=True)
        assert node_of(cluster, pid) == "1"
        before = int(read_line(p).split()[0])
        assert int(read_line(p).split()[0]) == before + 1                 # it goes on
        # a pipe that is not its stdio cannot move: EBUSY, and it goes on where it was
        holder = start_bpsh(cluster, 0, PY, "-c",
                            "import os, time; r, w = os.pipe(); print(os.getpid(), flush=True)"
                            "\nwhile True: time.sleep(0.05); print('tick', flush=True)")
        hpid = int(read_line(holder))
        assert write_ctl(cluster, hpid, "move 1") == errno.EBUSY
        assert read_line(holder) == "tick" and node_of(cluster, hpid) == "0"
        # threads: EBUSY too
        threads = start_bpsh(cluster, 0, PY, "-c",
                             "import os, threading, time\n"
                             "threading.Thread(target=time.sleep, args=(60,), daemon=True)"
                             ".start()\nprint(os.getpid(), flush=True)\n"
                             "while True: time.sleep(0.05); print('tick', flush=True)")
        try:
            tpid = int(read_line(threads))
            assert write_ctl(cluster, tpid, "move 2") == errno.EBUSY
            assert read_line(threads) == "tick"
        finally:
            stop(threads)
    finally:
        stop(p)
        if holder is not None:
            stop(holder)


def test_two_moves_at_once_one_waits_its_turn_or_is_told_ebusy(cluster) -> None:
    p = start_bpsh(cluster, 0, PY, "-c", COUNTER, "1000", "0.02")
    try:
        pid = int(read_line(p).split()[2])
        path = os.path.join(cluster.mount, "procs", str(pid), "ctl")
        movers = [subprocess.Popen([PY, "-c",
                                    "import os, sys\ntry:\n"
                                    "    fd = os.open(sys.argv[1], os.O_WRONLY)\n"
                                    "    os.write(fd, sys.argv[2].encode())\n"
                                    "except OSError as e: sys.exit(e.errno)",
                                    path, f"move {n}"]) for n in (1, 2)]
        codes = sorted(m.wait(timeout=60) for m in movers)
        assert codes in ([0, 0], [0, errno.EBUSY]), codes
        where = node_of(cluster, pid)
        assert where in ("1", "2")
        hosts = [read_line(p).split()[1] for _ in range(60)]      # lines from before, then
        assert hosts[-1] == hostname_of(int(where)), hosts       # from where it is now
    finally:
        stop(p)
    # bpsh gone, the process ends at its next line (its link is gone), then its ghost
    cluster.wait_for(lambda: not pid_alive(pid), timeout=5, what=f"{pid} gone")


def test_a_moved_process_dies_by_a_signal_sent_to_its_ghost(cluster) -> None:
    p = start_bpsh(cluster, 2, PY, "-c", COUNTER, "1000", "0.05")
    try:
        pid = int(read_line(p).split()[2])
        assert write_ctl(cluster, pid, "move 0") == 0
        os.kill(pid, signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 255 and b"exited abnormally" in err   # bpsh's word for it
    finally:
        stop(p)
    cluster.wait_for(lambda: not os.path.exists(os.path.join(cluster.mount, "procs",
                                                             str(pid))),
                     what="procs/PID gone")
    assert not pid_alive(pid)


def test_bpmove_moves_a_users_processes_and_says_why_not(cluster, users) -> None:
    alice, bob = users["alice"], users["bob"]
    p = start_bpsh(cluster, 0, PY, "-c", COUNTER, "1000", "0.05", user=alice)
    try:
        pid = int(read_line(p).split()[2])
        r = cluster.run("bpmove", "2", str(pid), user=alice)
        assert r.returncode == 0, r.stderr
        assert node_of(cluster, pid) == "2"
        r = cluster.run("bpmove", "1", str(pid), user=bob)
        assert r.returncode == 1
        assert r.stderr.decode() == f"bpmove: {pid}: {os.strerror(errno.EPERM)}\n"
        r = cluster.run("bpmove", "master", str(pid), user=alice)
        assert r.returncode == 0, r.stderr
        assert cluster.run("bpmove", "x", str(pid)).returncode == 2
        assert cluster.run("bpmove", "--help").stdout.startswith(b"Usage: bpmove")
    finally:
        stop(p)


# Sets up state a move must carry, then on each SIGUSR1 (a handler) prints it.
STATEFUL = ("import os, resource, signal, socket, sys, time\n"
            "os.umask(0o027); os.chdir('/tmp')\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (123, 456))\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "asked = []\n"
            "signal.signal(signal.SIGUSR1, lambda *a: asked.append(1))\n"
            "print('ready', os.getpid(), flush=True)\n"
            "while True:\n"
            "    time.sleep(0.02)\n"
            "    if asked:\n"
            "        asked.clear()\n"
            "        m = os.umask(0); os.umask(m)\n"
            "        print(socket.gethostname(), os.getcwd(), oct(m),\n"
            "              resource.getrlimit(resource.RLIMIT_NOFILE),\n"
            "              sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),\n"
            "              sorted(int(s) for s in signal.sigpending()), os.getuid(),\n"
            "              signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, flush=True)\n")


@pytest.mark.parametrize("who", ["root", "alice"])
def test_signal_state_cwd_umask_rlimits_and_ids_survive_a_move(cluster, users, who) -> None:
    user = users["alice"] if who == "alice" else None
    p = start_bpsh(cluster, 1, PY, "-c", STATEFUL, user=user)
    try:
        pid = int(read_line(p).split()[1])
        kill = (lambda sig: os.kill(pid, sig)) if user is None else \
            (lambda sig: cluster.sh(f"kill -{sig.name[3:]} {pid}", user=user))
        kill(signal.SIGUSR2)                    # blocked: stays pending, and moves with it
        uid = str(user.uid if user else 0)
        for target in ("2", "master", "0"):
            assert write_ctl(cluster, pid, f"move {target}", user) == 0
            kill(signal.SIGTERM)                # ignored there too
            kill(signal.SIGUSR1)                # its handler runs where it is
            words = read_line(p).replace(",", " ").replace("(", " ").replace(")", " ")
            words = words.replace("[", " ").replace("]", " ").split()
            want = master_name() if target == "master" else hostname_of(int(target))
            assert words == [want, "/tmp", "0o27", "123", "456", str(int(signal.SIGUSR2)),
                             str(int(signal.SIGUSR2)), uid, "True"], words
    finally:
        stop(p)


def test_a_master_process_goes_out_and_comes_back_many_times_with_one_relay(cluster) -> None:
    child = subprocess.Popen([PY, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    assert child.stdin is not None and child.stdout is not None
    try:
        pid = int(child.stdout.readline().split()[1])
        got = []
        for k, target in enumerate(("1", "master", "2", "master", "0", None)):
            child.stdin.write(f"a{k}\nb{k}\n".encode())
            child.stdin.flush()
            got += [child.stdout.readline().decode().split() for _ in range(2)]
            if target is not None:
                assert write_ctl(cluster, pid, f"move {target}") == 0
        relays = subprocess.run(["pgrep", "-x", f"bprelay {pid}"],
                                capture_output=True, text=True).stdout.split()
        assert len(relays) == 1, relays                 # made once, its links made again
        child.stdin.close()
        assert child.wait(timeout=20) == 3
        assert [g[0] for g in got] == [w for k in range(6) for w in (f"a{k}", f"b{k}")]
        places = [g[1] for g in got[::2]]
        assert places == [master_name(), hostname_of(1), master_name(), hostname_of(2),
                          master_name(), hostname_of(0)], places
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def node_copies(pid: int) -> list[int]:
    """Host PIDs of processes whose PID in their own namespace is `pid` (on nodes)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                ns = next((ln.split()[1:] for ln in f if ln.startswith("NSpid:")), [])
        except OSError:
            continue
        if len(ns) > 1 and ns[-1] == str(pid):
            out.append(int(name))
    return out


@pytest.mark.parametrize("target", ["2", "master"])
def test_a_process_killed_while_it_moves_leaves_nothing_behind(cluster, target) -> None:
    big = ("import os, sys, time\nblob = bytearray(os.urandom(64 << 20))\n"
           "print(os.getpid(), flush=True)\nwhile True: time.sleep(0.05)\n")
    p = start_bpsh(cluster, 1, PY, "-c", big)
    try:
        pid = int(read_line(p))
        mover = subprocess.Popen([PY, "-c",
                                  "import os, sys\ntry:\n"
                                  "    fd = os.open(sys.argv[1], os.O_WRONLY)\n"
                                  "    os.write(fd, sys.argv[2].encode())\n"
                                  "except OSError as e: sys.exit(e.errno)",
                                  os.path.join(cluster.mount, "procs", str(pid), "ctl"),
                                  f"move {target}"])
        time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)                # the ghost, or the process itself
        code = mover.wait(timeout=60)
        assert code in (0, errno.ESRCH, errno.EIO), code
        p.wait(timeout=30)
        cluster.wait_for(lambda: not pid_alive(pid) and not node_copies(pid), timeout=10,
                         what="no ghost and no copy on any node")
        cluster.wait_for(lambda: str(pid) not in os.listdir(os.path.join(cluster.mount,
                                                                          "procs")),
                         what="procs/PID gone")
    finally:
        stop(p)


def test_an_exec_ctl_process_keeps_its_output_across_moves(cluster) -> None:
    from tests.cluster.test_exec_ctl import read_to_eof, started
    prog = ("import socket, time; [(print(i, socket.gethostname(), flush=True), "
            "time.sleep(0.05)) for i in range(30)]")
    pid = started(cluster, 1, f"exec -- {PY} -c {shlex.quote(prog)}\n")
    time.sleep(0.2)
    assert move_when_it_can(cluster, pid, "2") == 0
    time.sleep(0.2)
    assert move_when_it_can(cluster, pid, "0") == 0
    out = read_to_eof(os.path.join(cluster.mount, "procs", str(pid), "stdout")).decode()
    lines = [ln.split() for ln in out.splitlines()]
    assert [int(ln[0]) for ln in lines] == list(range(30)), out
    hosts = [ln[1] for ln in lines]
    assert hosts[0] == "n1" and "n2" in hosts and hosts[-1] == "n0", hosts


def test_a_parent_with_a_child_does_not_move_its_child_forked_on_a_node_does(cluster
                                                                             ) -> None:
    """The parent: EBUSY (its child would lose it); the child moves (it stands in on node
    1: tests/cluster/test_nodefork_move.py), and back."""
    p = start_bpsh(cluster, 1, "/bin/sh", "-c", "sleep 30 & echo $$ $!; wait")
    try:
        parent, child = (int(x) for x in read_line(p).split())
        path = os.path.join(cluster.mount, "procs", str(child), "ctl")
        cluster.wait_for(lambda: os.path.exists(path), what="the child's procs entry")
        assert write_ctl(cluster, parent, "move 2") == errno.EBUSY     # it has a child here
        assert write_ctl(cluster, child, "move 2") == 0                # forked on the node
        assert node_of(cluster, parent) == "1" and node_of(cluster, child) == "2"
        assert write_ctl(cluster, child, "move 1") == 0                # into its stand-in
        assert node_of(cluster, child) == "1"
        os.kill(child, signal.SIGTERM)
        assert p.wait(timeout=20) == 0
    finally:
        stop(p)

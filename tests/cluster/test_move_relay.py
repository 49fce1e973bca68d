"""The stdio relay of a plain master process that moves to a node, as the master runs it:
forked by its relay fork-server (bpfs/cli/bpsh/relayfork.py), as the process's user, gone
with the process, gone with the master; a fork-server that was killed is replaced, and
moves go on meanwhile (the relay spawned the old way)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import as_user

pytestmark = pytest.mark.timeout(120)

PY = "/usr/bin/python3"

# Echoes each stdin line with where it was read; ends at EOF with exit code 3.
ECHO = ("import os, socket, sys\n"
        "print('ready', os.getpid(), flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(line.strip(), socket.gethostname(), flush=True)\n"
        "sys.exit(3)\n")


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def alive(pid: int) -> bool:
    try:
        return status(pid)["State"][:1] not in ("Z", "X")
    except (OSError, KeyError):
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def master_pid(cluster) -> int:
    with open(os.path.join(cluster.state_dir, "pids", "master.pid")) as f:
        return int(f.read().split()[0])


def fork_server(cluster, timeout: float = 10) -> int:
    """The master's relay fork-server (its child running bpfs.cli.bpsh.relayfork)."""
    master = master_pid(cluster)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if name.isdigit() and "bpfs.cli.bpsh.relayfork" in cmdline(int(name)):
                try:
                    if int(status(int(name))["PPid"]) == master and alive(int(name)):
                        return int(name)
                except (OSError, KeyError):
                    pass
        time.sleep(0.05)
    raise AssertionError(f"no relay fork-server under master {master}")


def relay_of(pid: int) -> int:
    """The relay serving `pid`: named `bprelay PID`."""
    r = subprocess.run(["pgrep", "-x", f"bprelay {pid}"], capture_output=True, text=True)
    found = [int(x) for x in r.stdout.split()]
    assert len(found) == 1, found
    return found[0]


def wait_for(what, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def move(cluster, pid: int, target: str, user=None) -> int:
    """`move target` on procs/PID/ctl as `user`: 0 or the errno."""
    path = os.path.join(cluster.mount, "procs", str(pid), "ctl")
    script = ("import os, sys\n"
              "try:\n"
              "    fd = os.open(sys.argv[1], os.O_WRONLY); os.write(fd, sys.argv[2].encode())\n"
              "except OSError as e:\n"
              "    sys.exit(e.errno)\n")
    return subprocess.run(as_user([PY, "-c", script, path, f"move {target}"], user),
                          timeout=60).returncode


class Echo:
    """A plain master process (ECHO) as `user`, its stdin and stdout pipes ours."""

    def __init__(self, user=None) -> None:
        self.p = subprocess.Popen(as_user([PY, "-c", ECHO], user), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.pid = int(self.line().split()[1])

    def line(self) -> str:
        assert self.p.stdout is not None
        return self.p.stdout.readline().decode().strip()

    def say(self, text: str) -> str:
        assert self.p.stdin is not None
        self.p.stdin.write(f"{text}\n".encode())
        self.p.stdin.flush()
        return self.line()

    def end(self) -> int:
        assert self.p.stdin is not None
        self.p.stdin.close()
        return self.p.wait(timeout=30)

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.kill()
        self.p.wait(timeout=10)


def test_the_relay_is_forked_runs_as_the_user_and_ends_with_its_process(cluster, users):
    alice = users["alice"]
    e = Echo(alice)
    try:
        assert move(cluster, e.pid, "1", alice) == 0
        assert e.say("hello") == "hello n1"
        relay = relay_of(e.pid)
        st = status(relay)
        assert st["Uid"].split() == [str(alice.uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(alice.gid)] * 4, st["Gid"]
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == 0     # no root left
        assert set(st["Groups"].split()) == set(status(e.pid)["Groups"].split())
        assert int(st["PPid"]) == fork_server(cluster)       # forked, not spawned
        assert os.getsid(relay) == relay
        assert e.end() == 3
        wait_for(lambda: not alive(relay))
    finally:
        e.kill()


def test_a_killed_fork_server_is_replaced_and_moves_go_on(make_cluster):
    cluster = make_cluster(nodes=2)
    old = fork_server(cluster)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old))
    first, second = Echo(), Echo()
    try:
        assert move(cluster, first.pid, "1") == 0          # at once: replaced, or spawned
        assert first.say("one") == "one n1"
        new = fork_server(cluster)
        assert new != old
        assert move(cluster, second.pid, "0") == 0
        assert second.say("two") == "two n0"
        assert int(status(relay_of(second.pid))["PPid"]) == new
        assert first.end() == 3 and second.end() == 3
    finally:
        first.kill()
        second.kill()
    assert alive(master_pid(cluster))                       # the master lives on


def test_a_fork_server_that_hangs_is_killed_and_the_relay_spawned(make_cluster):
    cluster = make_cluster(nodes=2)
    hung = fork_server(cluster)
    os.kill(hung, signal.SIGSTOP)
    e = Echo()
    try:
        t0 = time.monotonic()
        assert move(cluster, e.pid, "1") == 0               # after the server's time out
        assert 1.5 < time.monotonic() - t0 < 10
        assert e.say("spawned") == "spawned n1"
        relay = relay_of(e.pid)
        assert int(status(relay)["PPid"]) == master_pid(cluster)     # the old way
        assert "bpfs.cli.bpsh.relay " in cmdline(relay)
        wait_for(lambda: not alive(hung))
        assert fork_server(cluster) != hung
        assert e.end() == 3
        wait_for(lambda: not alive(relay))
    finally:
        e.kill()


def test_bpfs_down_leaves_no_relay_and_no_fork_server(make_cluster):
    cluster = make_cluster(nodes=2)
    server = fork_server(cluster)
    e = Echo()
    try:
        assert move(cluster, e.pid, "1") == 0
        assert e.say("there") == "there n1"
        relay = relay_of(e.pid)
        assert cluster.down().returncode == 0
        assert not alive(server) and not alive(relay)
        assert not alive(e.pid)                             # its ghost went with the master
    finally:
        e.kill()

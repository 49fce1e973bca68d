"""The cluster seen from a node: /bproc at the master's mount point, for a node's processes.

Each check runs twice: on the embedded cluster (node daemons in their own PID, mount and
UTS namespaces, sharing the master's kernel and loopback), and on a node daemon that
reaches the master only over a veth pair into a network namespace this module makes
(`bpslave --master 10.x.y.1:PORT`, as on another machine; the master listens on that
address only). Programs run on node 1 through bpsh, as root and as the test users: the
files read as on the master; a plain user may change no node's state and signal nobody
else's process; root may; execmove and exec from a node are EOPNOTSUPP, with the reason
readable back from the ctl handle. A bpslave without namespaces of its own unmounts its
/bproc when it stops.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import (CTL_WRITER, PY, Cluster, _new_cluster, _teardown, as_user, command,
                            is_root, mounted)

pytestmark = pytest.mark.timeout(180)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    return r.stdout.decode()


def on_node(c: Cluster, *argv: str, user=None, node: str = "1") -> subprocess.CompletedProcess:
    return c.run("bpsh", node, *argv, user=user, timeout=60)


def ctl_write(c: Cluster, path: str, line: str, user=None) -> tuple[int, str]:
    """Write `line` to `path` from node 1: (errno, the handle's text read back)."""
    out = ok(on_node(c, PY, "-c", CTL_WRITER, path, line, user=user)).strip()
    err, _, text = out.partition(" ")
    return int(err), text


# ---- the two clusters -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(src_dir: str) -> Iterator[Cluster]:
    if not is_root():
        pytest.skip("the embedded cluster needs root (FUSE mount, namespaces)")
    c = _new_cluster(src_dir, 3)
    try:
        c.up()
        yield c
    finally:
        _teardown(c)


class Netns:
    """A network namespace with a veth pair to it: 10.213.X.1 here, 10.213.X.2 there."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.name, self.host_if, self.ns_if = f"bpfsnf{tag}", f"bnfh{tag}", f"bnfn{tag}"
        x = random.randrange(1, 250)
        self.here, self.there = f"10.213.{x}.1", f"10.213.{x}.2"

    def make(self) -> None:
        ip = ["ip", "netns", "exec", self.name, "ip"]
        for cmd in (["ip", "netns", "add", self.name],
                    ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
                     "netns", self.name],
                    ["ip", "addr", "add", f"{self.here}/30", "dev", self.host_if],
                    ["ip", "link", "set", self.host_if, "up"],
                    ip + ["addr", "add", f"{self.there}/30", "dev", self.ns_if],
                    ip + ["link", "set", self.ns_if, "up"], ip + ["link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_up(c: Cluster, node: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), c.logs()
        try:
            if c.read(f"nodes/{node}/status").strip() == "up":
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"node {node} not up\n{c.logs()}")


@pytest.fixture(scope="module")
def remote(src_dir: str) -> Iterator[Cluster]:
    """A master listening only on a veth address; nodes 1 and 2 bpslaves in a network
    namespace (node 0 stays down)."""
    if not is_root() or not shutil.which("ip"):
        pytest.skip("network namespaces need root and ip(8)")
    c = _new_cluster(src_dir, 3)
    net, procs = Netns(), []
    logs = Path(c.state_dir, "logs")
    logs.mkdir()
    key = os.path.join(c.state_dir, "cluster.key")
    try:
        net.make()
        ok(c.run("bpfs", "keygen", "--key", key))
        with open(logs / "master.log", "wb") as log:
            procs.append(subprocess.Popen(
                command("bpfs") + ["master", "--mount", c.mount, "--listen", net.here,
                                   "--port", str(c.port), "--key", key, "--nodes", "3",
                                   "--state-file", os.path.join(c.state_dir, "state"),
                                   "--ping-timeout", "2"],
                env=c.env, stdout=log, stderr=log, cwd="/", start_new_session=True))
        deadline = time.monotonic() + 20
        while not mounted(c.mount) and time.monotonic() < deadline:
            time.sleep(0.05)
        for n in (1, 2):
            with open(logs / f"node-{n}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", net.name] + command("bpslave") + [
                        "--master", f"{net.here}:{c.port}", "--node", str(n), "--key", key,
                        "--hostname", f"n{n}", "--unmount", c.mount],
                    env=c.env, stdout=log, stderr=log, cwd="/", start_new_session=True))
        for n in (1, 2):
            _wait_up(c, n, procs)
        c.master_host = net.here         # type: ignore[attr-defined]
        yield c
    finally:
        for p in reversed(procs):
            _stop(p)
        if mounted(c.mount):
            subprocess.run(["fusermount3", "-u", "-z", c.mount], check=False)
        net.remove()
        shutil.rmtree(os.path.dirname(c.mount), ignore_errors=True)


@pytest.fixture(params=["embedded", "remote"])
def c(request) -> Cluster:
    return request.getfixturevalue(request.param)


# ---- what a node's processes see --------------------------------------------------------

def test_reads_from_a_node_are_the_masters(c: Cluster, users) -> None:
    if hasattr(c, "master_host"):       # node 1 is reached over the veth pair, and only so
        assert c.read("nodes/1/info").startswith(f"address: {c.master_host[:-1]}2\n")
    for user in (None, users["alice"]):
        assert ok(on_node(c, "cat", f"{c.mount}/status", user=user)) == c.read("status")
        assert ok(on_node(c, "cat", f"{c.mount}/nodes/1/status", user=user)) == "up\n"
        assert ok(on_node(c, "cat", f"{c.mount}/nodes/0/info", user=user)).startswith(
            "address: ")


def test_procs_from_a_node_shows_the_callers_own_pid(c: Cluster, users) -> None:
    for user in (None, users["alice"]):
        out = ok(on_node(c, "sh", "-c", f'echo $$; ls {c.mount}/procs; '
                         f'cat {c.mount}/procs/$$/status', user=user)).split("\n")
        pid = out[0]
        assert pid in out[1:], out
        assert "node: 1" in out and f"uid: {user.uid if user else 0}" in out, out


def test_a_process_started_from_a_cwd_under_bproc_runs_from_the_root(c: Cluster) -> None:
    """The node daemon restores processes from the thread that serves its /bproc: a chdir
    there would wait on itself, so such a process starts from /, as one whose cwd the node
    lacks does."""
    r = c.run("bpsh", "1", "pwd", cwd=os.path.join(c.mount, "nodes"), timeout=30)
    assert ok(r) == "/\n"


def test_bpstat_runs_on_a_node(c: Cluster, users) -> None:
    for user in (None, users["alice"]):
        out = ok(on_node(c, *command("bpstat"), user=user))
        assert out == ok(c.run("bpstat")), out
        assert "up" in out


def test_a_plain_user_on_a_node_changes_no_state_root_does(c: Cluster, users) -> None:
    ctl = f"{c.mount}/nodes/2/ctl"
    before = c.read("nodes/2/status")
    r = on_node(c, "sh", "-c", f"echo state unavailable > {ctl}", user=users["alice"])
    assert r.returncode != 0 and c.read("nodes/2/status") == before
    assert ctl_write(c, ctl, "state unavailable", users["alice"]) == (
        errno.EPERM, "only root may set the state of node 2")
    assert ok(on_node(c, "sh", "-c", f"echo state unavailable > {ctl}")) == ""
    try:
        assert c.read("nodes/2/status") == "unavailable\n"
    finally:
        ok(c.sh(f"echo state up > {ctl}"))


def test_a_plain_user_on_a_node_signals_nobody_elses_process_root_does(c: Cluster,
                                                                         users) -> None:
    p = subprocess.Popen(as_user(command("bpsh") + ["1", "sh", "-c", "echo $$; exec sleep 100"],
                                 users["bob"]), env=c.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd="/")
    try:
        pid = int(p.stdout.readline())
        signal_file = f"{c.mount}/procs/{pid}/signal"
        assert ctl_write(c, signal_file, "9", users["alice"])[0] == errno.EPERM
        assert p.poll() is None
        assert ctl_write(c, signal_file, "9") == (0, "ok")
        assert p.wait(20) != 0
    finally:
        _stop(p)


READER = """
import os, signal, sys
def interrupted(*_):
    raise InterruptedError
signal.signal(signal.SIGUSR1, interrupted)
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    while True:         # news may come too (a fork on a node is an event): read on
        os.read(fd, 65536)
except InterruptedError:
    print("interrupted")
"""


def test_a_blocked_events_reader_on_a_node_is_interrupted(c: Cluster) -> None:
    """A reader of `events` waits on the master for news; a signal it handles (sent on
    the node) interrupts the read: the node sees the signal pending, answers EINTR and
    tells the master to drop the read. (pyfuse3 passes no FUSE_INTERRUPT on, and a handled
    signal is not fatal: without this the read would wait for news.) News may come first:
    every fork on a node is an event now (the one PID space), and a read that returns
    data runs the handler too; the reader reads on until it does."""
    script = f"{PY} -c '{READER}' {c.mount}/events & sleep 1; kill -USR1 $!; wait $!"
    r = on_node(c, "sh", "-c", script)
    assert r.stdout == b"interrupted\n", r


def test_exec_needs_the_writers_process_on_the_master_and_is_eopnotsupp_from_a_node(
        c: Cluster, users) -> None:
    err, text = ctl_write(c, f"{c.mount}/nodes/2/ctl", "exec hostname", users["alice"])
    assert err == errno.EOPNOTSUPP, text
    assert "from a process on node 1 is not supported: use execmove" in text


def test_execmove_from_a_node_arms_the_writer(c: Cluster, users) -> None:
    """The writer, a process of node 1, has a ghost on the master: armed (`ok PID`); the
    launch itself is tests/cluster/test_launch_from_node.py's."""
    err, text = ctl_write(c, f"{c.mount}/nodes/2/ctl", "execmove --port 5 --token " + "ab" * 16,
                          users["alice"])
    assert err == 0 and text.startswith("ok "), text


def test_chmod_from_a_node_is_the_owners(c: Cluster, users) -> None:
    node2 = f"{c.mount}/nodes/2"
    assert on_node(c, "chmod", "0100", node2, user=users["alice"]).returncode != 0
    assert os.stat(node2).st_mode & 0o777 == 0o111
    try:
        ok(on_node(c, "chmod", "0110", node2))
        assert os.stat(node2).st_mode & 0o777 == 0o110
    finally:
        os.chmod(node2, 0o111)


# ---- a node daemon without namespaces of its own unmounts what it mounted -----------------

def test_bpslave_without_namespaces_unmounts_its_bproc_when_it_stops(remote: Cluster) -> None:
    """A bpslave in a mount namespace held by another process (as on a real node, where
    the mount would outlive the daemon): /bproc answers there, and is gone after SIGTERM."""
    c = remote
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "300"])
    slave = None
    try:
        time.sleep(0.2)
        enter = ["nsenter", "-t", str(holder.pid), "-m", "--"]
        subprocess.run(enter + ["umount", "-l", c.mount], check=True, timeout=10)
        with open(Path(c.state_dir, "logs", "node-0.log"), "wb") as log:
            slave = subprocess.Popen(enter + command("bpslave") + [
                "--master", f"{c.master_host}:{c.port}", "--node", "0",  # type: ignore
                "--no-namespace", "--key", os.path.join(c.state_dir, "cluster.key")],
                env=c.env, stdout=log, stderr=log, cwd="/")
        _wait_up(c, 0, [slave])
        deadline = time.monotonic() + 10
        while f" {c.mount} " not in _mounts(holder.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        r = subprocess.run(enter + ["cat", f"{c.mount}/nodes/0/status"], capture_output=True,
                           timeout=10)
        assert r.stdout == b"up\n", (r, c.logs())
        slave.send_signal(signal.SIGTERM)
        assert slave.wait(15) == 0
        assert f" {c.mount} " not in _mounts(holder.pid)
    finally:
        if slave is not None:
            _stop(slave)
        holder.kill()
        holder.wait()


def _mounts(pid: int) -> str:
    return Path(f"/proc/{pid}/mountinfo").read_text()


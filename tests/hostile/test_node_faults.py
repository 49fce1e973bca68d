"""Faults around a bpsh run: a node daemon that hangs instead of dying, requests too long
for one ctl write, programs the master refuses to migrate.

- A node daemon stopped with SIGSTOP (alive, silent) is marked down by the master after
  the ping timeout, which kills its ghosts; bpsh must end with its ghost, as it does
  when the node daemon is killed, not wait on stdio links that only the stopped daemon
  would close (it did, 98 s, until the daemon was continued).
- `bpsh` on 1,024 nodes or more: the `execmove --nodes` request must stay one ctl write
  under ctl.MAX_CTL_WRITE (the node list goes in its compact form), and a write over the
  limit says what was too long, both to a shell reading the ctl handle back and to the
  bpsh user.
- A set-user-ID program is refused (EPERM) with a reason; the user must see the reason,
  not only `N: Operation not permitted`.

The node daemons' PIDs come from `bpfs up`'s records (STATE_DIR/pids/node-N.pid, "PID
STARTTIME"); a record is used only while the start time still matches, and a stopped
daemon is continued in `finally`.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import (CTL_WRITER, PY, Cluster, as_user, command, free_port, is_root,
                            mounted)

PING_TIMEOUT = 2.0          # what tests/conftest.py's clusters are started with


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def daemon_pid(c: Cluster, node: int) -> int:
    """The PID of node `node`'s daemon, from `bpfs up`'s record, checked against its start
    time so that a reused PID is never signalled."""
    pid, start = (int(w) for w in
                  Path(c.state_dir, "pids", f"node-{node}.pid").read_text().split()[:2])
    assert start_time(pid) == start, f"node {node}'s daemon (pid {pid}) is gone"
    return pid


@dataclass
class Outcome:
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float          # from the fault to bpsh's end


def bpsh_through_fault(c: Cluster, node: int, sig: int) -> Outcome:
    """`bpsh NODE sh -c 'echo started; sleep 30'`; once it has started, `sig` goes to the
    node's daemon. A stopped daemon is continued before returning, whatever happened."""
    p = subprocess.Popen(command("bpsh") + [str(node), "sh", "-c", "echo started; sleep 30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=c.env, cwd="/")
    daemon = 0
    try:
        assert p.stdout is not None and p.stderr is not None
        ready, _, _ = select.select([p.stdout], [], [], 20)
        assert ready, "bpsh printed nothing in 20 s"
        first = p.stdout.readline()
        assert first == b"started\n", (first, p.stderr.read1())
        daemon = daemon_pid(c, node)
        start = time.monotonic()
        os.kill(daemon, sig)
        try:
            out, err = p.communicate(timeout=PING_TIMEOUT + 20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"bpsh still waits {PING_TIMEOUT + 20:.0f} s after the "
                                 f"node's daemon got signal {sig}") from None
        return Outcome(p.returncode, out, err, time.monotonic() - start)
    finally:
        if sig == signal.SIGSTOP and daemon:
            os.kill(daemon, signal.SIGCONT)
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.timeout(150)
def test_bpsh_ends_with_its_ghost_when_the_node_hangs_as_when_it_dies(make_cluster) -> None:
    c = make_cluster(nodes=2)
    hung = bpsh_through_fault(c, 1, signal.SIGSTOP)
    # the master needs the ping timeout (and a heartbeat) to call the node down; then the
    # ghost dies and bpsh must follow within a second or two, not wait for the node
    assert hung.seconds < PING_TIMEOUT + 5, hung
    c.wait_for(lambda: c.read("nodes/1/status").strip() == "up", timeout=30,
               what="node 1 to come back once continued")
    r = c.run("bpsh", "1", "echo", "back")
    assert (r.returncode, r.stdout) == (0, b"back\n"), r.stderr

    dead = bpsh_through_fault(c, 1, signal.SIGKILL)
    assert dead.seconds < PING_TIMEOUT + 5, dead
    print(f"bpsh ended {hung.seconds:.2f} s after its node's daemon was stopped, "
          f"{dead.seconds:.3f} s after it was killed (ping timeout {PING_TIMEOUT} s)")
    assert (hung.returncode, hung.stdout, hung.stderr) == \
        (dead.returncode, dead.stdout, dead.stderr) == \
        (255, b"", b"bpsh: Child process on node 1 exited abnormally.\n")


# ---- healthy nodes lose nothing ------------------------------------------------------------

@pytest.mark.timeout(300)
def test_output_written_right_before_the_exit_is_never_lost(cluster: Cluster) -> None:
    """Many runs of processes that write a lot and exit at once: every line arrives, from
    every rank, also when the ghosts are reaped long before bpsh has read it all (a
    reader that waits: bpsh blocks on its stdout while the links hold megabytes)."""
    script = 'seq -f "$BPROC_RANK %g" 1 100000; seq -f "$BPROC_RANK %g" 1 1000 >&2'

    def want(ranks: int, count: int) -> list[bytes]:
        return sorted(b"%07d %d" % (r, i) for r in range(ranks) for i in range(1, count + 1))

    for _ in range(12):
        r = cluster.run("bpsh", "-L", "0,1,2,0,1,2", "sh", "-c", script, timeout=60)
        assert r.returncode == 0, r.stderr[-500:]
        assert sorted(r.stdout.splitlines()) == want(6, 100000)
        assert sorted(r.stderr.splitlines()) == want(6, 1000)
    for _ in range(2):
        p = subprocess.Popen(command("bpsh") + ["-L", "0-2", "sh", "-c", script],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=cluster.env, cwd="/")
        time.sleep(3)               # longer than bpsh's grace: the ghosts are long reaped
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-500:]
        assert sorted(out.splitlines()) == want(3, 100000)
        assert sorted(err.splitlines()) == want(3, 1000)


# ---- requests too long for one ctl write ---------------------------------------------------

def test_an_over_long_ctl_write_says_what_was_too_long(cluster: Cluster, users) -> None:
    line = "execmove --port 1 --token " + "a" * 32 + " --nodes " + ",".join(["0"] * 2100)
    r = subprocess.run(as_user([PY, "-c", CTL_WRITER, f"{cluster.mount}/nodes/0/ctl", line],
                               users["alice"]), capture_output=True, text=True, timeout=30)
    assert r.stdout == f"22 control message 'execmove' is {len(line)} bytes, over the " \
                       "4096-byte limit\n", r.stderr


def test_bpsh_says_why_a_request_was_refused(cluster: Cluster, users) -> None:
    """A node list that cannot be made short (every other node, 2,200 ranks) is refused
    whole: the reason once, then bproc's line for every rank."""
    nodes = list(range(0, 4400, 2))
    r = cluster.run("bpsh", ",".join(map(str, nodes)), "true", user=users["alice"])
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1
    assert lines[0].startswith("bpsh: control message 'execmove' is ") and \
        lines[0].endswith(" bytes, over the 4096-byte limit"), lines[0]
    assert lines[1:] == [f"{n}: Invalid argument" for n in nodes]


@pytest.fixture
def big_master(src_dir: str) -> Iterator[tuple[str, dict]]:
    """A master configured with 1,100 nodes, of which only node 0 runs (one bpslave)."""
    if not is_root():
        pytest.skip("the master mounts FUSE and bpslave makes namespaces: root only")
    base = tempfile.mkdtemp(prefix="bpfs-big-")
    os.chmod(base, 0o755)
    mount, key, port = os.path.join(base, "mnt"), os.path.join(base, "key"), free_port()
    os.mkdir(mount)
    env = dict(os.environ, PYTHONPATH=src_dir, BPROC_MOUNT=mount, PYTHONDONTWRITEBYTECODE="1")
    procs: list[subprocess.Popen] = []
    log = open(os.path.join(base, "log"), "wb")
    try:
        subprocess.run(command("bpfs") + ["keygen", "--key", key], env=env, check=True,
                       capture_output=True, timeout=30)
        procs.append(subprocess.Popen(
            command("bpfs") + ["master", "--mount", mount, "--listen", "127.0.0.1", "--port",
                               str(port), "--key", key, "--nodes", "1100", "--state-file",
                               os.path.join(base, "state"), "--ping-timeout", "5"],
            env=env, stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        while not (mounted(mount) and os.path.exists(f"{mount}/nodes/1099/status")):
            assert time.monotonic() < deadline and procs[0].poll() is None, "master not up"
            time.sleep(0.05)
        procs.append(subprocess.Popen(
            command("bpslave") + ["--master", f"127.0.0.1:{port}", "--node", "0", "--key", key],
            env=env, stdout=log, stderr=log))
        while Path(mount, "nodes/0/status").read_text().strip() != "up":
            assert time.monotonic() < deadline and procs[1].poll() is None, "node 0 not up"
            time.sleep(0.05)
        yield mount, env
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        log.close()
        if mounted(mount):
            subprocess.run(["fusermount3", "-u", "-z", mount], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(120)
def test_bpsh_on_1100_nodes_is_one_request(big_master) -> None:
    """`bpsh 0-1099`: the request names 1,100 ranks in a few bytes; the master takes it,
    the rank on the node that is up runs, every other rank says its node is down."""
    mount, env = big_master
    r = subprocess.run(command("bpsh") + ["0-1099", "sh", "-c", 'echo "rank $BPROC_RANK"'],
                       capture_output=True, env=env, timeout=60, cwd="/")
    assert r.returncode == 1
    assert r.stdout == b"rank 0000000\n"
    assert r.stderr.decode().splitlines() == [f"{n}: Host is down" for n in range(1, 1100)]


# ---- programs the master refuses -----------------------------------------------------------

SETUID = next((p for p in ("/usr/bin/passwd", "/usr/bin/chsh", "/usr/bin/newgrp")
               if os.path.exists(p) and os.stat(p).st_mode & 0o4000), None)


@pytest.mark.skipif(SETUID is None, reason="no set-user-ID program to try")
@pytest.mark.parametrize("nodes", ["1", "1,2"])
def test_a_refused_set_user_id_program_says_why(cluster: Cluster, users, nodes: str) -> None:
    r = cluster.run("bpsh", nodes, SETUID, "--help", user=users["alice"])
    why = f"bpsh: {SETUID}: set-user-ID programs cannot migrate"
    assert r.returncode == 255
    assert r.stderr.decode().splitlines() == \
        [why] + [f"{n}: Operation not permitted" for n in nodes.split(",")]

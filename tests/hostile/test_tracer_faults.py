"""Faults of the master's tracer: a ghost it cannot end as asked must still end.

The promise: whatever fails in the tracer while it handles one ghost, that ghost ends (the
real status when possible, else SIGKILL) and its bpsh returns; the other ghosts go on.

It once broke on every master without CAP_SYS_RESOURCE (this machine's root, Docker's default
set): ending a ghost "killed by signal S" lowered its RLIMIT_CORE with prlimit() from the
master, which needs that capability for another user's process. For a non-root user whose
process died of SIGTERM, SIGINT, SIGUSR1 or SIGSEGV, prlimit failed with EPERM, the ghost
stayed in its ptrace-stop, bpsh never returned (a `timeout` SIGTERM did not end it) and
procs/P stayed.

The master here is started without CAP_SYS_RESOURCE whatever the machine gives root:
`bpfs up` runs under `setpriv --bounding-set -sys_resource` (util-linux, as `as_user`),
so root's execs (the master, the nodes) never get it back.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from typing import Iterator

import pytest

from tests.cluster.test_master import Master, master  # noqa: F401 - a fixture
from tests.cluster.test_master_procs import (fake_node, reap, request, restored, wait_exit,
                                             wait_for, writer)
from tests.conftest import (Cluster, User, _new_cluster, _teardown, as_user, command,
                            is_root, pid_alive)

pytestmark = pytest.mark.timeout(90)

CAP_SYS_RESOURCE = 24
NO_SYS_RESOURCE = ["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource",
                   "--"]
# each ends the shell on the node; none is ignored by a non-interactive sh
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGSEGV]
SOON = 10.0         # "within a few seconds", with room for a loaded machine
HANG = 30.0         # a bpsh still running by then hangs for ever (the defect)


def has_cap(pid: int, cap: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        eff = next(ln for ln in f if ln.startswith("CapEff:")).split()[1]
    return bool(int(eff, 16) >> cap & 1)


def master_pid(c: Cluster) -> int:
    with open(os.path.join(c.state_dir, "pids", "master.pid")) as f:
        return int(f.read().split()[0])


@pytest.fixture(scope="module")
def capless(src_dir: str) -> Iterator[Cluster]:
    """A 2-node embedded cluster whose master lacks CAP_SYS_RESOURCE."""
    if not is_root():
        pytest.skip("the embedded cluster needs root (FUSE mount, namespaces)")
    c = _new_cluster(src_dir, 2)
    try:
        r = subprocess.run(
            NO_SYS_RESOURCE + command("bpfs") + [
                "up", "--nodes", "2", "--mount", c.mount, "--state-dir", c.state_dir,
                "--port", str(c.port), "--ping-timeout", "2", "--detach"],
            capture_output=True, timeout=120, env=c.env, cwd="/")
        assert r.returncode == 0, f"bpfs up: {r.stderr.decode()}\n{c.logs()}"
        assert not has_cap(master_pid(c), CAP_SYS_RESOURCE)
        yield c
    finally:
        _teardown(c)


def ended_soon(c: Cluster, argv: list[str], user: User) -> tuple[subprocess.CompletedProcess,
                                                                  float]:
    t0 = time.monotonic()
    try:
        r = c.run(*argv, user=user, timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv} as {user.name} still running after {HANG:g} s\n{c.logs()}")
    return r, time.monotonic() - t0


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_users_process_killed_by_a_signal_ends_bpsh(capless: Cluster, users, sig) -> None:
    """bpsh's documented answer for a remote process that died of a signal: the message and
    255, within seconds; its procs/P goes."""
    bob = users["bob"]
    r, took = ended_soon(capless, ["bpsh", "1", "sh", "-c", f"echo $$; kill -{sig} $$"], bob)
    pid = int(r.stdout.split()[0])
    assert r.returncode == 255, r
    assert r.stderr.decode() == "bpsh: Child process on node 1 exited abnormally.\n"
    assert took < SOON
    capless.wait_for(lambda: not os.path.exists(f"{capless.mount}/procs/{pid}"), 5,
                     f"procs/{pid} to go")
    assert not pid_alive(pid)


def spawn(argv: list[str], env: dict[str, str]) -> int:
    """argv as our own child, in /, not reaped by anyone else (no subprocess.Popen)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir("/")
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_the_ghosts_parent_sees_it_killed_by_that_signal(capless: Cluster, users, sig) -> None:
    """`bpsh -N` on one node becomes the ghost itself: this test is its parent, and waitpid
    gives the ghost's own status: killed by that signal, no core dumped."""
    bob = users["bob"]
    argv = as_user(command("bpsh") + ["-N", "1", "sh", "-c", f"kill -{sig} $$"], bob)
    pid = spawn(argv, capless.env)
    status, t0 = None, time.monotonic()
    try:
        while time.monotonic() - t0 < HANG:
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:
                status = st
                break
            time.sleep(0.02)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status is not None, f"the ghost {pid} still there after {HANG:g} s\n" \
                               f"{capless.logs()}"
    assert time.monotonic() - t0 < SOON
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig, hex(status)
    assert not os.WCOREDUMP(status)
    capless.wait_for(lambda: not os.path.exists(f"{capless.mount}/procs/{pid}"), 5,
                     f"procs/{pid} to go")


def test_the_tracer_goes_on_for_the_others(capless: Cluster, users) -> None:
    """After all of the above, the same master still migrates, forwards and ends ghosts."""
    bob = users["bob"]
    r, _ = ended_soon(capless, ["bpsh", "1", "sh", "-c", "exit 7"], bob)
    assert r.returncode == 7, r
    r, _ = ended_soon(capless, ["bpsh", "0", "sh", "-c", "kill -HUP $$"], bob)
    assert r.returncode == 255, r


def test_a_users_limits_go_with_the_process(capless: Cluster, users) -> None:
    """The dump reads the process's resource limits; prlimit() on another user's process
    needs CAP_SYS_RESOURCE even to read, and every limit was silently left behind."""
    bob = users["bob"]
    r, _ = ended_soon(capless, ["bpsh", "1", "sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -c"],
                      bob)
    here = subprocess.run(as_user(["sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -c"], bob),
                          capture_output=True, text=True).stdout
    assert r.returncode == 0 and r.stdout.decode() == here, (r, here)
    script = ("ulimit -Sn 77; ulimit -Hn 99; ulimit -c 0; exec " + shlex.join(command("bpsh"))
              + " 1 sh -c 'ulimit -Sn; ulimit -Hn; ulimit -c'")
    r = subprocess.run(as_user(["sh", "-c", script], bob), capture_output=True, text=True,
                       timeout=HANG, env=capless.env, cwd="/")
    assert (r.returncode, r.stdout) == (0, "77\n99\n0\n"), r


# ---- a node's report the tracer cannot act on: the ghost still ends ----

async def test_an_end_no_process_can_have_still_ends_the_ghost(master: Master) -> None:
    """A node (buggy or hostile) reports that the process ended by a signal that ends no
    process (SIGSTOP, SIGCHLD, 99): the tracer refuses such a finish (EINVAL), which once
    left the ghost parked and its parent waiting for ever. It dies by SIGKILL instead, the
    real status being unknowable; procs/P goes."""
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        for bad in (signal.SIGSTOP, signal.SIGCHLD, 99):
            proc = writer(master, 0, request())
            try:
                await restored(master, node, proc)
                await node.fs.send({"t": "exited", "pid": proc.pid, "code": None,
                                    "signal": bad})
                assert await wait_exit(proc, SOON) == -signal.SIGKILL
                await wait_for(lambda: not os.path.exists(master.path(f"procs/{proc.pid}")),
                               what="procs/PID removed")
            finally:
                reap(proc)

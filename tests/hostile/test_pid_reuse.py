"""A ctl handle outlives its opener, and the opener's PID goes to root (issue: what must
never happen, 1).

execmove and exec act on the process that opened nodes/N/ctl (pyfuse3 tells `write` nothing
of its caller). bpfs-alice opens the file in a child that hands the fd to its parent and
exits; the test gives the child's PID to a root process (ns_last_pid = PID - 1, then fork;
again until it lands, since other processes fork too) and alice writes `execmove` through
the surviving fd. The write must fail (ESRCH) and root's process must not notice: never
traced, its next exec runs here, its exit code its own. Likewise an opener that ran a
set-user-ID program after opening is no longer alice (EPERM), and the plain case (bpsh)
still works. The pins cost the master no file descriptor once their handles are closed.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Iterator

import pytest
import trio

from tests.cluster.test_master import fake_node, master, wait_for  # noqa: F401 - a fixture
from tests.cluster.test_master_procs import proc_state, request, restored, wait_exit, writer
from tests.cluster.test_node import FakeMaster, children, make_key, start_node, stop
from tests.cluster.test_node_migrate import FakeBpsh, NodeUnderTest, make_image
from tests.conftest import PY, Cluster, User, as_user

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
TOKEN = "0123456789abcdef0123456789abcdef"
REQUEST = (f"execmove --port 1 --token {TOKEN} --rank 0 --stdin null --stdout null "
           "--stderr null")

# Run as alice: a child opens argv[1] (nodes/N/ctl) for writing, hands the fd over a
# socket and exits (argv[2] == "exit", reaped here) or execs argv[2] (a set-user-ID
# program). Prints the child's PID, then for each line on stdin writes it through the fd
# and prints "ERRNO TEXT" (the handle's text read back). Ends at EOF.
OPENER = r"""
import os, socket, sys
ctl, mode = sys.argv[1], sys.argv[2]
a, b = socket.socketpair()
pid = os.fork()
if pid == 0:
    fd = os.open(ctl, os.O_RDWR)
    socket.send_fds(b, [b"x"], [fd])
    if mode == "exit":
        os._exit(0)
    os.execv(mode, [mode, "60"])
_, fds, _, _ = socket.recv_fds(a, 1, 1)
if mode == "exit":
    os.waitpid(pid, 0)
print(pid, flush=True)
for line in sys.stdin:
    try:
        os.write(fds[0], line.encode())
        err = 0
    except OSError as e:
        err = e.errno
    print(err, os.pread(fds[0], 4096, 0).decode().strip(), flush=True)
"""

# Root's process: waits for a line, then execs a program that prints where it runs.
ROOT_PROG = ["sh", "-c", "read x; exec sh -c 'hostname; exit 7'"]


@pytest.fixture(scope="module")
def setuid_sleep() -> Iterator[str]:
    """A set-user-ID root copy of sleep that alice can run."""
    d = tempfile.mkdtemp(prefix="bpfs-suid-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "sleep")
    shutil.copy(shutil.which("sleep") or "/bin/sleep", path)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Opener:
    """Alice's process holding a nodes/N/ctl fd whose opener (a child) is `pid`."""

    def __init__(self, c: Cluster, user: User, node: int, mode: str) -> None:
        self.proc = subprocess.Popen(
            as_user([PY, "-c", OPENER, os.path.join(c.mount, f"nodes/{node}/ctl"), mode],
                    user), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd="/")
        line = self.proc.stdout.readline()
        assert line, "the opener script failed"
        self.pid = int(line)

    def write(self, text: str) -> tuple[int, str]:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        err, _, readback = self.proc.stdout.readline().strip().partition(" ")
        return int(err), readback

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def reuse_pid(target: int, argv: list[str], tries: int = 300) -> subprocess.Popen:
    """A root process started with PID `target` (which must be free)."""
    if not os.access(NS_LAST_PID, os.W_OK):
        pytest.skip("cannot write ns_last_pid")
    for _ in range(tries):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(target - 1))
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if p.pid == target:
            return p
        p.kill()
        p.wait()
    raise AssertionError(f"PID {target} could not be reused in {tries} tries")


def status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


def reap(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


@pytest.mark.timeout(90)
def test_execmove_through_a_handle_whose_opener_pid_went_to_root(cluster: Cluster,
                                                                users) -> None:
    opener = Opener(cluster, users["alice"], 1, "exit")
    root = None
    try:
        root = reuse_pid(opener.pid, ROOT_PROG)
        err, text = opener.write(REQUEST)
        assert err == errno.ESRCH, (err, text)
        assert f"process {opener.pid}, which opened this file, has ended" in text
        assert status_field(root.pid, "TracerPid") == "0"
        out, _ = root.communicate("go\n", timeout=30)     # its next exec: here, as root
        assert (root.returncode, out.strip()) == (7, socket.gethostname())
    finally:
        opener.close()
        if root is not None:
            reap(root)


@pytest.mark.timeout(90)
def test_exec_through_a_handle_whose_opener_pid_went_to_root(cluster: Cluster,
                                                            users) -> None:
    """`exec` reads the opener's environment: never root's, whose PID it now is."""
    opener = Opener(cluster, users["alice"], 1, "exit")
    root = None
    try:
        root = reuse_pid(opener.pid, ["env", "SECRET=root-only", *ROOT_PROG])
        err, text = opener.write("exec env")
        assert err == errno.ESRCH, (err, text)
        out, _ = root.communicate("go\n", timeout=30)
        assert root.returncode == 7
        for pid in os.listdir(cluster.mount + "/procs"):    # nothing was started
            try:
                assert "cmd: env\n" not in cluster.read(f"procs/{pid}/status")
            except FileNotFoundError:
                pass
    finally:
        opener.close()
        if root is not None:
            reap(root)


@pytest.mark.timeout(90)
def test_execmove_refused_once_the_opener_ran_a_setuid_program(cluster: Cluster, users,
                                                               setuid_sleep: str) -> None:
    opener = Opener(cluster, users["alice"], 1, setuid_sleep)
    try:
        deadline = time.monotonic() + 10
        while status_field(opener.pid, "Uid").split()[1] != "0":   # exec'd: euid 0
            assert time.monotonic() < deadline, "the set-user-ID program did not start"
            time.sleep(0.02)
        err, text = opener.write(REQUEST)
        assert err == errno.EPERM, (err, text)
        assert "is no longer the user it was" in text
        assert status_field(opener.pid, "TracerPid") == "0"
        err, text = opener.write("exec env")
        assert err == errno.EPERM, (err, text)
    finally:
        try:
            os.kill(opener.pid, 9)
        except ProcessLookupError:
            pass
        opener.close()


def test_the_writer_itself_still_migrates(cluster: Cluster, users) -> None:
    r = cluster.run("bpsh", "1", "hostname", user=users["alice"])
    assert (r.returncode, r.stdout.decode().strip()) == (0, "n1"), r.stderr.decode()


def _master_fds(c: Cluster) -> tuple[int, int]:
    """The master's open descriptors: (all, pidfds)."""
    with open(os.path.join(c.state_dir, "pids", "master.pid")) as f:
        pid = int(f.read().split()[0])
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return len(links), sum("pidfd" in link for link in links)


def _fds_settle(c: Cluster, pidfds: int, timeout: float = 5.0) -> tuple[int, int]:
    """The master's descriptors once it holds `pidfds` pidfds, or as they are at the
    deadline: close() does not wait for FUSE's RELEASE, so the master drops a closed
    handle's pin a moment after close() returned."""
    deadline = time.monotonic() + timeout
    while (fds := _master_fds(c))[1] != pidfds and time.monotonic() < deadline:
        time.sleep(0.02)
    return fds


def test_pins_are_closed_with_their_handles(cluster: Cluster) -> None:
    ctl = os.path.join(cluster.mount, "nodes/0/ctl")
    before = _fds_settle(cluster, _master_fds(cluster)[1])
    for i in range(1000):
        fd = os.open(ctl, os.O_RDWR)
        if i % 100 == 0:
            assert _fds_settle(cluster, before[1] + 1)[1] == before[1] + 1   # this handle's pin
            with pytest.raises(OSError):        # a refused write leaves nothing open either
                os.write(fd, b"frobnicate\n")
        os.close(fd)
    after = _fds_settle(cluster, before[1])
    assert after[1] == before[1] and after[0] <= before[0] + 2, (before, after)


def _master_pin_limit(c: Cluster) -> int:
    """bpfs.fs.ops.pin_limit() as the master computes it, from its own RLIMIT_NOFILE."""
    from bpfs.fs.ops import MAX_PINS_PER_UID
    with open(os.path.join(c.state_dir, "pids", "master.pid")) as f:
        pid = int(f.read().split()[0])
    soft = resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_PINS_PER_UID
    return max(1, min(MAX_PINS_PER_UID, soft // 8))


OPEN_MANY = r"""
import errno, os, sys
fds = []
try:
    while len(fds) < int(sys.argv[2]):
        fds.append(os.open(sys.argv[1], os.O_WRONLY))
    print(len(fds), 0)
except OSError as e:
    print(len(fds), e.errno)
"""


@pytest.mark.timeout(60)
def test_a_user_holds_a_bounded_number_of_pinned_handles(cluster: Cluster, users) -> None:
    limit = _master_pin_limit(cluster)
    ctl = os.path.join(cluster.mount, "nodes/0/ctl")
    r = subprocess.run(as_user([PY, "-c", OPEN_MANY, ctl, str(limit + 5)],
                               users["alice"]), capture_output=True, text=True, timeout=50)
    assert r.stdout.split() == [str(limit), str(errno.EMFILE)], r.stderr
    fd = os.open(ctl, os.O_WRONLY)      # root is not bounded, and alice's are released
    os.close(fd)
    r = subprocess.run(as_user([PY, "-c", OPEN_MANY, ctl, "3"], users["alice"]),
                       capture_output=True, text=True, timeout=50)
    assert r.stdout.split() == ["3", "0"], r.stderr


# ---- the tracer lets go of a process it seized by mistake ---------------------------------

STRANGER = r"""
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: print("usr1", flush=True))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(5))
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""


class _Twice:
    """A pin's check that passes once, then finds the process gone (it was reaped and its
    number reused between the check and the seize)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        from bpfs.errors import BpfsError
        self.calls += 1
        if self.calls > 1:
            raise BpfsError(errno.ESRCH, "gone")


def _wait_untraced(pid: int) -> None:
    deadline = time.monotonic() + 5
    while status_field(pid, "TracerPid") != "0":
        assert time.monotonic() < deadline, f"process {pid} is still traced"
        time.sleep(0.01)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stopped", [False, True])
def test_the_tracer_releases_a_process_seized_by_mistake(stopped: bool) -> None:
    from bpfs.migrate.errors import MigrateError  # noqa: F401 - ptrace needs root: skip first
    from bpfs.migrate.tracer import Tracer
    if os.geteuid() != 0:
        pytest.skip("ptrace of another process needs root")
    ends: list[tuple[int, int]] = []
    tracer = Tracer(lambda pid, sig: None, lambda pid, st: ends.append((pid, st)))
    tracer.start()
    s = subprocess.Popen([PY, "-c", STRANGER], stdout=subprocess.PIPE, text=True)
    try:
        assert s.stdout.readline() == "ready\n"
        if stopped:
            os.kill(s.pid, 19)                  # SIGSTOP: a group-stop stays one
            while status_field(s.pid, "State")[0] != "T":
                time.sleep(0.01)
        check = _Twice()
        with pytest.raises(Exception) as exc:
            tracer.seize(s.pid, check).result(5)
        assert getattr(exc.value, "errno", None) == errno.ESRCH and check.calls == 2
        _wait_untraced(s.pid)
        if stopped:                             # detached, it stops again at once
            deadline = time.monotonic() + 5
            while status_field(s.pid, "State")[0] != "T":
                assert time.monotonic() < deadline, "the released process runs"
                time.sleep(0.01)
            time.sleep(0.2)
            assert status_field(s.pid, "State")[0] == "T"
            os.kill(s.pid, 18)                  # SIGCONT
        os.kill(s.pid, 10)                      # SIGUSR1: its handler runs, as ever
        assert s.stdout.readline() == "usr1\n"
        s.terminate()
        assert s.wait(5) == 5
        time.sleep(0.1)
        assert ends == []                       # never reported as one of ours
    finally:
        reap(s)
        tracer.stop()


# ---- the wire: a message about a pid says which migration's process it means ---------------

async def test_a_stale_exit_does_not_end_the_ghost_of_a_reused_pid(master) -> None:
    """The node's `exited` for a pid names its restore: an exit of another migration's
    process with that pid (overtaken by the reuse) leaves the ghost alone; signals to the
    ghost go out with its migration's id."""
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        proc = writer(master, 0, request())
        try:
            msg = await restored(master, node, proc)
            os.kill(proc.pid, 15)
            await wait_for(lambda: [m for m in node.received if m["t"] == "signal"],
                           what="the signal")
            sig = [m for m in node.received if m["t"] == "signal"][0]
            assert (sig["pid"], sig["sig"], sig["id"]) == (proc.pid, 15, msg["id"])
            await node.fs.send({"t": "exited", "pid": proc.pid, "code": 3, "signal": None,
                                "id": msg["id"] + 1000})
            await trio.sleep(0.3)
            assert proc.poll() is None and proc_state(master, proc.pid) == "running"
            await node.fs.send({"t": "exited", "pid": proc.pid, "code": 7, "signal": None,
                                "id": msg["id"]})
            assert await wait_exit(proc) == 7
        finally:
            reap(proc)


@pytest.mark.timeout(60)
async def test_the_node_signals_only_the_process_restored_for_that_id(tmp_path) -> None:
    """A signal for a pid the node holds, but for another restore (an old message overtaken
    by the pid's reuse), reaches no one; its exit report names the restore."""
    async with trio.open_nursery() as nursery:
        fm = FakeMaster(make_key(tmp_path / "key"), heartbeat=0.1)
        await nursery.start(fm.serve)
        bpsh = FakeBpsh()
        await nursery.start(bpsh.serve)
        proc = await start_node(tmp_path, fm.port, tmp_path / "key", "--node", "1", "-r")
        try:
            conn = await fm.next_conn()
            with trio.fail_after(10):
                await conn.wait_for("state")
            (daemon,) = children(proc.pid)
            node = NodeUnderTest(conn, bpsh, daemon, tmp_path / "node-0.log")
            data, img = make_image(["/bin/sleep", "100"])
            reply = await node.restore(data, io=("null", "null", "null"))
            assert reply["t"] == "restored", reply
            await conn.fs.send({"t": "signal", "pid": img.pid, "sig": 9,
                                "id": reply["id"] + 1000})
            await trio.sleep(0.3)
            assert not [m for m in conn.inbox if m["t"] == "exited"]
            await conn.fs.send({"t": "signal", "pid": img.pid, "sig": 9, "id": reply["id"]})
            ex = await node.exited(img.pid)
            assert (ex["signal"], ex["id"]) == (9, reply["id"])
        finally:
            await stop(proc)
            nursery.cancel_scope.cancel()

"""The real master daemon: mounted on a temp dir, fed by fake node clients.

The fake nodes speak the wire protocol themselves (wire.connect + register,
state, facts), so these tests do not depend on the node daemon. The master runs
as `bpfs master` (`python -m bpfs.cli.bpfs_main master`) in a subprocess; every test stops it (SIGTERM),
unmounts and removes its files in `finally`.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import trio

from bpfs import formats
from bpfs.wire import framing as wire
from tests.unit.test_messages import plain

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with allow_other needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="no FUSE"),
]

ROOT_DIR = Path(__file__).resolve().parents[2]
FACTS = {"hostname": "fake", "cpus": 2, "arch": "x86_64", "kernel": "6.1.0", "load": [0.5, 0.25, 0.1],
         "mem_total": 2_000_000, "mem_available": 1_000_000, "uptime": 42.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mounted(path: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


@dataclass
class Master:
    base: str
    nodes: int = 3
    ping_timeout: float = 1.5
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def mount(self) -> str:
        return os.path.join(self.base, "mnt")

    @property
    def key_file(self) -> str:
        return os.path.join(self.base, "key")

    @property
    def state_file(self) -> str:
        return os.path.join(self.base, "state")

    @property
    def log_file(self) -> str:
        return os.path.join(self.base, "master.log")

    @property
    def key(self) -> bytes:
        return wire.load_key(self.key_file)

    def path(self, rel: str) -> str:
        return os.path.join(self.mount, rel)

    def read(self, rel: str) -> str:
        with open(self.path(rel)) as f:
            return f.read()

    def log(self) -> str:
        return Path(self.log_file).read_text(errors="replace")

    def start(self, wait: bool = True) -> None:
        argv = [sys.executable, "-m", "bpfs.cli.bpfs_main", "master", "--mount", self.mount,
                "--listen", "127.0.0.1", "--port", str(self.port), "--key", self.key_file,
                "--state-file", self.state_file,
                "--nodes", str(self.nodes), "--ping-timeout", str(self.ping_timeout),
                "--heartbeat", "0.2"]
        env = dict(os.environ, PYTHONPATH=str(ROOT_DIR))
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"master exited {self.proc.returncode}:\n{self.log()}")
            if mounted(self.mount) and _connectable(self.port):
                return
            time.sleep(0.05)
        raise AssertionError(f"master not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait; kill if it hangs. Returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"master ignored SIGTERM:\n{self.log()}")


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextmanager
def running_master(prefix: str = "bpfs-master-test-", **settings: Any) -> Iterator[Master]:
    """A real master daemon on a fresh key and mount, stopped, unmounted and removed after."""
    base = tempfile.mkdtemp(prefix=prefix)
    os.chmod(base, 0o755)          # other users reach the mount
    m = Master(base, **settings)
    os.mkdir(m.mount)
    wire.create_key(m.key_file)
    try:
        m.start()
        yield m
    finally:
        try:
            m.stop()
        finally:
            if mounted(m.mount):
                subprocess.run(["fusermount3", "-u", "-z", m.mount], check=False)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def master() -> Iterator[Master]:
    with running_master() as m:
        yield m


@dataclass
class FakeNode:
    fs: wire.FrameStream
    number: int
    heartbeat: float
    received: list[dict[str, Any]] = field(default_factory=list)
    beating: bool = True
    closed: trio.Event = field(default_factory=trio.Event)

    async def beat_forever(self) -> None:
        while True:
            await trio.sleep(0.2)
            if self.beating:
                await self.fs.send({"t": "facts", "facts": FACTS})

    async def receive_forever(self) -> None:
        try:
            while True:
                self.received.append(plain(await self.fs.receive()))
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed.set()


async def register(m: Master, number: int | None = None, key: bytes | None = None
                   ) -> tuple[wire.FrameStream, dict[str, Any]]:
    fs = await wire.connect("127.0.0.1", m.port, key or m.key)
    await fs.send({"t": "register", "node": number, "facts": FACTS})
    return fs, plain(await fs.receive())


@asynccontextmanager
async def fake_node(m: Master, number: int | None = None, up: bool = True) -> AsyncIterator[FakeNode]:
    fs, welcome = await register(m, number)
    assert welcome["t"] == "welcome", welcome
    node = FakeNode(fs, welcome["node"], welcome["heartbeat"])
    try:
        if up:
            await fs.send({"t": "state", "state": "up"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.beat_forever)
            nursery.start_soon(node.receive_forever)
            yield node
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(fs.stream)


async def wait_for(pred, timeout: float = 10, what: str = "condition") -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def key(e: formats.Event) -> tuple[str, int, str, str]:
    return (e.kind, e.id, e.what, e.detail)


def node_state(m: Master, n: int) -> str:
    return m.read(f"nodes/{n}/status").strip()


def write_errno(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


def sh(script: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr.decode()}"
    return r.stdout.decode()


# ---- tests -----------------------------------------------------------------------------

async def test_cat_of_every_file(master: Master) -> None:
    async with fake_node(master) as node:
        assert node.number == 0 and node.heartbeat == 0.2
        await wait_for(lambda: node_state(master, 0) == "up", what="node 0 up")
        m = master.mount
        rows = formats.parse_status(ok(sh(f"cat {m}/status")))
        assert [(r.number, r.state, r.mode, r.user, r.group, r.address) for r in rows] == [
            (0, "up", 0o111, "root", "root", "127.0.0.1"),
            (1, "down", 0o111, "root", "root", ""), (2, "down", 0o111, "root", "root", "")]
        assert ok(sh(f"cat {m}/nodes/*/status")) == "up\ndown\ndown\n"
        info = formats.parse_info(ok(sh(f"cat {m}/nodes/0/info")))
        assert (info.facts.hostname, info.facts.cpus, info.facts.mem_total, info.address) == (
            "fake", 2, 2_000_000, "127.0.0.1")
        assert ok(sh(f"cat {m}/nodes/0/procs {m}/nodes/0/ctl")) == ""
        assert os.listdir(f"{m}/procs") == []
        assert sorted(os.listdir(f"{m}/nodes/1")) == ["ctl", "info", "procs", "status"]
        listing = ok(sh(f"ls -l {m}/nodes")).splitlines()[1:]
        assert [l.split()[0] for l in listing] == ["d--x--x--x"] * 3
        for rel in ("status", "nodes/0/info", "nodes/0/status"):
            assert os.stat(master.path(rel)).st_size == len(master.read(rel).encode())
        r = sh(f"echo x > {m}/status")
        assert r.returncode != 0 and "Permission denied" in r.stderr.decode()


async def test_events_block_then_report_changes(master: Master) -> None:
    fd = os.open(master.path("events"), os.O_RDONLY)
    try:
        async with fake_node(master) as node:
            text = await trio.to_thread.run_sync(os.read, fd, 65536)
            events = formats.parse_events(text.decode())
            assert ("node", node.number, "state", "boot") == key(events[0])
            while not any(e.detail == "up" for e in events):
                events += formats.parse_events((await trio.to_thread.run_sync(os.read, fd, 65536)).decode())
            ok(sh(f"chmod 0100 {master.mount}/nodes/0"))
            text = await trio.to_thread.run_sync(os.read, fd, 65536)
            assert key(formats.parse_events(text.decode())[0]) == ("node", 0, "mode", "0100")
    finally:
        os.close(fd)


async def test_silent_node_goes_down_within_ping_timeout(master: Master) -> None:
    fd = os.open(master.path("events"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with fake_node(master, number=1) as node:
            await wait_for(lambda: node_state(master, 1) == "up")
            node.beating = False
            t0 = time.monotonic()
            await wait_for(lambda: node_state(master, 1) == "down", timeout=master.ping_timeout + 3)
            assert time.monotonic() - t0 <= master.ping_timeout + 1.0
            await wait_for(node.closed.is_set, timeout=5, what="master closing the silent node")
        events = formats.parse_events(os.read(fd, 65536).decode())
        assert [(e.id, e.detail) for e in events if e.what == "state"] == [(1, "boot"), (1, "up"), (1, "down")]
        assert "no heartbeat" in master.log()
    finally:
        os.close(fd)


async def test_blocked_events_reader_can_be_killed(master: Master) -> None:
    cat = subprocess.Popen(["cat", master.path("events")], stdout=subprocess.DEVNULL)
    try:
        await trio.sleep(0.5)
        assert cat.poll() is None
        cat.send_signal(signal.SIGINT)
        await trio.to_thread.run_sync(cat.wait, 5)
        # many blocked readers do not starve other requests
        cats = [subprocess.Popen(["cat", master.path("events")], stdout=subprocess.DEVNULL)
                for _ in range(20)]
        try:
            await trio.sleep(0.5)
            assert master.read("nodes/0/status") == "down\n"
        finally:
            for c in cats:
                c.terminate()
            for c in cats:
                await trio.to_thread.run_sync(c.wait, 5)
    finally:
        cat.kill()
        cat.wait()


async def test_wrong_key_is_refused_and_logged(master: Master) -> None:
    with pytest.raises(wire.AuthError):
        await register(master, key=b"0123456789abcdef-not-the-key")
    await wait_for(lambda: "refused node connection from 127.0.0.1" in master.log(), timeout=5)
    async with fake_node(master) as node:
        await wait_for(lambda: node_state(master, node.number) == "up")


async def _raw(m: Master, data: bytes, *, handshake: bool) -> bytes:
    """Send `data` (after a good handshake if asked); what comes back before the close."""
    if handshake:
        fs = await wire.connect("127.0.0.1", m.port, m.key)
        stream = fs.stream
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", m.port)
    try:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(15):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out
    finally:
        await trio.aclose_forcefully(stream)


async def test_malformed_or_oversized_frames_close_only_that_connection(master: Master) -> None:
    async with fake_node(master) as node:
        await wait_for(lambda: node_state(master, 0) == "up")
        garbage = b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1"
        await _raw(master, garbage, handshake=False)
        await _raw(master, b"\x7f\xff\xff\xff" + b"x" * 100, handshake=False)
        await _raw(master, garbage, handshake=True)
        await _raw(master, b"\x7f\xff\xff\xff", handshake=True)
        await _raw(master, wire.pack({"t": "register", "node": "seven"}), handshake=True)
        await _raw(master, wire.pack({"no": "t"}), handshake=True)
        # registered, then garbage: that node goes down, the others stay
        async with fake_node(master) as other:
            await wait_for(lambda: node_state(master, other.number) == "up")
            await other.fs.stream.send_all(garbage)
            await wait_for(lambda: node_state(master, other.number) == "down")
        assert node_state(master, 0) == "up" and not node.closed.is_set()
    log = master.log()
    assert "bad handshake from 127.0.0.1" in log and "exceeds the limit" in log
    assert master.proc is not None and master.proc.poll() is None


async def test_registration_rules(master: Master) -> None:
    async with fake_node(master, number=2):
        fs, reply = await register(master, number=2)
        await trio.aclose_forcefully(fs.stream)
        assert reply["t"] == "refused" and reply["errno"] == errno.EBUSY
        async with fake_node(master) as a, fake_node(master) as b:
            assert (a.number, b.number) == (0, 1)                   # the lowest free
            fs, reply = await register(master)                      # none left
            await trio.aclose_forcefully(fs.stream)
            assert (reply["t"], reply["errno"]) == ("refused", errno.EBUSY)
            assert "all 3 configured nodes" in reply["message"]
        async with fake_node(master, up=False) as c:
            assert c.number == 0
            await wait_for(lambda: node_state(master, 0) == "boot")
    fs, reply = await register(master, number=3)                    # not configured
    await trio.aclose_forcefully(fs.stream)
    assert (reply["t"], reply["errno"]) == ("refused", errno.ENODEV)
    assert reply["message"] == "node 3 is not configured: this master has nodes 0..2 (--nodes 3)"
    assert sorted(os.listdir(master.path("nodes")), key=int) == ["0", "1", "2"]


async def test_garbage_ctl_writes_are_einval_and_the_master_keeps_working(master: Master) -> None:
    async with fake_node(master):
        await wait_for(lambda: node_state(master, 0) == "up")
        fd = os.open(master.path("nodes/0/ctl"), os.O_RDWR)
        try:
            for payload in (b"frobnicate\n", b"state\n", b"\n", b"\x00\xff binary", b"state up up",
                            b"state " + b"x" * 100_000, "state ünïcode".encode()):
                with pytest.raises(OSError) as exc:
                    os.write(fd, payload)
                assert exc.value.errno == errno.EINVAL, payload
                assert os.pread(fd, 4096, 0).strip() not in (b"", b"ok")
            assert os.pread(fd, 4096, 0).decode() == "bad state 'ünïcode': must be one of up, unavailable, error\n"
            os.write(fd, b"state error\n")
            assert os.pread(fd, 4096, 0) == b"ok\n"
        finally:
            os.close(fd)
        assert node_state(master, 0) == "error"
        assert write_errno(master.path("nodes/2/ctl"), b"state up\n") == errno.EHOSTDOWN
        ok(sh(f"echo 'state up' > {master.mount}/nodes/0/ctl"))
        assert node_state(master, 0) == "up"


async def test_reboot_goes_down_then_boot_then_up(master: Master) -> None:
    async with fake_node(master) as node:
        await wait_for(lambda: node_state(master, 0) == "up")
        ok(sh(f"echo reboot > {master.mount}/nodes/0/ctl"))
        assert node_state(master, 0) == "reboot"
        await wait_for(lambda: {"t": "ctl", "cmd": "reboot"} in node.received)
    await wait_for(lambda: node_state(master, 0) == "down")
    async with fake_node(master, number=0, up=False):
        assert node_state(master, 0) == "boot"
    async with fake_node(master, number=0):
        await wait_for(lambda: node_state(master, 0) == "up")
        ok(sh(f"echo halt > {master.mount}/nodes/0/ctl"))
        assert node_state(master, 0) == "halt"
    await wait_for(lambda: node_state(master, 0) == "down")


async def test_chmod_chown_through_the_mount_as_root(master: Master) -> None:
    d = master.path("nodes/1")
    r = sh(f"chmod 0100 {d}")
    assert r.returncode != 0 and "busy" in r.stderr.decode().lower()     # down node: EBUSY
    async with fake_node(master, number=1):
        await wait_for(lambda: node_state(master, 1) == "up")
        ok(sh(f"chmod 0751 {d} && chown 1234:567 {d}"))
        st = os.stat(d)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o111, 1234, 567)
        row = formats.parse_status(master.read("status"))[1]
        assert (row.mode, row.user, row.group) == (0o111, "#1234", "#567")
        ok(sh(f"chmod 0110 {d}"))
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o110


def as_user(user: Any, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                           "--", "sh", "-c", script], capture_output=True, timeout=20, cwd="/")


async def test_acl_rules_for_other_users(master: Master, users: Any) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    d = master.path("nodes/0")
    async with fake_node(master):
        await wait_for(lambda: node_state(master, 0) == "up")
        ok(sh(f"chown {alice.uid}:{alice.gid} {d}"))
        ok(await trio.to_thread.run_sync(as_user, alice, f"chmod 0100 {d}"))
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o100
        r = await trio.to_thread.run_sync(as_user, bob, f"chmod 0111 {d}")
        assert r.returncode != 0 and b"Operation not permitted" in r.stderr
        r = await trio.to_thread.run_sync(as_user, alice, f"chown {bob.uid} {d}")
        assert r.returncode != 0 and b"Operation not permitted" in r.stderr
        team = next(g for g in alice.groups if g != alice.gid)
        ok(await trio.to_thread.run_sync(as_user, alice, f"chgrp {team} {d}"))
        assert os.stat(d).st_gid == team
        foreign = next(g for g in carol.groups if g not in alice.groups)
        r = await trio.to_thread.run_sync(as_user, alice, f"chgrp {foreign} {d}")
        assert r.returncode != 0 and b"Operation not permitted" in r.stderr
        out = ok(await trio.to_thread.run_sync(as_user, bob, f"cat {d}/status {d}/info {master.mount}/status"))
        assert out.startswith("up\naddress: 127.0.0.1\n")
        r = await trio.to_thread.run_sync(as_user, bob, f"/bin/echo reboot > {d}/ctl")
        assert r.returncode != 0 and b"Operation not permitted" in r.stderr


async def test_master_restart_keeps_acls_and_states(master: Master) -> None:
    async with fake_node(master, number=1):
        await wait_for(lambda: node_state(master, 1) == "up")
        ok(sh(f"chmod 0101 {master.path('nodes/1')} && chown 1000:100 {master.path('nodes/1')}"))
        ok(sh(f"echo 'state unavailable' > {master.path('nodes/1/ctl')}"))
    assert master.stop() == 0
    assert not mounted(master.mount)
    master.start()
    st = os.stat(master.path("nodes/1"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o101, 1000, 100)
    assert sorted(os.listdir(master.path("nodes")), key=int) == ["0", "1", "2"]
    assert node_state(master, 1) == "down"
    async with fake_node(master, number=1):
        await wait_for(lambda: node_state(master, 1) == "unavailable")
    master.stop()
    master.nodes = 2                        # fewer nodes: what the file kept of node 2 goes
    master.start()
    assert sorted(os.listdir(master.path("nodes")), key=int) == ["0", "1"]
    assert "forgetting node 2, beyond --nodes 2" in master.log()


def test_sigterm_with_a_blocked_reader_unmounts_and_exits_0(master: Master) -> None:
    cat = subprocess.Popen(["cat", master.path("events")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        assert master.stop() == 0
        assert time.monotonic() - t0 < 5
        assert not mounted(master.mount)
        cat.wait(5)
    finally:
        cat.kill()
        cat.wait()


def test_corrupt_state_file_refuses_to_start(master: Master) -> None:
    master.stop()
    Path(master.state_file).write_text('{"format": "bpfs-state", "version": 1, "nodes": [{"number": 0}]}')
    master.start(wait=False)
    assert master.proc is not None
    assert master.proc.wait(20) == 1
    assert "is corrupt" in master.log() and master.state_file in master.log()
    assert not mounted(master.mount)


async def test_rss_with_64_nodes(master: Master) -> None:
    master.stop()
    master.nodes = 64
    master.start()
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        ready: list[int] = []

        async def one() -> None:
            async with fake_node(master) as node:
                ready.append(node.number)
                await stop.wait()
        for _ in range(64):
            nursery.start_soon(one)
        await wait_for(lambda: len(ready) == 64, timeout=30)
        await wait_for(lambda: master.read("status").count(" up ") == 64, timeout=10)
        assert master.proc is not None
        status = Path(f"/proc/{master.proc.pid}/status").read_text()
        rss_kb = int(next(l for l in status.splitlines() if l.startswith("VmRSS:")).split()[1])
        print(f"master RSS with 64 nodes: {rss_kb} kB")
        assert rss_kb <= 80 * 1024, f"master RSS {rss_kb} kB"
        stop.set()


async def test_poll_on_events_wakes_on_news(master: Master) -> None:
    fd = os.open(master.path("events"), os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(200) == []
        async with fake_node(master):
            ready = await trio.to_thread.run_sync(p.poll, 5000)
            assert ready and ready[0][1] & select.POLLIN
            assert formats.parse_events(os.read(fd, 65536).decode())
    finally:
        os.close(fd)


def test_names_cannot_be_created_or_removed(master: Master) -> None:
    for script in (f"touch {master.path('x')}", f"mkdir {master.path('nodes/9')}",
                   f"rm -f {master.path('status')}", f"mv {master.path('status')} {master.path('s')}"):
        r = sh(script)
        assert r.returncode != 0 and b"Permission denied" in r.stderr, (script, r.stderr)
    assert sorted(os.listdir(master.mount)) == ["events", "nodes", "procs", "status"]

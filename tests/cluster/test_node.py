"""bpslave, the real daemon in its own namespaces, against a small fake master.

The fake master speaks the real wire protocol (`wire.accept`), so these tests
need neither the master daemon nor FUSE; they need root for the namespaces.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from bpfs.errors import BpfsError
from bpfs.node.config import parse_master
from bpfs.node.service import Backoff
from bpfs.wire import framing as wire, messages
from tests.unit.test_messages import plain

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


@dataclass
class Conn:
    fs: wire.FrameStream
    register: wire.Message
    inbox: list[wire.Message] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)

    async def wait_for(self, kind: str, count: int = 1) -> list[wire.Message]:
        while len(got := [m for m in self.inbox if m["t"] == kind]) < count:
            if self.closed.is_set():
                raise AssertionError(f"connection closed before {count} {kind!r}")
            self.changed = trio.Event()
            await self.changed.wait()
        return got


class FakeMaster:
    """Accepts nodes, answers `register` with `welcome`, records what they send."""

    def __init__(self, key: bytes, heartbeat: float = 0.1, assign: int = 5) -> None:
        self.key = key
        self.heartbeat = heartbeat
        self.assign = assign
        self.auth_failures = 0
        self.refuse = False
        self.port = 0
        self.send_conn, self.conns = trio.open_memory_channel[Conn](100)
        self.scope = trio.CancelScope()

    async def serve(self, port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners)

    def stop(self) -> None:
        self.scope.cancel()
        self.scope = trio.CancelScope()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            fs = await wire.accept(stream, self.key)
        except wire.ProtocolError:
            self.auth_failures += 1
            await stream.aclose()
            return
        reg = plain(await fs.expect(messages.Register))
        if self.refuse:
            await fs.send({"t": "refused", "errno": 16, "message": "node 9 is taken"})
            await fs.aclose()
            return
        number = reg["node"] if reg["node"] is not None else self.assign
        await fs.send({"t": "welcome", "node": number, "heartbeat": self.heartbeat})
        conn = Conn(fs, reg)
        await self.send_conn.send(conn)
        try:
            while True:
                conn.inbox.append(plain(await fs.receive()))
                conn.changed.set()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError):
            pass
        finally:
            conn.closed.set()
            conn.changed.set()
            await fs.aclose()

    async def next_conn(self, timeout: float = 10) -> Conn:
        with trio.fail_after(timeout):
            return await self.conns.receive()


def make_key(path: Path) -> bytes:
    return wire.create_key(str(path))


async def start_node(tmp_path: Path, port: int, key: Path, *args: str) -> trio.Process:
    if os.geteuid() != 0:
        pytest.skip("bpslave needs root for its namespaces")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(tmp_path / f"node-{len(list(tmp_path.glob('node-*')))}.log", "wb")
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "bpfs.cli.bpslave", "--master", f"127.0.0.1:{port}",
         "--key", str(key), *args], env=env, stdout=log, stderr=log)


async def stop(proc: trio.Process) -> None:
    """SIGTERM first: the launcher then reaps its daemon (a SIGKILLed launcher's daemon
    dies by PDEATHSIG and is left to the machine's init to reap)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(5):
            await proc.wait()
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await proc.wait()


def children(pid: int) -> list[int]:
    """Children of `pid`, but not the node's restore helper nor its spare job keeper (both
    parked there for migrations, named bpfs-helper)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return [p for p in out if _comm(p) != "bpfs-helper"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture
async def master(tmp_path: Path, nursery: trio.Nursery) -> FakeMaster:
    fm = FakeMaster(make_key(tmp_path / "key"))
    await nursery.start(fm.serve)
    return fm


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_registers_with_asked_number_and_heartbeats(tmp_path, master):
    proc = await start_node(tmp_path, master.port, tmp_path / "key", "--node", "3")
    try:
        conn = await master.next_conn()
        assert conn.register["node"] == 3
        assert set(conn.register["facts"]) >= {"hostname", "cpus", "load", "mem_total"}
        with trio.fail_after(5):
            (state,) = await conn.wait_for("state")
            beats = await conn.wait_for("facts", 3)
        assert state["state"] == "up"
        assert conn.inbox.index(state) < conn.inbox.index(beats[0])
        assert all(isinstance(b["facts"]["uptime"], float) for b in beats)
    finally:
        await stop(proc)


async def test_reboot_reconnects_fresh_with_the_same_number(tmp_path, master):
    proc = await start_node(tmp_path, master.port, tmp_path / "key")    # master assigns 5
    try:
        first = await master.next_conn()
        assert first.register["node"] is None
        await first.wait_for("state")
        await first.fs.send({"t": "ctl", "cmd": "reboot"})
        second = await master.next_conn()
        with trio.fail_after(5):
            await first.closed.wait()
            await second.wait_for("state")
        assert second.register["node"] == 5
        assert proc.returncode is None
    finally:
        await stop(proc)


@pytest.mark.parametrize("cmd", ["halt", "pwroff"])
async def test_halt_exits_zero(tmp_path, master, cmd):
    proc = await start_node(tmp_path, master.port, tmp_path / "key", "--node", "0")
    try:
        conn = await master.next_conn()
        await conn.wait_for("state")
        await conn.fs.send({"t": "ctl", "cmd": cmd})
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        await stop(proc)


async def test_wrong_key_is_refused_and_exits_nonzero(tmp_path, master):
    make_key(tmp_path / "other")
    proc = await start_node(tmp_path, master.port, tmp_path / "other")
    try:
        with trio.fail_after(10):
            assert await proc.wait() == 3
        assert master.auth_failures >= 1
        assert "authentication" in (tmp_path / "node-0.log").read_text()
    finally:
        await stop(proc)


async def test_refused_registration_exits_nonzero(tmp_path, master):
    master.refuse = True
    proc = await start_node(tmp_path, master.port, tmp_path / "key", "--node", "9")
    try:
        with trio.fail_after(10):
            assert await proc.wait() == 3
        assert "node 9 is taken" in (tmp_path / "node-0.log").read_text()
    finally:
        await stop(proc)


async def test_no_master_without_r_exits_with_a_message(tmp_path):
    key = tmp_path / "key"
    make_key(key)
    with trio.socket.socket() as s:         # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await start_node(tmp_path, port, key)
    try:
        with trio.fail_after(10):
            assert await proc.wait() == 1
        assert "cannot reach the master" in (tmp_path / "node-0.log").read_text()
    finally:
        await stop(proc)


async def test_r_waits_for_the_master_and_reconnects_after_restart(tmp_path, nursery):
    key = tmp_path / "key"
    fm = FakeMaster(make_key(key))
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await start_node(tmp_path, port, key, "-r", "--node", "2")
    try:
        await trio.sleep(0.7)                       # node is retrying meanwhile
        await nursery.start(fm.serve, port)
        conn = await fm.next_conn()
        await conn.wait_for("state")
        fm.stop()                                   # master goes away...
        await conn.fs.aclose()
        await trio.sleep(0.3)
        await nursery.start(fm.serve, port)         # ...and comes back
        again = await fm.next_conn()
        assert again.register["node"] == 2
        await again.wait_for("state")
    finally:
        await stop(proc)


async def test_daemon_is_pid_1_of_its_own_namespaces(tmp_path, master):
    proc = await start_node(tmp_path, master.port, tmp_path / "key", "--node", "1",
                            "--hostname", "n1")
    try:
        conn = await master.next_conn()
        assert conn.register["facts"]["hostname"] == "n1"
        (daemon,) = children(proc.pid)
        nspid = [ln for ln in Path(f"/proc/{daemon}/status").read_text().splitlines()
                 if ln.startswith("NSpid:")][0].split()[1:]
        assert nspid == [str(daemon), "1"]
        for ns in ("pid", "mnt", "uts"):
            assert os.readlink(f"/proc/{daemon}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        # the launcher stays in the host's namespaces, a bare waiting interpreter
        assert os.readlink(f"/proc/{proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    finally:
        await stop(proc)


async def test_sigterm_stops_launcher_and_daemon(tmp_path, master):
    proc = await start_node(tmp_path, master.port, tmp_path / "key", "--node", "4")
    try:
        conn = await master.next_conn()
        await conn.wait_for("state")
        (daemon,) = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0
            await conn.closed.wait()
        assert not Path(f"/proc/{daemon}").exists()
    finally:
        await stop(proc)


def in_node(daemon: int, script: str) -> str:
    """Run a shell snippet in the node's PID and mount namespaces, as a migrated process runs."""
    return subprocess.run(["nsenter", "-t", str(daemon), "-p", "-m", "sh", "-c", script],
                          capture_output=True, text=True, timeout=10, check=True).stdout


async def test_pid_1_reaps_orphans_of_its_namespace(tmp_path, master):
    proc = await start_node(tmp_path, master.port, tmp_path / "key", "--node", "6")
    try:
        conn = await master.next_conn()
        await conn.wait_for("state")
        (daemon,) = children(proc.pid)
        # the shell exits at once: both sleeps become orphans of the namespace
        in_node(daemon, "sleep 0.5 >/dev/null 2>&1 & sleep 0.6 >/dev/null 2>&1 &")
        assert len(children(daemon)) == 2                # re-parented to the daemon
        with trio.fail_after(5):
            while children(daemon):                     # a zombie stays a child until reaped
                await trio.sleep(0.05)
    finally:
        await stop(proc)


async def test_lost_master_kills_the_processes_the_node_holds(tmp_path, master):
    proc = await start_node(tmp_path, master.port, tmp_path / "key", "--node", "7", "-r")
    try:
        conn = await master.next_conn()
        await conn.wait_for("state")
        (daemon,) = children(proc.pid)
        in_node(daemon, "sleep 100 >/dev/null 2>&1 &")
        (held,) = children(daemon)
        await conn.fs.aclose()                           # the master drops the node
        with trio.fail_after(5):
            while Path(f"/proc/{held}").exists():
                await trio.sleep(0.05)
        again = await master.next_conn()                 # and -r brings it back
        assert again.register["node"] == 7
        assert proc.returncode is None
    finally:
        await stop(proc)


# ---- pure parts of the daemon --------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("master", ("master", 2223)), ("10.0.0.1:2300", ("10.0.0.1", 2300)),
    ("[::1]:99", ("::1", 99)), ("[fe80::1]", ("fe80::1", 2223)), ("::1", ("::1", 2223)),
])
def test_parse_master(text, want):
    assert parse_master(text) == want


@pytest.mark.parametrize("text", ["", ":1", "h:", "h:x", "h:0", "h:70000", "[::1", "[::1]x",
                                  "h:\u0669\u0669", "h:\uff12\uff12\uff12\uff13"])
def test_parse_master_rejects(text):
    with pytest.raises(BpfsError):
        parse_master(text)


def test_backoff_doubles_up_to_its_cap_and_resets():
    b = Backoff(0.1, 1.0)
    assert [round(b.step(), 2) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.step() == 0.1


async def test_master_refusing_the_handshake_is_reported(tmp_path, nursery):
    """A master that refuses at once (as on a protocol version mismatch)."""
    key = tmp_path / "key"
    make_key(key)

    async def refuse(stream):
        fs = wire.FrameStream(stream, side=messages.HANDSHAKE)
        await fs.expect(messages.Hello)
        await fs.send({"t": "refused", "errno": 71, "message": "protocol version 1 unsupported"})
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, refuse, 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    proc = await start_node(tmp_path, port, key)
    try:
        with trio.fail_after(10):
            assert await proc.wait() == 3
        assert "version 1 unsupported" in (tmp_path / "node-0.log").read_text()
    finally:
        await stop(proc)

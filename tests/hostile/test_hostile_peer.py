"""Hostile peers on the node port: raw sockets, with and without the cluster key.

A peer that can reach the node port but holds no key sends handshake frames with
fields of every wrong type and size; one that holds the key sends malformed and
out-of-order frames before and after it registers; a hostile master feeds a real
node daemon. Every frame is decoded into the message classes of bpfs/wire/messages.py,
which check every field as they go: a bad one closes that one connection with one log
line naming the peer, never a traceback, never a stall of the master, never state that outlives
the connection. The master runs as `bpfs master` (tests/cluster/test_master.py's
`Master`), on real sockets and a real FUSE mount.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfs.master.links import FROM_NODE, MAX_HANDSHAKES, RefusalLog
from bpfs.wire import framing as wire, messages
from tests.cluster.test_master import (FACTS, Master, fake_node, master, node_state,  # noqa: F401
                                       register, wait_for)
from tests.cluster.test_node import make_key, start_node, stop
from tests.unit.test_messages import struct_fields, valid

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with allow_other needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="no FUSE"),
]

HELLO = {"t": "hello", "v": wire.VERSION}


# ---- a raw peer, with blocking sockets ----------------------------------------------------

def connect(m: Master, source: str = "127.0.0.1") -> socket.socket:
    """A connection from `source`, any loopback address: the master logs at most
    RefusalLog.BURST refusals of one host a minute, so tests that count lines give each
    connection a host of its own."""
    return socket.create_connection(("127.0.0.1", m.port), timeout=10,
                                    source_address=(source, 0))


def peer_name(s: socket.socket) -> str:
    host, port = s.getsockname()[:2]
    return f"{host}:{port}"


def read_exact(s: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_frame(s: socket.socket) -> dict[str, Any] | None:
    """The next message, or None at EOF (or a reset: the master closed without reading)."""
    try:
        head = read_exact(s, 4)
        body = None if head is None else read_exact(s, int.from_bytes(head, "big"))
    except ConnectionResetError:
        return None
    return None if body is None else wire.unpack(body)


def closed_within(s: socket.socket, timeout: float) -> bool:
    """True if the master closes `s` within `timeout` (whatever it says before)."""
    s.settimeout(timeout)
    try:
        while read_frame(s) is not None:
            pass
        return True
    except TimeoutError:
        return False


def hello(m: Master, source: str = "127.0.0.1") -> tuple[socket.socket, dict[str, Any]]:
    s = connect(m, source)
    s.sendall(wire.pack({**HELLO, "nonce": os.urandom(wire.NONCE_BYTES)}))
    challenge = read_frame(s)
    assert challenge is not None and challenge["t"] == "challenge", challenge
    return s, challenge


class Reader(threading.Thread):
    """Reads /bproc/status over and over while an attack runs; keeps the slowest read."""

    def __init__(self, m: Master) -> None:
        super().__init__(daemon=True)
        self.path = m.path("status")
        self.slowest = 0.0
        self.reads = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            with open(self.path) as f:
                f.read()
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.reads += 1
            time.sleep(0.01)

    def __enter__(self) -> "Reader":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.join(30)


def log_lines_about(m: Master, peer: str) -> list[str]:
    return [line for line in m.log().splitlines() if peer in line]


def wait_for_sync(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def assert_no_traceback(m: Master) -> None:
    log = m.log()
    assert "Traceback" not in log, log[-3000:]


# ---- before authentication ------------------------------------------------------------------

MACS = [8_000_000_000, 2**63, 2**64 - 1, -1, "x" * 40, [1, 2, 3], {"a": 1}, None, True, 1.5,
        b"short", b"\0" * 4000]


def test_auth_mac_of_any_type_or_size_is_refused_without_a_stall(master: Master) -> None:
    """`auth` with an integer mac made the master allocate bytes(N) in its event loop (8e9:
    every /bproc read stalled 6 s); a string mac raised a TypeError with a traceback."""
    with Reader(master) as reader:
        for i, mac in enumerate(MACS):
            s, _ = hello(master, f"127.0.1.{i + 1}")
            peer = peer_name(s)
            with s:
                s.sendall(wire.pack({"t": "auth", "mac": mac}))
                assert closed_within(s, 5), f"mac {mac!r:.40}: connection still open"
            wait_for_sync(lambda: log_lines_about(master, peer), 5)
            lines = log_lines_about(master, peer)
            assert len(lines) == 1, (mac, lines)
            assert "auth" in lines[0] and "mac" in lines[0], lines[0]
        time.sleep(0.2)
    print(f"\nslowest /bproc/status read during {len(MACS)} bad auth frames: "
          f"{reader.slowest * 1e3:.1f} ms ({reader.reads} reads)")
    assert reader.slowest < 0.5
    assert_no_traceback(master)
    assert master.proc is not None and master.proc.poll() is None


def trickle(socks: list[socket.socket], data: bytes, stop: threading.Event,
            closed_at: dict[int, float]) -> None:
    """Send `data` to every socket one byte a second (a slowloris); note when each is closed."""
    for i in range(len(data)):
        for k, s in enumerate(socks):
            if k in closed_at:
                continue
            try:
                s.send(data[i:i + 1])
            except OSError:
                closed_at[k] = time.monotonic()
        if stop.wait(1.0):
            return


def wait_until_full(m: Master, timeout: float = 10) -> None:
    """Until the master has accepted every slow connection: a probe is closed at once."""
    deadline = time.monotonic() + timeout
    while True:
        with connect(m, "127.0.4.1") as probe:
            if closed_within(probe, 0.3):
                return
        assert time.monotonic() < deadline, "the master never filled its handshake slots"


def test_handshakes_are_capped_and_cut_at_their_deadline(master: Master) -> None:
    """MAX_HANDSHAKES slowloris peers (a byte a second) hold every handshake slot: more
    connections are closed at once, with at most BURST + 1 lines for their host; the slow
    ones are cut at HANDSHAKE_TIMEOUT for the whole handshake; then a node registers."""
    frame = wire.pack({**HELLO, "nonce": os.urandom(wire.NONCE_BYTES)})
    slow = [connect(master, "127.0.2.1") for _ in range(MAX_HANDSHAKES)]
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    stop_event = threading.Event()
    sender = threading.Thread(target=trickle, args=(slow, frame, stop_event, closed_at))
    sender.start()
    try:
        with Reader(master) as reader:
            wait_until_full(master)
            excess = 3 * RefusalLog.BURST
            for _ in range(excess):
                with connect(master, "127.0.3.1") as s:
                    assert closed_within(s, 1.0), "a connection beyond the cap was served"
            time.sleep(0.2)
        lines = log_lines_about(master, "127.0.3.1:")
        assert len(lines) == RefusalLog.BURST + 1, lines
        assert all("in their handshake" in line for line in lines[:-1]), lines
        assert "counting the rest" in lines[-1]
        print(f"\nslowest /bproc/status read with {MAX_HANDSHAKES} slow handshakes and "
              f"{excess} more connections: {reader.slowest * 1e3:.1f} ms")
        assert reader.slowest < 0.5
        for s in slow:          # their hello is not over: the deadline closes them
            assert closed_within(s, wire.HANDSHAKE_TIMEOUT + 5)
        took = time.monotonic() - opened
        assert wire.HANDSHAKE_TIMEOUT - 1 < took < wire.HANDSHAKE_TIMEOUT + 5, took
    finally:
        stop_event.set()
        sender.join(5)
        for s in slow:
            s.close()

    async def good_node() -> None:
        async with fake_node(master) as node:
            await wait_for(lambda: node_state(master, node.number) == "up")
    trio.run(good_node)
    assert_no_traceback(master)


# ---- frames over the message classes, with and without the key ----------------------------

class Deep:
    """A value nested `depth` lists deep (msgpack's packer refuses to build one)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"


def encode(value: Any) -> bytes:
    """msgpack, by hand where a Deep value hides inside a map or a list."""
    if isinstance(value, Deep):
        return b"\x91" * value.depth + b"\xc0"
    if isinstance(value, dict):
        n = len(value)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
        return head + b"".join(encode(k) + encode(v) for k, v in value.items())
    if isinstance(value, list):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        return head + b"".join(encode(v) for v in value)
    return msgpack.packb(value, use_bin_type=True)


def frame(value: Any) -> bytes:
    body = encode(value)
    return len(body).to_bytes(4, "big") + body


JUNK = st.one_of(
    st.none(), st.booleans(), st.floats(), st.text(max_size=30), st.binary(max_size=30),
    st.integers(-2**63, 2**64 - 1),
    st.sampled_from([8_000_000_000, 2**63, 2**64 - 1, -2**63, -1, 0, 2**31, 65536, 1 << 22]),
    st.builds(Deep, st.integers(1, 3000)),
    st.lists(st.none(), max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**64 - 1), max_size=4),
    st.just("x" * 5000), st.just(b"\0" * 3000),
)


def hostile(field: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: one that fits, or junk of any type and size."""
    return st.one_of(field, JUNK)


@st.composite
def message(draw: Any, names: list[str] | None = None) -> dict[str, Any]:
    """A message named from the classes (or not); half of them fit their class (with
    fields it does not name added), the others have fields that do not fit, missing
    fields, or a "t" of any type."""
    name = draw(st.sampled_from(names) if names else
                st.one_of(st.sampled_from(sorted(messages.MESSAGES)), st.text(max_size=12)))
    cls = messages.MESSAGES.get(name)
    fields = {} if cls is None else struct_fields(cls, plain=True)
    extra = st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-2**63, 2**63)), JUNK,
                            max_size=2)
    msg: dict[Any, Any] = {**draw(extra), "t": name}
    if draw(st.booleans()):
        msg.update(draw(st.fixed_dictionaries(fields)))
        return msg
    for key, field in fields.items():
        if draw(st.integers(0, 9)) > 0:          # now and then a field is missing
            msg[key] = draw(hostile(field))
    if draw(st.integers(0, 9)) == 0:
        msg["t"] = draw(JUNK)
    return msg


def decoded(msg: Any, side: messages.Side = messages.FROM_NODE,
            limit: int = wire.DEFAULT_MAX_FRAME) -> messages.Msg | None:
    """What the master makes of `msg` on the wire: the message it hands on, or None for a
    frame it refuses (too big, undecodable, or not one of `side`'s messages)."""
    body = encode(msg)
    if len(body) > limit:
        return None
    try:
        return side.decode(body)
    except wire.ProtocolError:
        return None


RAW = st.one_of(st.binary(max_size=64).map(lambda b: len(b).to_bytes(4, "big") + b),
                st.just(b"\x7f\xff\xff\xff" + b"x" * 10), st.just((4097).to_bytes(4, "big")))
SLOW = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


def send_all(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass            # the master closed first: what the test wants to see anyway


def assert_serves_a_good_node(m: Master) -> None:
    async def good_node() -> None:
        async with fake_node(m) as node:
            await wait_for(lambda: node_state(m, node.number) == "up")
    t0 = time.monotonic()
    m.read("status")
    assert time.monotonic() - t0 < 0.5
    trio.run(good_node)
    assert m.proc is not None and m.proc.poll() is None
    assert_no_traceback(m)


@SLOW
@given(good_hello=st.booleans(),
       parts=st.lists(st.one_of(message(["hello", "auth"]), message(), RAW), min_size=1,
                      max_size=3))
def frames_without_the_key_close_the_connection(master: Master, good_hello: bool,
                                                parts: list[dict[str, Any] | bytes]) -> None:
    """Anything before a right `auth` ends in a close, whatever the frames hold (only a
    lone right `hello` waits for its `auth`)."""
    with connect(master) as s:
        if good_hello:
            send_all(s, wire.pack({**HELLO, "nonce": os.urandom(wire.NONCE_BYTES)}))
        send_all(s, b"".join(p if isinstance(p, bytes) else frame(p) for p in parts))
        first = None if isinstance(parts[0], bytes) else decoded(
            parts[0], messages.HANDSHAKE, wire.HANDSHAKE_MAX_FRAME)
        waits = (not good_hello and len(parts) == 1 and isinstance(first, messages.Hello)
                 and first.v == wire.VERSION)
        if not waits:
            assert closed_within(s, 5), parts


@pytest.fixture
def served(master: Master) -> Any:
    yield master
    assert_serves_a_good_node(master)


def test_frames_without_the_key_close_the_connection(served: Master) -> None:
    frames_without_the_key_close_the_connection(served)


def keyed(m: Master) -> socket.socket:
    """A connection past the handshake, done by hand: the peer holds the key."""
    s = connect(m)
    nn = os.urandom(wire.NONCE_BYTES)
    s.sendall(wire.pack({**HELLO, "nonce": nn}))
    ch = read_frame(s)
    assert ch is not None and ch["t"] == "challenge"
    mac = hmac.new(m.key, b"bpfs-node" + ch["nonce"] + nn, hashlib.sha256).digest()
    s.sendall(wire.pack({"t": "auth", "mac": mac}))
    assert read_frame(s) == {"t": "ok"}
    return s


NODE_SENDS = sorted(messages.tag(c) for c in messages.MESSAGES.values() if c.sender == "node")
REGISTER = {"t": "register", "node": None, "facts": FACTS}


def wait_all_down(m: Master) -> None:
    deadline = time.monotonic() + 10
    while " up " in m.read("status") or " boot " in m.read("status"):
        assert time.monotonic() < deadline, m.read("status")
        time.sleep(0.02)


@SLOW
@given(registered=st.booleans(),
       msgs=st.lists(st.one_of(message(NODE_SENDS), message()), min_size=1, max_size=4))
def frames_of_a_key_holder_are_checked(master: Master, registered: bool,
                                       msgs: list[dict[str, Any]]) -> None:
    """A peer that holds the key sends frames over the table, before it registers (out of
    order: `restored` before `register`...) or after: the first that does not fit, or that
    is not the message its turn allows, closes the connection; the master keeps serving."""
    with keyed(master) as s:
        if registered:
            s.sendall(wire.pack(REGISTER))
            welcome = read_frame(s)
            assert welcome is not None and welcome["t"] in ("welcome", "refused"), welcome
            registered = welcome["t"] == "welcome"
        send_all(s, b"".join(frame(m) for m in msgs))
        seen = [decoded(m) for m in msgs]
        if not registered:      # the first must be a `register` (then the rest may close it)
            expect_close = not isinstance(seen[0], messages.Register)
        else:
            expect_close = not all(m is not None and type(m) in FROM_NODE for m in seen)
        if expect_close:
            assert closed_within(s, 5), msgs
    wait_all_down(master)


def test_frames_of_a_key_holder_are_checked(served: Master) -> None:
    served.stop()
    served.ping_timeout = 60        # only a bad frame may close a registered node's connection
    served.start()
    frames_of_a_key_holder_are_checked(served)


@pytest.mark.parametrize("msg, field", [
    ({"t": "exited", "pid": 7, "code": "zero", "signal": None}, "exited.code"),
    ({"t": "exited", "pid": 2**63, "code": 0, "signal": None}, "exited.pid"),
    ({"t": "restored", "id": [1], "pid": 5}, "restored.id"),
    ({"t": "need", "id": 1, "hashes": "sha256:00"}, "need.hashes"),
    ({"t": "need", "id": 1, "hashes": [b"x"] * 3}, "need.hashes[0]"),
    ({"t": "failed", "id": 1, "errno": 8_000_000_000, "message": "x"}, "failed.errno"),
    ({"t": "facts", "facts": {**FACTS, "load": [1, 2]}}, "facts.facts.load"),
    ({"t": "facts", "facts": {**FACTS, "uptime": float("nan")}}, "facts.facts.uptime"),
    ({"t": "facts"}, "missing field 'facts'"),
    ({"t": "register", "node": None, "facts": FACTS}, "not a registered node's message"),
    ({"t": "restore", "id": 1}, "'restore' is the master's message"),
    ({"t": "frobnicate"}, "unknown message 'frobnicate'"),
])
async def test_a_registered_node_sending_a_bad_frame_is_dropped_with_one_line(
        master: Master, msg: dict[str, Any], field: str) -> None:
    async with fake_node(master, number=1) as node, fake_node(master, number=2) as other:
        await wait_for(lambda: node_state(master, 1) == "up" and node_state(master, 2) == "up")
        await node.fs.stream.send_all(frame(msg))
        await wait_for(lambda: node_state(master, 1) == "down", timeout=5)
        with trio.fail_after(5):
            await node.closed.wait()
        assert node_state(master, 2) == "up" and not other.closed.is_set()
    lines = [line for line in master.log().splitlines() if "node 1 (127.0.0.1:" in line]
    assert len(lines) == 1 and field in lines[0], lines
    assert "closing its connection" in lines[0]
    assert_no_traceback(master)


# ---- node numbers --------------------------------------------------------------------------

async def test_a_key_holder_cannot_add_nodes_beyond_the_configured_ones(master: Master) -> None:
    """The master has nodes 0..2: node 99 (or 3, or 65535) is refused and leaves nothing,
    on the mount or in the state file."""
    before = Path(master.state_file).read_bytes()
    for number in (3, 99, 65535):
        fs, reply = await register(master, number)
        await trio.aclose_forcefully(fs.stream)
        assert (reply["t"], reply["errno"]) == ("refused", errno.ENODEV), reply
        assert f"node {number} is not configured" in reply["message"]
    async with fake_node(master), fake_node(master), fake_node(master):
        fs, reply = await register(master)
        await trio.aclose_forcefully(fs.stream)
        assert (reply["t"], reply["errno"]) == ("refused", errno.EBUSY), reply
    assert sorted(os.listdir(master.path("nodes")), key=int) == ["0", "1", "2"]
    assert Path(master.state_file).read_bytes() == before
    refusals = [line for line in master.log().splitlines() if "refused registration" in line]
    assert len(refusals) == 4 and all("127.0.0.1:" in line for line in refusals)


async def test_open_numbering_keeps_only_what_someone_set(master: Master, tmp_path: Path) -> None:
    """--nodes 0: any number registers, a real bpslave too, but only a node whose ACL
    someone changed is written to the state file."""
    master.stop()
    master.nodes = 0
    master.start()
    before = Path(master.state_file).read_bytes()
    async with fake_node(master) as a, fake_node(master, number=500) as b:
        assert (a.number, b.number) == (0, 500)
        await wait_for(lambda: node_state(master, 500) == "up")
        proc = await start_node(tmp_path, master.port, Path(master.key_file))
        try:
            await wait_for(lambda: os.path.exists(master.path("nodes/1"))
                           and node_state(master, 1) == "up", timeout=20)
        finally:
            await stop(proc)
        assert Path(master.state_file).read_bytes() == before
        os.chmod(master.path("nodes/500"), 0o100)
    saved = Path(master.state_file).read_text()
    assert '"number": 500, "mode": "0100"' in saved and '"number": 0' not in saved
    master.stop()
    master.start()
    assert sorted(os.listdir(master.path("nodes")), key=int) == ["500"]
    assert stat.S_IMODE(os.stat(master.path("nodes/500")).st_mode) == 0o100


# ---- a hostile master, against a real node daemon ------------------------------------------

BAD_FROM_MASTER = [
    ({"t": "welcome", "node": 0, "heartbeat": "soon"}, "welcome.heartbeat"),
    ({"t": "welcome", "node": 2**40, "heartbeat": 0.1}, "welcome.node"),
    ({"t": "restore", "id": 1, "image": b"", "uid": -1, "gid": 0, "groups": [], "io": ["null"] * 3,
      "port": 0, "token": ""}, "restore.uid"),
    ({"t": "restore", "id": 1}, "restore: missing field 'image'"),
    ({"t": "files", "id": 1, "contents": [b"x"]}, "files.contents"),
    ({"t": "signal", "pid": 1, "sig": "KILL"}, "signal.sig"),
    ({"t": "signal", "pid": 1, "sig": 0}, "signal.sig"),
    ({"t": "ctl", "cmd": 8_000_000_000}, "ctl.cmd"),
    ({"t": "frobnicate"}, "unknown message 'frobnicate'"),
    ({"t": "facts", "facts": FACTS}, "'facts' is the node's message"),
    ({"t": "challenge", "v": 1, "nonce": b"n" * 32, "mac": b"m" * 32}, "not a message of a session"),
]


@pytest.mark.parametrize("bad, field", BAD_FROM_MASTER, ids=[f for _, f in BAD_FROM_MASTER])
async def test_a_node_drops_a_master_that_sends_a_bad_frame(tmp_path: Path, bad: dict[str, Any],
                                                            field: str) -> None:
    """The master's messages are the node's input: checked with the same table; a bad one
    ends the session with one line (and, without -r, the daemon with status 1)."""
    key = tmp_path / "key"
    make_key(key)
    registered = trio.Event()

    async def hostile_master(stream: trio.SocketStream) -> None:
        fs = await wire.accept(stream, key.read_bytes().strip())
        await fs.expect(messages.Register)
        if bad["t"] != "welcome":
            await fs.send({"t": "welcome", "node": 4, "heartbeat": 0.1})
            await fs.expect(messages.State)
        registered.set()
        await fs.stream.send_all(frame(bad))
        with trio.move_on_after(10):
            while True:
                await fs.receive()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _quietly(hostile_master), 0)
        port = listeners[0].socket.getsockname()[1]
        proc = await start_node(tmp_path, port, key, "--node", "4")
        try:
            with trio.fail_after(20):
                assert await proc.wait() == 1
        finally:
            await stop(proc)
            nursery.cancel_scope.cancel()
    assert registered.is_set()
    log = (tmp_path / "node-0.log").read_text()
    lines = [line for line in log.splitlines() if "protocol error from the master at" in line]
    assert len(lines) == 1 and field in lines[0], log
    assert "Traceback" not in log


def _quietly(fn: Any) -> Any:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await fn(stream)
        except (EOFError, wire.ProtocolError, trio.BrokenResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
    return handler

"""The wire protocol: framing, the mutual HMAC handshake, key files.

Both ends run over `trio.testing.memory_stream_pair`, the real stream
interface, so no sockets are involved.
"""

from __future__ import annotations

import errno
import functools
import os
import stat

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfs.errors import BpfsError
from bpfs.wire import framing as wire, messages as msgs

KEY = b"k" * 64
OTHER = b"o" * 64

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=50), st.binary(max_size=50))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20)
messages = st.builds(lambda t, rest: {"t": t, **rest},
                     st.text(min_size=1, max_size=20),
                     st.dictionaries(st.text(max_size=10).filter(lambda k: k != "t"), values,
                                     max_size=6))


def pair(max_frame: int = wire.DEFAULT_MAX_FRAME, side: msgs.Side | None = None
         ) -> tuple[wire.FrameStream, wire.FrameStream]:
    a, b = trio.testing.memory_stream_pair()
    return wire.FrameStream(a, max_frame, side), wire.FrameStream(b, max_frame, side)


# ---- framing ----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_frames_round_trip(msgs):
    async def go():
        a, b = pair()
        for m in msgs:
            await a.send(m)
        got = [await b.receive() for _ in msgs]
        assert got == msgs
    trio.run(go)


@given(messages)
def test_pack_unpack_round_trip(msg):
    frame = wire.pack(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert wire.unpack(frame[4:]) == msg


async def test_frames_split_across_reads_reassemble():
    a, b = trio.testing.memory_stream_pair()
    fs = wire.FrameStream(b)
    data = wire.pack({"t": "x", "n": 1}) + wire.pack({"t": "y"})
    for i in range(len(data)):
        await a.send_all(data[i:i + 1])
    assert await fs.receive() == {"t": "x", "n": 1}
    assert await fs.receive() == {"t": "y"}


async def test_oversized_frame_is_a_protocol_error():
    a, b = trio.testing.memory_stream_pair()
    fs = wire.FrameStream(b, max_frame=100)
    await a.send_all((101).to_bytes(4, "big") + b"x" * 101)
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        await fs.receive()


@pytest.mark.parametrize("body", [
    b"\xc1",                                    # never used byte in msgpack
    msgpack.packb([1, 2, 3]),                   # not a map
    msgpack.packb({"x": 1}),                    # no "t"
    msgpack.packb({"t": 5}),                    # "t" not a string
    msgpack.packb({"t": "a"}) + b"\x00",        # trailing garbage
])
async def test_garbage_frames_are_protocol_errors(body):
    a, b = trio.testing.memory_stream_pair()
    fs = wire.FrameStream(b)
    await a.send_all(len(body).to_bytes(4, "big") + body)
    with pytest.raises(wire.ProtocolError):
        await fs.receive()


async def test_eof_between_frames_and_inside_one():
    a, b = trio.testing.memory_stream_pair()
    fs = wire.FrameStream(b)
    await a.aclose()
    with pytest.raises(EOFError):
        await fs.receive()
    a, b = trio.testing.memory_stream_pair()
    fs = wire.FrameStream(b)
    await a.send_all(wire.pack({"t": "x"})[:-1])
    await a.aclose()
    with pytest.raises(wire.ProtocolError):
        await fs.receive()


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_protocol_errors(data):
    async def go():
        a, b = trio.testing.memory_stream_pair()
        fs = wire.FrameStream(b, max_frame=1000)
        await a.send_all(data)
        await a.aclose()
        try:
            while True:
                await fs.receive()
        except (wire.ProtocolError, EOFError):
            pass
    trio.run(go)


async def test_expect_turns_refused_into_bpfs_error():
    a, b = pair(side=msgs.FROM_MASTER)
    await a.send(msgs.Refused(errno=errno.EBUSY, message="node 3 is taken"))
    with pytest.raises(BpfsError) as info:
        await b.expect(msgs.Welcome)
    assert info.value.errno == errno.EBUSY and "taken" in info.value.message
    await a.send(msgs.Ctl(cmd="halt"))
    with pytest.raises(wire.ProtocolError, match="expected 'welcome', got 'ctl'"):
        await b.expect(msgs.Welcome)


# ---- handshake -------------------------------------------------------------------

async def handshake(node_key: bytes, master_key: bytes):
    """Run both sides; return (node outcome, master outcome), each None or the exception."""
    n, m = pair(wire.HANDSHAKE_MAX_FRAME, msgs.HANDSHAKE)
    out: dict[str, BaseException | None] = {}

    async def side(name, fn, fs, key):
        try:
            await fn(fs, key)
            out[name] = None
        except BaseException as exc:
            out[name] = exc
            await fs.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "node", wire.client_handshake, n, node_key)
        nursery.start_soon(side, "master", wire.server_handshake, m, master_key)
    return out["node"], out["master"]


async def test_handshake_ok():
    assert await handshake(KEY, KEY) == (None, None)


async def test_node_with_wrong_key_is_refused():
    # The node cannot tell that the master knows the key: it gives up first.
    node, master = await handshake(OTHER, KEY)
    assert isinstance(node, wire.AuthError)
    assert master is not None


async def test_master_with_wrong_key_is_not_trusted():
    node, master = await handshake(KEY, OTHER)
    assert isinstance(node, wire.AuthError) and "master" in str(node)
    assert master is not None


async def test_master_refuses_a_node_that_fails_auth():
    n, m = pair(wire.HANDSHAKE_MAX_FRAME, msgs.HANDSHAKE)
    out = {}

    async def bad_node():
        await n.send(msgs.Hello(v=wire.VERSION, nonce=os.urandom(32)))
        await n.expect(msgs.Challenge)
        await n.send(msgs.Auth(mac=b"\0" * 32))
        with pytest.raises(BpfsError) as info:
            await n.expect(msgs.Ok)
        out["node"] = info.value

    async def master():
        with pytest.raises(wire.AuthError):
            await wire.server_handshake(m, KEY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bad_node)
        nursery.start_soon(master)
    assert out["node"].errno == errno.EACCES


async def test_version_mismatch_is_refused():
    n, m = pair(wire.HANDSHAKE_MAX_FRAME, msgs.HANDSHAKE)
    await n.send(msgs.Hello(v=wire.VERSION + 1, nonce=os.urandom(32)))
    with pytest.raises(wire.ProtocolError, match="version"):
        await wire.server_handshake(m, KEY)
    with pytest.raises(BpfsError) as info:
        await n.expect(msgs.Challenge)
    assert info.value.errno == errno.EPROTO


async def test_bad_nonce_is_a_protocol_error():
    n, m = pair(wire.HANDSHAKE_MAX_FRAME, msgs.HANDSHAKE)
    await n.send({"t": "hello", "v": wire.VERSION, "nonce": b"short"})
    with pytest.raises(wire.ProtocolError, match="nonce"):
        await wire.server_handshake(m, KEY)


async def test_connect_and_accept_over_tcp():
    async def serve(stream):
        try:
            fs = await wire.accept(stream, KEY)
            await fs.send(msgs.Ctl(cmd="halt"))
            await fs.send({"t": "hi"})
        except wire.ProtocolError:
            pass
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0,
                                                          host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        fs = await wire.connect("127.0.0.1", port, KEY)
        assert await fs.receive() == msgs.Ctl(cmd="halt")
        with pytest.raises(wire.ProtocolError, match="unknown message 'hi'"):
            await fs.receive()            # the node checks the master's messages too
        await fs.aclose()
        with pytest.raises(wire.AuthError):
            await wire.connect("127.0.0.1", port, OTHER)
        nursery.cancel_scope.cancel()


# ---- key files -------------------------------------------------------------------

def test_create_key_is_0600_and_loads(tmp_path):
    path = tmp_path / "cluster.key"
    key = wire.create_key(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert wire.load_key(str(path)) == key
    assert len(key) >= 32


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "cluster.key"
    wire.create_key(str(path))
    os.chmod(path, mode)
    with pytest.raises(BpfsError) as info:
        wire.load_key(str(path))
    assert info.value.errno == errno.EACCES and "chmod 600" in info.value.message


def test_missing_and_short_keys(tmp_path):
    with pytest.raises(BpfsError) as info:
        wire.load_key(str(tmp_path / "nope"))
    assert info.value.errno == errno.ENOENT
    short = tmp_path / "short"
    short.write_bytes(b"abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(BpfsError) as info:
        wire.load_key(str(short))
    assert info.value.errno == errno.EINVAL


def test_bpfs_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    from bpfs.cli.bpfs_main import main
    key = tmp_path / "etc" / "cluster.key"
    assert main(["keygen", "--key", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    first = wire.load_key(str(key))
    assert main(["keygen", "--key", str(key)]) != 0
    assert "exists" in capsys.readouterr().err
    assert wire.load_key(str(key)) == first
    assert main(["keygen", "--key", str(key), "--force"]) == 0
    assert wire.load_key(str(key)) != first


# ---- over a real socket: the write-at-once path ---------------------------------------

async def _socket_pair() -> tuple[wire.FrameStream, wire.FrameStream]:
    a, b = trio.socket.socketpair()
    return wire.FrameStream(trio.SocketStream(a)), wire.FrameStream(trio.SocketStream(b))


async def _receive_into(fs: wire.FrameStream, n: int, got: list[wire.Message]) -> None:
    for _ in range(n):
        got.append(await fs.receive())


async def test_socket_frames_written_at_once_and_a_big_one_in_parts():
    """Small frames go out in one write; one bigger than the socket buffer is finished by
    trio while the reader drains it; order and content are kept either way."""
    x, y = await _socket_pair()
    big = {"t": "big", "data": os.urandom(8 << 20)}
    got: list[wire.Message] = []
    async with trio.open_nursery() as n:
        n.start_soon(_receive_into, y, 3, got)
        await x.send({"t": "a"})
        await x.send(big, timeout=10)
        await x.send_many([{"t": "b"}])
    assert got == [{"t": "a"}, big, {"t": "b"}]


async def test_socket_send_after_close_never_writes_to_a_reused_fd(tmp_path):
    x, _y = await _socket_pair()
    await x.stream.aclose()
    with open(tmp_path / "victim", "wb") as f:           # may take the freed fd number
        with pytest.raises(trio.ClosedResourceError):
            await x.send({"t": "late"})
        f.flush()
    assert (tmp_path / "victim").read_bytes() == b""


async def test_send_nowait_writes_at_once_keeps_the_rest_and_yields_to_a_send_under_way():
    """From synchronous code: a frame goes out at once; one the socket cannot take whole
    leaves its end for the next send or flush (which write it first); while a send holds
    the stream, or a rest is pending, nothing is written; frames arrive whole, in order."""
    x, y = await _socket_pair()
    assert x.send_nowait({"t": "a"}) and not x.pending
    assert await y.receive() == {"t": "a"}
    big = {"t": "big", "data": os.urandom(8 << 20)}
    assert x.send_nowait(big) and x.pending          # far more than the socket buffer
    assert not x.send_nowait({"t": "later"})          # the rest goes first
    got: list[wire.Message] = []
    async with trio.open_nursery() as n:
        n.start_soon(_receive_into, y, 3, got)
        await x.send({"t": "b"}, timeout=10)           # writes the rest, then its own
        assert not x.pending
        await x.flush()                                # nothing left: a no-op
        async with x._send_lock:                       # another send under way
            assert not x.send_nowait({"t": "c"})
        assert x.send_nowait({"t": "c"})
    assert got == [big, {"t": "b"}, {"t": "c"}]


async def test_send_nowait_into_a_full_socket_keeps_nothing_of_a_frame_it_did_not_write():
    """A frame the socket takes none of is the caller's to send: kept here as well, it
    went out twice (the caller's own send, then this stream's rest)."""
    x, y = await _socket_pair()
    sent = 0
    with trio.fail_after(10):
        while x.send_nowait({"t": "n", "i": sent}):
            assert not x.pending                       # small frames fit whole or not at all
            sent += 1
    assert not x.pending
    got: list[wire.Message] = []
    async with trio.open_nursery() as n:
        n.start_soon(_receive_into, y, sent + 1, got)
        await x.send({"t": "n", "i": sent}, timeout=10)   # the refused one, sent by its caller
    assert [m["i"] for m in got] == list(range(sent + 1))


async def test_send_nowait_on_a_closed_or_broken_stream():
    x, y = await _socket_pair()
    await y.stream.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):                           # the peer's RST comes after a write
            x.send_nowait({"t": "x", "pad": b"." * 65536})
            await trio.sleep(0.01)
    await x.stream.aclose()
    assert not x.send_nowait({"t": "late"})


async def test_node_reports_go_at_once_or_queued_always_in_order():
    """The node's Session.report: at once when the stream is free; a report the socket
    could not take whole, and everything after it, from the sending task; in order."""
    from bpfs.node.session import Session

    x, y = await _socket_pair()
    session = Session(node=None, fs=x, table={})     # report/send_reports use only the stream
    big = {"t": "exited", "pid": 1, "pad": os.urandom(4 << 20)}
    session.report({"t": "restored", "id": 1, "pid": 1})
    assert await y.receive() == {"t": "restored", "id": 1, "pid": 1}   # no task ran
    session.report(big)                     # written in part: the rest is queued work
    session.report({"t": "restored", "id": 2, "pid": 2})
    session.report({"t": "exited", "pid": 2, "code": 0, "signal": None})
    got = []
    async with trio.open_nursery() as n:
        n.start_soon(session.send_reports)
        for _ in range(3):
            got.append(await y.receive())
        session.report({"t": "restored", "id": 3, "pid": 3})
        got.append(await y.receive())
        n.cancel_scope.cancel()
    assert got == [big, {"t": "restored", "id": 2, "pid": 2},
                   {"t": "exited", "pid": 2, "code": 0, "signal": None},
                   {"t": "restored", "id": 3, "pid": 3}]


async def test_big_frames_over_a_socket_come_whole_and_in_order() -> None:
    """A frame beyond RECEIVE_CHUNK is read into a buffer of its own (the socket path);
    send_many writes big frames apart from the small ones it batches."""
    from bpfs.wire.movemsgs import Part

    big = os.urandom(3 * wire.RECEIVE_CHUNK + 5)

    a, b = trio.socket.socketpair()
    sa = wire.FrameStream(trio.SocketStream(a))
    sb = wire.FrameStream(trio.SocketStream(b), side=msgs.FROM_NODE)
    batch = [Part(id=1, data=b"x" * 10, total=len(big) + 20),
             Part(id=1, data=memoryview(big)), Part(id=1, data=b"y" * 10)]

    async def send() -> None:
        await sa.send_many(batch)
        await sa.send(Part(id=2, data=big))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        got = [await sb.receive() for _ in range(4)]
    assert [bytes(g.data) for g in got] == [b"x" * 10, big, b"y" * 10, big]
    assert got[0].total == len(big) + 20 and got[1].total is None
    await sa.aclose()
    await sb.aclose()

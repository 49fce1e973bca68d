"""A moving process's pages straight from node to node (bpfs/node/direct.py), the target's
side, against a real node daemon: the fake master of test_node_migrate sends `take`, the
test plays the source node (it connects to the port `taking` names and sends `open`, then
`chunk`s) while the fake master sends the restore with the image's header, as the master
does. A wrong token and a second connection are refused; a chunk out of order or beyond
the total, or a stream that ends early, fails the restore (EPROTO, EFBIG) and nothing
runs; `abort` closes the listener.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio

from bpfs.wire import framing as wire
from tests.cluster.test_move import node_copies
from tests.cluster.test_node_migrate import (NodeUnderTest, make_image, node,  # noqa: F401
                                             nursery)
from tests.cluster.test_node_stream import header_end, reply_to

pytestmark = pytest.mark.timeout(60)


async def take(node: NodeUnderTest, mid: int) -> dict[str, Any]:
    await node.conn.fs.send({"t": "take", "id": mid})
    return await node.wait(lambda m: m["t"] in ("taking", "failed") and m["id"] == mid)


async def open_stream(port: int, mid: int, token: str) -> wire.FrameStream:
    fs = wire.FrameStream(await trio.open_tcp_stream("127.0.0.1", port))
    await fs.send({"t": "open", "id": mid, "token": token})
    return fs


async def closed_by_peer(fs: wire.FrameStream) -> bool:
    """Whether the other end closed the connection (within 5 s)."""
    with trio.fail_after(5):
        try:
            return await fs.stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


async def restore_header(node: NodeUnderTest, mid: int, data: bytes, pid: int) -> int:
    """The master's part: `streamed` and the restore with the header; where it ends."""
    end = header_end(data)
    req = node.request(data[:end])
    req.update(id=mid, pid=pid)
    await node.conn.fs.send({"t": "streamed", "id": mid, "total": len(data)})
    await node.conn.fs.send(req)
    return end


async def send_chunks(fs: wire.FrameStream, mid: int, data: bytes, at: int, size: int = 4096,
                      skip: int | None = None, extra: bytes = b"") -> None:
    rest = data[at:] + extra
    for k, off in enumerate(range(0, len(rest), size)):
        if k != skip:
            await fs.send({"t": "chunk", "id": mid, "at": at + off, "data": rest[off:off + size]})


async def test_the_pages_come_straight_and_the_process_runs(node):
    data, img = make_image(["/bin/sh", "-c", "echo straight $$"])
    mid = 41
    t = await take(node, mid)
    assert t["t"] == "taking" and len(t["token"]) == 64, t
    fs = await open_stream(t["port"], mid, t["token"])
    try:
        at = await restore_header(node, mid, data, img.pid)
        await send_chunks(fs, mid, data, at)
        reply = await reply_to(node, {"id": mid})
        assert (reply["t"], reply["pid"]) == ("restored", img.pid), reply
        assert await node.bpsh.read_all(img.pid, 1) == f"straight {img.pid}\n".encode()
        assert (await node.exited(img.pid))["code"] == 0
        assert await closed_by_peer(fs)             # the stream ended with its restore
    finally:
        await fs.aclose()
    log = node.log.read_text()
    assert f"restore {mid}: its pages straight from 127.0.0.1" in log
    assert f"restore {mid}: built as its image comes" in log


async def test_a_wrong_token_and_a_second_connection_are_refused(node):
    data, img = make_image(["/bin/sh", "-c", "echo after $$"])
    mid = 42
    t = await take(node, mid)
    wrong = await open_stream(t["port"], mid, "0" * 64 if t["token"] != "0" * 64 else "1" * 64)
    other = await open_stream(t["port"], mid + 1, t["token"])       # another restore's
    try:
        assert await closed_by_peer(wrong) and await closed_by_peer(other)
    finally:
        await wrong.aclose()
        await other.aclose()
    assert node.log.read_text().count(f"restore {mid}: refused a direct stream") == 2
    fs = await open_stream(t["port"], mid, t["token"])             # the right one
    try:
        await trio.sleep(0.2)
        with pytest.raises(OSError):                               # no second stream
            await open_stream(t["port"], mid, t["token"])
        at = await restore_header(node, mid, data, img.pid)
        await send_chunks(fs, mid, data, at)
        reply = await reply_to(node, {"id": mid})
        assert reply["t"] == "restored", reply
        assert await node.bpsh.read_all(img.pid, 1) == f"after {img.pid}\n".encode()
    finally:
        await fs.aclose()


@pytest.mark.parametrize("how, err", [("skip", errno.EPROTO), ("extra", errno.EFBIG),
                                      ("short", errno.EPROTO)])
async def test_a_bad_stream_fails_the_restore_and_nothing_runs(node, how, err):
    data, img = make_image(["/bin/echo", "never"])
    mid = 43
    t = await take(node, mid)
    fs = await open_stream(t["port"], mid, t["token"])
    try:
        at = await restore_header(node, mid, data, img.pid)
        if how == "short":
            await send_chunks(fs, mid, data[:-5000], at)
            await fs.aclose()
        else:
            await send_chunks(fs, mid, data, at, skip=1 if how == "skip" else None,
                              extra=b"x" * 10 if how == "extra" else b"")
        reply = await reply_to(node, {"id": mid})
        assert (reply["t"], reply["errno"]) == ("failed", err), reply
        if how != "short":
            assert await closed_by_peer(fs)         # a source still sending fails
    finally:
        await fs.aclose()
    await trio.sleep(0.2)
    assert not node.held() and not node_copies(img.pid)
    img2, _ = await node.run(["/bin/echo", "after"])    # the node restores on
    assert await node.bpsh.read_all(img2.pid, 1) == b"after\n"


async def test_abort_closes_the_listener(node):
    t = await take(node, 44)
    await node.conn.fs.send({"t": "abort", "id": 44})
    await trio.sleep(0.2)
    with pytest.raises(OSError):
        await open_stream(t["port"], 44, t["token"])


async def test_a_source_that_cannot_connect_within_a_second_goes_through_the_master():
    """The source's side (`Route`): a target whose listener takes no more connections (its
    queue full: the kernel drops the SYNs) is given up after CONNECT_TIMEOUT; one that
    refuses, at once. Either way the pages go through the master (`fs` None)."""
    from bpfs.node.direct import CONNECT_TIMEOUT, Route
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    addr = full.getsockname()
    fillers = []
    try:
        for _ in range(4):                      # the queue's room, then dropped SYNs
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(addr)
            fillers.append(s)
        route = Route(7)
        t0 = trio.current_time()
        await route.connect(*addr, "0" * 64)
        took = trio.current_time() - t0
        assert route.fs is None and route.decided.is_set()
        assert CONNECT_TIMEOUT * 0.9 <= took < CONNECT_TIMEOUT + 2, took
    finally:
        for s in fillers:
            s.close()
        full.close()
    with socket.socket() as s:                  # a port that was free: refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    route = Route(8)
    t0 = trio.current_time()
    await route.connect("127.0.0.1", port, "0" * 64)
    assert route.fs is None and trio.current_time() - t0 < CONNECT_TIMEOUT


async def test_after_eight_wrong_openings_the_take_stops_listening(node):
    """Whoever guesses gets eight tries; then the listener closes, and the source, refused,
    sends through the master."""
    t = await take(node, 45)
    for _ in range(8):
        fs = await open_stream(t["port"], 45, "f" * 64 if t["token"] != "f" * 64 else "e" * 64)
        try:
            assert await closed_by_peer(fs)
        finally:
            await fs.aclose()
    await trio.sleep(0.2)
    with pytest.raises(OSError):
        await open_stream(t["port"], 45, t["token"])
    assert "restore 45: no direct stream opened (8 refused)" in node.log.read_text()

"""A restore whose image streams in (bpfs/node/streamin.py), against a real node daemon.

The fake master of test_node_migrate sends `streamed`, then the `restore` whose image is
the first piece, then `piece`s at their offsets, as the master does for a moved process's
memory. The node builds the process as the pieces come when it can (the PID is in the
request, the links connect at once, it has the files), else it puts them together first.
A piece out of order or beyond the total fails that restore and nothing runs; `abort`
discards it unreported; the node restores on afterwards.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from bpfs.migrate import imageframe
from tests.cluster.test_move import node_copies
from tests.cluster.test_node_migrate import (NodeUnderTest, make_image, node,  # noqa: F401
                                             nursery)

pytestmark = pytest.mark.timeout(60)


def header_end(data: bytes) -> int:
    return imageframe.HEAD.size + imageframe.HEAD.unpack_from(data)[1]


async def stream(node: NodeUnderTest, data: bytes, size: int, pid: int | None = None,
                 skip: int | None = None, extra: bytes = b"", stop_after: int | None = None,
                 first: int | None = None) -> dict[str, Any]:
    """Send `data` as a streamed restore: `first` bytes in the request, the rest in pieces
    of `size` bytes (the piece numbered `skip` left out, `extra` bytes after the last, only
    `stop_after` pieces): the request."""
    first = size if first is None else first
    req = node.request(data[:first])
    if pid is not None:
        req["pid"] = pid
    await node.conn.fs.send({"t": "streamed", "id": req["id"], "total": len(data)})
    await node.conn.fs.send(req)
    rest = data[first:] + extra
    for k, at in enumerate(range(0, len(rest), size)):
        if stop_after is not None and k >= stop_after:
            break
        if k != skip:
            await node.conn.fs.send({"t": "piece", "id": req["id"], "at": first + at,
                                     "data": rest[at:at + size]})
    return req


async def reply_to(node: NodeUnderTest, req: dict[str, Any]) -> dict[str, Any]:
    return await node.wait(lambda m: m["t"] in ("restored", "failed") and m["id"] == req["id"])


@pytest.mark.parametrize("with_pid, first", [(True, 0), (True, 4096), (False, 4096)])
async def test_a_streamed_image_is_restored_as_its_pieces_come(node, with_pid, first):
    """With the PID (the master's way) the process is built as soon as the header is in
    (in the first piece or in later ones) and the pieces are written as they land;
    without it the node puts them together and restores then: the same process."""
    data, img = make_image(["/bin/sh", "-c", "echo streamed $$"])
    req = await stream(node, data, 4096, img.pid if with_pid else None,
                       first=first or header_end(data) + 1)
    reply = await reply_to(node, req)
    assert (reply["t"], reply["pid"]) == ("restored", img.pid), reply
    assert await node.bpsh.read_all(img.pid, 1) == f"streamed {img.pid}\n".encode()
    assert (await node.exited(img.pid))["code"] == 0
    how = "built as its image comes" if with_pid else "its image put together first"
    assert f"restore {req['id']}: {how}" in node.log.read_text()


@pytest.mark.parametrize("how, err", [("skip", errno.EPROTO), ("extra", errno.EFBIG)])
async def test_a_piece_out_of_order_or_beyond_the_total_fails_it_and_nothing_runs(
        node, how, err):
    data, img = make_image(["/bin/echo", "never"])
    if how == "skip":
        req = await stream(node, data, 4096, img.pid, skip=1)
    else:
        req = await stream(node, data, 4096, img.pid, extra=b"x" * 10)
    reply = await reply_to(node, req)
    assert (reply["t"], reply["errno"]) == ("failed", err), reply
    await trio.sleep(0.2)
    assert not node.held() and not node_copies(img.pid)
    # later pieces of it are ignored, and the node restores on
    await node.conn.fs.send({"t": "piece", "id": req["id"], "at": 0, "data": b"late"})
    img2, _ = await node.run(["/bin/echo", "after"])
    assert await node.bpsh.read_all(img2.pid, 1) == b"after\n"


async def test_an_aborted_stream_is_discarded_unreported(node):
    data, img = make_image(["/bin/echo", "never"])
    req = await stream(node, data, 4096, img.pid, stop_after=1, first=header_end(data) + 1)
    with trio.fail_after(10):
        while not node_copies(img.pid):     # the process being built, stopped
            await trio.sleep(0.02)
    await node.conn.fs.send({"t": "abort", "id": req["id"]})
    with trio.fail_after(10):
        while node_copies(img.pid) or node.held():
            await trio.sleep(0.02)
    assert not [m for m in node.conn.inbox if m.get("id") == req["id"]
                and m["t"] in ("restored", "failed")]
    img2, _ = await node.run(["/bin/echo", "after"])
    assert await node.bpsh.read_all(img2.pid, 1) == b"after\n"


async def test_a_stream_that_lies_about_its_first_piece_is_refused(node):
    data, img = make_image(["/bin/echo", "never"])
    req = node.request(data)
    req["pid"] = img.pid
    await node.conn.fs.send({"t": "streamed", "id": req["id"], "total": len(data)})
    await node.conn.fs.send(req)                # the whole image is no first piece
    reply = await reply_to(node, req)
    assert (reply["t"], reply["errno"]) == ("failed", errno.EPROTO), reply
    assert not node.held()

"""A node (it holds the key) that abuses the move messages.

Pieces and dumps for moves the master never asked for are ignored (one log line), and
the connection goes on; nothing the node says makes the master move, seize or signal a
process of its own.
"""

from __future__ import annotations

import os
import shutil

import pytest
import trio

from tests.cluster.test_master import Master, fake_node, master, wait_for  # noqa: F401

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with allow_other needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="no FUSE"),
]


def test_unasked_pieces_and_dumps_are_ignored_and_the_node_stays(master: Master) -> None:
    async def go() -> None:
        async with fake_node(master) as node:
            for i in range(50):
                await node.fs.send({"t": "part", "id": 1000 + i, "data": b"x" * 65536})
            await node.fs.send({"t": "dumped", "id": 7, "image": b"garbage", "consumed": 5})
            await node.fs.send({"t": "dumped", "id": 2**62, "image": b""})
            await node.fs.send({"t": "failed", "id": 7, "errno": 5, "message": "no"})
            await node.fs.send({"t": "taking", "id": 7, "port": 9, "token": "ab" * 32})
            await node.fs.send({"t": "part", "id": 8, "data": b"h", "total": 9,
                                "direct": True})
            # still served: a fork under a process it does not run is answered (refused)
            await node.fs.send({"t": "fork", "seq": 1, "parent": 1})
            await wait_for(lambda: any(m["t"] == "forked" for m in node.received))
            assert not node.closed.is_set()
    trio.run(go)
    assert master.proc.poll() is None
    with open(f"/proc/{os.getpid()}/status") as f:
        assert "TracerPid:\t0" in f.read()          # nobody seized us


def test_a_piece_larger_than_the_grammar_ends_that_connection_only(master: Master) -> None:
    async def go() -> None:
        async with fake_node(master) as node:
            await node.fs.send({"t": "part", "id": 1, "data": b"x" * ((8 << 20) + 1)})
            with trio.fail_after(10):
                await node.closed.wait()
        async with fake_node(master) as again:      # the master serves the next one
            await again.fs.send({"t": "fork", "seq": 1, "parent": 1})
            await wait_for(lambda: any(m["t"] == "forked" for m in again.received))
    trio.run(go)
    assert master.proc.poll() is None

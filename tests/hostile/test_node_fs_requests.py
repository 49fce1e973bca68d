"""A key holder's fs_* requests to a real master: answered with the ids it claims and no
more, only on the handles its own connection opened, and a bad one costs that request
an errno, never the connection or the master (bpfs/fs/forwarded.py)."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import trio

from bpfs.fs.inodes import Ino, Kind
from tests.cluster.test_master import (Master, fake_node, master, node_state,  # noqa: F401
                                       wait_for)
from tests.hostile.test_hostile_peer import assert_no_traceback

pytestmark = pytest.mark.timeout(60)

ROOT = {"uid": 0, "gid": 0, "groups": []}
ALICE = {"uid": 1000, "gid": 1000, "groups": [1000]}


async def ask(node: Any, msg: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
    """Send `msg` (unless it is only an id: one sent already) and wait for the fs_reply
    with its id."""
    if "t" in msg:
        await node.fs.send(msg)
    with trio.fail_after(timeout):
        while True:
            for got in node.received:
                if got.get("t") == "fs_reply" and got["id"] == msg["id"]:
                    node.received.remove(got)
                    return got
            await trio.sleep(0.01)


def ino(kind: Kind, n: int = 0) -> int:
    return Ino(kind, n).encode()


async def test_requests_act_as_claimed_on_the_connections_own_handles(master: Master) -> None:
    async with fake_node(master, number=1) as node, fake_node(master, number=2) as other:
        await wait_for(lambda: node_state(master, 1) == "up" and node_state(master, 2) == "up")
        opened = await ask(node, {"t": "fs_open", "id": 1, "ino": ino(Kind.STATUS), "flags": 0,
                                  "cred": ALICE})
        fh = opened["fh"]
        assert opened["data"] == open(os.path.join(master.mount, "status"), "rb").read()
        got = await ask(node, {"t": "fs_read", "id": 2, "fh": fh, "off": 0, "size": 4096})
        assert got["data"] == opened["data"]
        for who, handle in ((other, fh), (node, fh + 1000)):
            got = await ask(who, {"t": "fs_read", "id": 3, "fh": handle, "off": 0, "size": 1})
            assert got["errno"] == errno.EBADF
        ctl = await ask(node, {"t": "fs_open", "id": 4, "ino": ino(Kind.NODE_CTL, 2),
                               "flags": os.O_RDWR, "cred": ALICE})
        for line, want in ((b"state unavailable", errno.EPERM),
                           (b"exec hostname", errno.EOPNOTSUPP)):
            got = await ask(node, {"t": "fs_write", "id": 5, "fh": ctl["fh"], "off": 0,
                                   "data": line})
            assert got["errno"] == want
        assert node_state(master, 2) == "up"
        got = await ask(node, {"t": "fs_lookup", "id": 6, "parent": 1, "name": b"nodes/0"})
        assert got["errno"] == errno.EINVAL
        await node.fs.send({"t": "fs_release", "id": 7, "fh": fh})     # no reply
        got = await ask(node, {"t": "fs_read", "id": 8, "fh": fh, "off": 0, "size": 1})
        assert got["errno"] == errno.EBADF
        assert node_state(master, 1) == "up" and not node.closed.is_set()
    assert_no_traceback(master)


async def test_a_cancelled_read_gets_no_reply_and_the_node_goes_on(master: Master) -> None:
    async with fake_node(master, number=1) as node:
        await wait_for(lambda: node_state(master, 1) == "up")
        events = await ask(node, {"t": "fs_open", "id": 1, "ino": ino(Kind.EVENTS), "flags": 0,
                                  "cred": ROOT})
        await node.fs.send({"t": "fs_read", "id": 2, "fh": events["fh"], "off": 0,
                            "size": 4096})
        await trio.sleep(0.3)
        await node.fs.send({"t": "fs_cancel", "id": 2})
        await node.fs.send({"t": "fs_cancel", "id": 99})          # nothing runs as 99
        got = await ask(node, {"t": "fs_getattr", "id": 3, "ino": 1})
        assert got["attr"]["ino"] == 1 and got.get("errno") is None
        await node.fs.send({"t": "fs_read", "id": 4, "fh": events["fh"], "off": 0,
                            "size": 4096})
        await trio.sleep(0.3)
        node1 = os.path.join(master.mount, "nodes", "1")
        os.chmod(node1, 0o110)                       # news: a chmod event
        os.chmod(node1, 0o111)
        got = await ask(node, {"t": "fs_read", "id": 4})     # only the read not cancelled
        assert b" node 1 mode 0110\n" in got["data"]
        await trio.sleep(0.3)
        assert not [r for r in node.received if r.get("t") == "fs_reply"]
    assert_no_traceback(master)

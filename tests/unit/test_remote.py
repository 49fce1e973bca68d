"""The node's proxy (bpfs/fs/remote.py) against the master's own handlers, in one process:
every request goes through the fs_* messages (encoded and decoded, as on the wire) to a
NodeFs (bpfs/fs/forwarded.py) over BpfsOperations, and what a node's process reads is
what the same calls on the master give, rendering for rendering."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import pyfuse3
import pytest

from bpfs.errors import BpfsError
from bpfs.fs.forwarded import NodeFs
from bpfs.fs.remote import RemoteOperations
from bpfs.model import Caller
from bpfs.wire import messages as m
from tests.unit.test_fs_ops import ROOT, FakePin, make, path_ino


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 0


class Wire:
    """Stands for FsClient and the connection: each request and reply encoded, decoded."""

    def __init__(self, fs: NodeFs) -> None:
        self.fs, self.ids, self.asked = fs, 0, []

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    async def ask(self, msg: m.Msg, interrupted=None) -> m.FsReply:
        msg = m.FROM_NODE.decode(m.encode(msg))
        self.asked.append(type(msg).__name__)
        reply = await self.fs.answer(msg)
        return m.FROM_MASTER.decode(m.encode(reply))

    async def tell(self, msg: m.Msg) -> None:
        await self.ask(msg)


def pair():
    ops, s = make()
    wire = Wire(NodeFs(ops, 1, None))       # answer() never sends
    return RemoteOperations(wire, take_pin=FakePin), ops, s, wire


async def remote_ino(remote: RemoteOperations, path: str) -> int:
    ino = pyfuse3.ROOT_INODE
    for part in path.split("/"):
        ino = (await remote.lookup(ino, part.encode(), Ctx())).st_ino
    return ino


async def test_reads_render_as_the_masters_handles_do() -> None:
    """Rendered at open; reads from any offset give that rendering; a second read from 0
    renders again, and offsets after it read the new one: on both paths, in step."""
    remote, ops, s, wire = pair()
    ino = await remote_ino(remote, "nodes/0/status")
    assert ino == await path_ino(ops, "nodes/0/status")
    rfh = (await remote.open(ino, os.O_RDONLY, Ctx())).fh
    lfh = (await ops.open(ino, os.O_RDONLY, ROOT)).fh
    asked = len(wire.asked)
    steps = [(0, 2), (2, 10), (3, 10)]
    for off, size in steps:
        assert await remote.read(rfh, off, size) == await ops.read(lfh, off, size)
    assert len(wire.asked) == asked             # answered from what came with the open
    s.cluster.set_admin_state(0, "unavailable", Caller(0, 0))
    for off, size in [(1, 10), (0, 100), (3, 100), (0, 2), (2, 100)]:
        assert await remote.read(rfh, off, size) == await ops.read(lfh, off, size), (off, size)
    assert wire.asked[asked:] == ["FsRead"] * 4
    await remote.release(rfh)
    assert wire.fs.handles == set()


async def test_attributes_listings_and_refusals_are_the_masters() -> None:
    remote, ops, _, _ = pair()
    ino = await remote_ino(remote, "nodes/1")
    mine, theirs = await remote.getattr(ino, Ctx()), await ops.getattr(ino, ROOT)
    assert (mine.st_mode, mine.st_uid, mine.st_nlink, mine.attr_timeout, mine.entry_timeout) \
        == (theirs.st_mode, theirs.st_uid, theirs.st_nlink, theirs.attr_timeout,
            theirs.entry_timeout)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await remote.lookup(ino, b"nope", Ctx())
    assert info.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await remote.setattr(ino, _Mode(0o100), _Fields(), None, Ctx(1000, 1000, 4242))
    assert info.value.errno == errno.EPERM
    fh = (await remote.open(await remote_ino(remote, "nodes/1/ctl"), os.O_WRONLY,
                            Ctx(1000, 1000, 4242))).fh
    with pytest.raises(pyfuse3.FUSEError) as info:
        await remote.write(fh, 0, b"state unavailable")
    assert info.value.errno == errno.EPERM
    assert await remote.access(await remote_ino(remote, "nodes/1/ctl"), os.W_OK, Ctx())
    assert not await remote.access(await remote_ino(remote, "status"), os.W_OK, Ctx())


async def test_a_node_without_its_master_answers_enotconn() -> None:
    class Gone:
        def next_id(self) -> int:
            return 1

        async def tell(self, msg) -> None:
            pass

        async def ask(self, msg, interrupted=None):
            raise BpfsError(errno.ENOTCONN, "not connected to the master")

    with pytest.raises(pyfuse3.FUSEError) as info:
        await RemoteOperations(Gone()).getattr(pyfuse3.ROOT_INODE, Ctx())
    assert info.value.errno == errno.ENOTCONN


@dataclass
class _Mode:
    st_mode: int
    st_uid: int = 0
    st_gid: int = 0
    st_size: int = 0


@dataclass
class _Fields:
    update_mode: bool = True
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False

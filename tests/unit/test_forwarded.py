"""A node's fs requests, answered by the master's own handlers (bpfs/fs/forwarded.py),
without a mount or a connection: the checks each connection is held to (handles it did
not open, limits, names), the caller it claims and no more, and what needs the caller's
process on the master (EOPNOTSUPP). Through real mounts and nodes:
tests/cluster/test_node_bproc.py."""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest
import trio
import trio.testing

from bpfs.fs import forwarded
from bpfs.fs.forwarded import NodeFs
from bpfs.model import Caller, Proc
from bpfs.wire import messages as m
from tests.unit.test_fs_ops import ROOT as ROOT_CTX, FakePin, make, path_ino

ROOT = m.Cred(uid=0, gid=0, groups=(), pid=7)
ALICE = m.Cred(uid=1000, gid=1000, groups=(1000,), pid=8)


class Replies:
    """Stands for the connection: what NodeFs sent back, by request id."""

    def __init__(self) -> None:
        self.got: dict[int, m.FsReply] = {}

    async def send(self, reply: m.FsReply) -> None:
        self.got[reply.id] = reply


def node_fs(node: int = 1):
    ops, s = make()
    return NodeFs(ops, node, Replies().send), ops, s


async def ask(fs: NodeFs, cls: type[m.Msg], **fields) -> m.FsReply:
    return await fs.answer(cls(id=fields.pop("id", 1), **fields))


async def ino(fs: NodeFs, path: str) -> int:
    return await path_ino(fs.ops, path)


async def open_fh(fs: NodeFs, path: str, flags: int = os.O_RDONLY, cred: m.Cred = ROOT) -> int:
    reply = await ask(fs, m.FsOpen, ino=await ino(fs, path), flags=flags, cred=cred)
    assert reply.errno is None and reply.fh is not None, reply
    return reply.fh


async def write(fs: NodeFs, path: str, data: bytes, cred: m.Cred) -> tuple[int | None, str]:
    """The errno of writing `data` and the handle's text read back, as CTL_WRITER does."""
    fh = await open_fh(fs, path, os.O_RDWR, cred)
    err = (await ask(fs, m.FsWrite, fh=fh, off=0, data=data)).errno
    text = (await ask(fs, m.FsRead, fh=fh, off=0, size=4096)).data or b""
    await ask(fs, m.FsRelease, fh=fh)
    return err, text.decode().strip()


async def test_a_node_reads_what_the_master_reads() -> None:
    fs, ops, _ = node_fs()
    reply = await ask(fs, m.FsLookup, parent=pyfuse3.ROOT_INODE, name=b"status")
    assert reply.attr is not None and reply.attr.attr_timeout == 0
    fh = await open_fh(fs, "nodes/0/status")
    assert (await ask(fs, m.FsRead, fh=fh, off=0, size=100)).data == b"up\n"
    assert (await ask(fs, m.FsGetattr, ino=await ino(fs, "nodes/0"))).attr.mode & 0o7777 == 0o111
    dfh = (await ask(fs, m.FsOpendir, ino=await ino(fs, "nodes"), cred=ALICE)).fh
    names = [e.name for e in (await ask(fs, m.FsReaddir, fh=dfh, start=0)).entries]
    assert names == [b"0", b"1", b"2"]
    assert (await ask(fs, m.FsReaddir, fh=dfh, start=2)).entries[0].next == 3


async def test_a_node_uses_only_the_handles_it_opened() -> None:
    fs, ops, _ = node_fs()
    other = NodeFs(ops, 2, Replies().send)
    mine = await open_fh(fs, "status")
    masters = (await ops.open(await ino(fs, "status"), os.O_RDONLY, ROOT_CTX)).fh
    for fh, who in ((masters, fs), (mine, other)):
        assert (await ask(who, m.FsRead, fh=fh, off=0, size=10)).errno == errno.EBADF
        assert (await ask(who, m.FsRelease, fh=fh)).errno == errno.EBADF
    assert (await ask(fs, m.FsRelease, fh=mine)).errno is None
    assert (await ask(fs, m.FsRead, fh=mine, off=0, size=10)).errno == errno.EBADF
    assert masters in ops._handles                 # the master's own handle is untouched


async def test_a_plain_user_on_a_node_cannot_change_states_root_can() -> None:
    fs, _, s = node_fs()
    assert await write(fs, "nodes/1/ctl", b"state unavailable", ALICE) == (
        errno.EPERM, "only root may set the state of node 1")
    assert s.cluster.node(1).state == "up"
    assert await write(fs, "nodes/1/ctl", b"state unavailable", ROOT) == (None, "ok")
    assert s.cluster.node(1).state == "unavailable"


async def test_signals_from_a_node_follow_the_kill_rules_with_the_claimed_uid() -> None:
    fs, _, s = node_fs()
    s.cluster.add_proc(Proc(4242, 0, 1001, 1001, "sleep 100", 1.0, gen=1))      # bob's
    err, text = await write(fs, "procs/4242/signal", b"9", ALICE)
    assert err == errno.EACCES or err == errno.EPERM, text
    assert not [x for x in s.sent if x[1].get("t") == "signal"]
    assert await write(fs, "procs/4242/signal", b"9", ROOT) == (None, "ok")
    assert s.sent[-1] == (0, {"t": "signal", "pid": 4242, "sig": 9})


async def test_exec_from_a_node_is_eopnotsupp() -> None:
    fs, _, s = node_fs(node=2)
    err, text = await write(fs, "nodes/1/ctl", b"exec hostname", ALICE)
    assert err == errno.EOPNOTSUPP
    assert text.endswith("from a process on node 2 is not supported: use execmove (bpsh)")
    assert not s.sent and not FakePin.open          # nothing pinned, nothing started


async def test_the_claimed_groups_and_no_more_decide_chgrp() -> None:
    fs, _, s = node_fs()
    s.cluster.chown(0, 1000, None, Caller(0, 0))
    node0 = await ino(fs, "nodes/0")
    member = m.Cred(uid=1000, gid=1000, groups=(1000, 2000))
    assert (await ask(fs, m.FsSetattr, ino=node0, cred=ALICE, gid=2000)).errno == errno.EPERM
    assert (await ask(fs, m.FsSetattr, ino=node0, cred=member, gid=2000)).errno is None
    assert s.cluster.node(0).gid == 2000


async def test_limits_and_names() -> None:
    fs, _, _ = node_fs()
    bad = await ask(fs, m.FsLookup, parent=pyfuse3.ROOT_INODE, name=b"nodes/0")
    assert bad.errno == errno.EINVAL
    assert (await ask(fs, m.FsGetattr, ino=2**64 - 1)).errno == errno.ENOENT
    fs.handles.update(range(10**6, 10**6 + forwarded.MAX_HANDLES))
    reply = await ask(fs, m.FsOpen, ino=await ino(fs, "status"), flags=0, cred=ROOT)
    assert reply.errno == errno.EMFILE


async def test_close_releases_every_handle_of_the_connection() -> None:
    fs, ops, _ = node_fs()
    before = len(ops._handles)
    for _ in range(3):
        await open_fh(fs, "nodes/0/ctl", os.O_WRONLY, ALICE)
    assert len(ops._handles) == before + 3 and not ops._pins    # forwarded: nothing pinned
    fs.close()
    assert len(ops._handles) == before and not fs.handles


async def test_a_blocked_read_is_cancelled_without_a_reply_and_ids_are_one_at_a_time() -> None:
    replies = Replies()
    ops, _ = make()
    fs = NodeFs(ops, 1, replies.send)
    fh = await open_fh(fs, "events")
    async with trio.open_nursery() as nursery:
        await fs.take(nursery, m.FsRead(id=5, fh=fh, off=0, size=100))
        await trio.testing.wait_all_tasks_blocked()
        assert 5 in fs.running
        await fs.take(nursery, m.FsRead(id=5, fh=fh, off=0, size=100))
        await trio.testing.wait_all_tasks_blocked()
        assert replies.got[5].errno == errno.EINVAL
        del replies.got[5]
        await fs.take(nursery, m.FsCancel(id=5))
    assert 5 not in replies.got and not fs.running


async def test_more_requests_at_once_than_allowed_are_eagain(monkeypatch) -> None:
    monkeypatch.setattr(forwarded, "MAX_RUNNING", 2)
    replies = Replies()
    ops, _ = make()
    fs = NodeFs(ops, 1, replies.send)
    fh = await open_fh(fs, "events")
    async with trio.open_nursery() as nursery:
        for i in range(3):
            await fs.take(nursery, m.FsRead(id=10 + i, fh=fh, off=0, size=100))
        await trio.testing.wait_all_tasks_blocked()
        assert replies.got[12].errno == errno.EAGAIN and len(fs.running) == 2
        fs.close()
    assert not fs.running

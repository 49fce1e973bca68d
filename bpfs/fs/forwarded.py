"""The requests of a node's processes on /bproc, answered by the master's own handlers.

A node daemon mounts a FUSE filesystem at the master's mount point for the processes of
its node (bpfs/fs/remote.py) and forwards each operation over its authenticated
connection as an `fs_*` message (bpfs/wire/messages.py, whose decoder has checked every
field's type and bounds before this module sees it). `NodeFs`, one per connection,
answers each with the BpfsOperations handler that answers the master's own kernel,
given a `Forwarded` context (bpfs/fs/ops.py) that carries the caller the node claims:
its uid, gid and groups, `Caller.node` set, no pin. So both paths share every rule
(model permissions, ctl commands, errnos, the text a ctl handle reads back), and a
request from a node can do exactly what the same user could do on the master, minus
what needs its process on the master (execmove, exec: EOPNOTSUPP, bpfs/ctl.py).

Trust: the node daemon is root, and root on a node is root of the cluster (as in BProc):
it may claim any uid, but its requests never run with more than the ids it claims.
What this module holds each connection to (`check`, the one place):

  - a handle number is the master's; a connection may use only those it opened
    (EBADF for any other: the master's own, another node's, one it released);
  - at most MAX_HANDLES open handles (EMFILE) and MAX_RUNNING requests at once
    (EAGAIN: a blocked `events` reader holds one until it has news), and an `id` once
    at a time (EINVAL while it runs);
  - a name is a name: no "/" and no NUL (EINVAL).

An `fs_open` of a rendered file (status, info...) carries its content, rendered at
open as for any handle: the node answers the reads of that rendering itself
(bpfs/fs/remote.py), so `cat` costs one round trip, not three.

A request that cannot wait (lookup, getattr, access, opendir, readdir, open) is answered
at once, in the connection's receive loop; a read or write (a blocked `events` reader, a
ctl command), or a setattr (it saves the state file), runs in a task of the connection's
nursery, so it holds up none of the node's other messages; `fs_cancel` cancels it (its
caller was interrupted: the node answered EINTR, and no reply follows). `fs_release` has
no reply: the kernel does not wait for it either. When the connection ends, its running
requests are cancelled and its handles released (`close`).
"""

from __future__ import annotations

import errno
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import pyfuse3
import trio

from bpfs.errors import BpfsError
from bpfs.fs.ops import BpfsOperations, Forwarded
from bpfs.model import Caller, NodeId, Pid
from bpfs.wire import messages as m

log = logging.getLogger("bpfs.fs")

MAX_HANDLES = 4096          # open handles a node's processes may hold on the master
MAX_RUNNING = 1024          # requests of one node at once

Send = Callable[[m.FsReply], Awaitable[None]]


@dataclass
class _Changes:
    """What a node's fs_setattr changes, in the shape BpfsOperations.setattr reads."""
    update_mode: bool
    update_uid: bool
    update_gid: bool
    update_size: bool
    st_mode: int
    st_uid: int
    st_gid: int
    st_size: int


def fs_attr(a: pyfuse3.EntryAttributes) -> m.FsAttr:
    return m.FsAttr(ino=a.st_ino, mode=a.st_mode, nlink=a.st_nlink, uid=a.st_uid, gid=a.st_gid,
                    size=a.st_size, time_ns=a.st_mtime_ns, entry_timeout=a.entry_timeout,
                    attr_timeout=a.attr_timeout)


class NodeFs:
    """The fs requests of one node's connection (see the module doc)."""

    def __init__(self, ops: BpfsOperations, node: int, send: Send) -> None:
        self.ops = ops
        self.node = NodeId(node)
        self.send = send
        self.handles: set[int] = set()
        self.running: dict[int, trio.CancelScope] = {}

    def caller(self, cred: m.Cred) -> Forwarded:
        return Forwarded(Caller(cred.uid, cred.gid, frozenset(cred.groups),
                                Pid(cred.pid or 0), node=self.node))

    async def take(self, nursery: trio.Nursery, msg: m.Msg) -> None:
        """Answer `msg` (an fs request): at once, or from a task in `nursery` (see the
        module doc); `fs_cancel` cancels one, `fs_release` has no reply."""
        if isinstance(msg, AT_ONCE):
            reply = await self.answer(msg)
            if not isinstance(msg, m.FsRelease):
                await self._reply(reply)
            return
        if isinstance(msg, m.FsCancel):
            scope = self.running.get(msg.id)
            if scope is not None:
                scope.cancel()
            return
        scope = trio.CancelScope()
        if msg.id in self.running or len(self.running) >= MAX_RUNNING:
            nursery.start_soon(self._reply, m.FsReply(
                id=msg.id, errno=errno.EINVAL if msg.id in self.running else errno.EAGAIN))
            return
        self.running[msg.id] = scope
        nursery.start_soon(self._run, msg, scope)

    async def _run(self, msg: Any, scope: trio.CancelScope) -> None:
        try:
            with scope:
                reply = await self.answer(msg)
            if not scope.cancelled_caught:
                await self._reply(reply)
        finally:
            if self.running.get(msg.id) is scope:
                del self.running[msg.id]

    async def _reply(self, reply: m.FsReply) -> None:
        try:
            await self.send(reply)
        except BpfsError:
            pass                # the connection is gone: so are the node's callers

    async def answer(self, msg: Any) -> m.FsReply:
        """The reply to `msg`: its result, or the errno the master's kernel would get."""
        try:
            self.check(msg)
            return await ANSWERS[type(msg)](self, msg)
        except pyfuse3.FUSEError as exc:
            return m.FsReply(id=msg.id, errno=exc.errno)
        except BpfsError as exc:
            return m.FsReply(id=msg.id, errno=exc.errno or errno.EIO)
        except Exception:
            log.exception("node %d: internal error answering %s", self.node, type(msg).__name__)
            return m.FsReply(id=msg.id, errno=errno.EIO)

    def check(self, msg: Any) -> None:
        """What the types cannot say (see the module doc)."""
        fh = getattr(msg, "fh", None)
        if fh is not None and fh not in self.handles:
            raise BpfsError(errno.EBADF, f"node {self.node} has no open handle {fh}")
        if isinstance(msg, (m.FsOpen, m.FsOpendir)) and len(self.handles) >= MAX_HANDLES:
            raise BpfsError(errno.EMFILE, f"node {self.node} holds {MAX_HANDLES} handles")
        if isinstance(msg, m.FsLookup) and (b"/" in msg.name or b"\0" in msg.name):
            raise BpfsError(errno.EINVAL, "a name has no / and no NUL")

    def close(self) -> None:
        """The connection ended: cancel what runs, release every handle it opened."""
        for scope in self.running.values():
            scope.cancel()
        for fh in self.handles:
            self.ops.drop(fh)
        self.handles.clear()

    # ---- one answer per request ---------------------------------------------------------

    async def _lookup(self, msg: m.FsLookup) -> m.FsReply:
        attr = await self.ops.lookup(msg.parent, msg.name)
        return m.FsReply(id=msg.id, attr=fs_attr(attr))

    async def _getattr(self, msg: m.FsGetattr) -> m.FsReply:
        return m.FsReply(id=msg.id, attr=fs_attr(await self.ops.getattr(msg.ino)))

    async def _setattr(self, msg: m.FsSetattr) -> m.FsReply:
        changes = _Changes(msg.mode is not None, msg.uid is not None, msg.gid is not None,
                           msg.size is not None, msg.mode or 0, msg.uid or 0, msg.gid or 0,
                           msg.size or 0)
        attr = await self.ops.setattr(msg.ino, changes, changes, None, self.caller(msg.cred))
        return m.FsReply(id=msg.id, attr=fs_attr(attr))

    async def _access(self, msg: m.FsAccess) -> m.FsReply:
        ok = await self.ops.access(msg.ino, msg.mode, self.caller(msg.cred))
        return m.FsReply(id=msg.id, ok=bool(ok))

    async def _opendir(self, msg: m.FsOpendir) -> m.FsReply:
        fh = await self.ops.opendir(msg.ino, self.caller(msg.cred))
        self.handles.add(fh)
        return m.FsReply(id=msg.id, fh=fh)

    async def _readdir(self, msg: m.FsReaddir) -> m.FsReply:
        listing = itertools.islice(self.ops.listing(msg.fh, msg.start), m.FS_ENTRIES)
        return m.FsReply(id=msg.id, entries=tuple(
            m.FsEntry(name=name, attr=fs_attr(attr), next=following)
            for name, attr, following in listing))

    async def _open(self, msg: m.FsOpen) -> m.FsReply:
        info = await self.ops.open(msg.ino, msg.flags, self.caller(msg.cred))
        self.handles.add(info.fh)
        data = self.ops.take_rendered(info.fh)
        return m.FsReply(id=msg.id, fh=info.fh, nonseekable=bool(info.nonseekable),
                         data=data if data is not None and len(data) <= m.FS_DATA else None)

    async def _read(self, msg: m.FsRead) -> m.FsReply:
        return m.FsReply(id=msg.id, data=await self.ops.read(msg.fh, msg.off, msg.size))

    async def _write(self, msg: m.FsWrite) -> m.FsReply:
        await self.ops.write(msg.fh, msg.off, msg.data)
        return m.FsReply(id=msg.id)

    async def _release(self, msg: m.FsRelease) -> m.FsReply:
        self.handles.discard(msg.fh)
        self.ops.drop(msg.fh)
        return m.FsReply(id=msg.id)


ANSWERS: dict[type[m.Msg], Callable[[NodeFs, Any], Awaitable[m.FsReply]]] = {
    m.FsLookup: NodeFs._lookup, m.FsGetattr: NodeFs._getattr, m.FsSetattr: NodeFs._setattr,
    m.FsAccess: NodeFs._access, m.FsOpendir: NodeFs._opendir, m.FsReaddir: NodeFs._readdir,
    m.FsOpen: NodeFs._open, m.FsRead: NodeFs._read, m.FsWrite: NodeFs._write,
    m.FsRelease: NodeFs._release,
}
assert set(ANSWERS) == set(m.FS_REQUESTS)
AT_ONCE = (m.FsLookup, m.FsGetattr, m.FsAccess, m.FsOpendir, m.FsReaddir, m.FsOpen,
           m.FsRelease)

"""/bproc on a node: a FUSE mount whose every operation the master answers.

A node's processes see the control surface at the master's mount point (BPROC_MOUNT,
which the master tells its nodes in `welcome`), as on the master. The node daemon
mounts this filesystem there in its own mount namespace (`serve`) and forwards each
operation to the master over its authenticated connection (`Master.ask`, bpfs/node/
fsclient.py), as an `fs_*` message (bpfs/wire/messages.py) carrying the caller's uid,
gid and, where a rule may need them (opening for writing, chmod/chown), supplementary
groups, read through a pin as the master does for its own callers (bpfs/fs/ops.py
`caller_from_ctx`). The master answers with the handlers of its own mount
(bpfs/fs/forwarded.py), so everything is decided there: this module only translates.

Handles and inodes are the master's numbers, kept as they come. A rendered file's
content comes with its open (bpfs/fs/forwarded.py), and its reads are answered here
until the master would render it again (a second read from offset 0). Attributes are never
cached (the master's attr timeout, 0) and names as long as the master says (10 s for
names that live as long as the master, 0 under procs/). A blocked read (`events`, a
process's output) polls the opener's pending signals on the node, as the master does on
its own (bpfs/fs/procfs.py), and answers EINTR after telling the master to drop it.
Unmounted when `serve` ends (the node daemon stops), lazily, as the master unmounts.

Errors: the master's errno, as is; ENOTCONN while the node has no connection to it;
anything else is logged and EIO (ops.fuse_errors), so no request stops the serving.
What is local: statfs, flush (ENOSYS, as the master), and EACCES for making names.
"""

from __future__ import annotations

import errno
import stat
import os
from typing import Any, Callable, Protocol

import pyfuse3
import trio

from bpfs.errors import BpfsError
from bpfs.fs import mount as fsmount, procfs
from bpfs.fs.ops import ReadOnlyTree, TakePin, caller_from_ctx, fuse_errors
from bpfs.pin import Pin
from bpfs.wire import messages as m


class Master(Protocol):
    """How the node daemon reaches the master (bpfs.node.fsclient.FsClient)."""

    def next_id(self) -> int: ...

    async def ask(self, msg: m.Msg, interrupted: Callable[[], bool] | None = None
                  ) -> m.FsReply:
        """The master's reply; BpfsError ENOTCONN without a connection, EINTR once
        `interrupted()` said so (the master was told to drop the request)."""

    async def tell(self, msg: m.Msg) -> None:
        """Send `msg`, which has no reply (fs_release); dropped without a connection (the
        master released the handle when the connection ended)."""


def entry(a: m.FsAttr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino, e.generation = a.ino, 0
    e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_size = a.mode, a.nlink, a.uid, a.gid, a.size
    e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.time_ns
    e.st_blksize, e.st_blocks = 4096, (a.size + 511) // 512
    e.entry_timeout, e.attr_timeout = a.entry_timeout, a.attr_timeout
    return e


def _cred(ctx: Any, groups: bool = False, take_pin: TakePin = Pin.take) -> m.Cred:
    """The request's caller; its groups (read through a pin: ESRCH if it is gone) only
    where a rule may need them."""
    try:
        caller = caller_from_ctx(ctx, with_groups=groups, take_pin=take_pin)
    except BpfsError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None
    return m.Cred(uid=caller.uid, gid=caller.gid, groups=tuple(sorted(caller.groups)),
                  pid=ctx.pid if 0 < ctx.pid <= 1 << 22 else None)


def _gave_up(pid: int) -> bool:
    """The reader has a signal to take (EINTR), or is gone (killed: nobody waits)."""
    return procfs.interrupting_signal(pid) or not os.path.exists(f"/proc/{pid}")


SELF_INO = 0xFF       # kind 0xFF: no inode of the master's tree (bpfs/fs/inodes.py)


class RemoteOperations(ReadOnlyTree, pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, master: Master, take_pin: TakePin = Pin.take) -> None:
        super().__init__()
        self.master = master
        self._take_pin = take_pin
        self._openers: dict[int, int] = {}          # fh -> the opener's pid (interrupts)
        self._rendered: dict[int, tuple[bytes, bool]] = {}   # fh -> (content, fresh)

    async def _ask(self, cls: type[m.Msg], interrupted: Callable[[], bool] | None = None,
                   **fields: Any) -> m.FsReply:
        try:
            reply = await self.master.ask(cls(id=self.master.next_id(), **fields), interrupted)
        except BpfsError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        if reply.errno:
            raise pyfuse3.FUSEError(reply.errno)
        return reply

    async def _attr(self, cls: type[m.Msg], **fields: Any) -> pyfuse3.EntryAttributes:
        reply = await self._ask(cls, **fields)
        if reply.attr is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return entry(reply.attr)

    def _self(self) -> pyfuse3.EntryAttributes:
        """`self`, the node's own: a symlink to its number (BProc's /bpfs/self, which
        bproc_currnode reads; the master's tree has none: a process there is on -1)."""
        number = getattr(self.master, "number", None)
        if number is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_nlink = SELF_INO, stat.S_IFLNK | 0o777, 1
        a.st_size = len(str(number))
        a.entry_timeout = a.attr_timeout = 0
        return a

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        if not 0 < len(name) <= 255:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG if name else errno.ENOENT)
        if parent_inode == pyfuse3.ROOT_INODE and name == b"self":
            return self._self()
        return await self._attr(m.FsLookup, parent=parent_inode, name=name)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == SELF_INO:
            return self._self()
        return await self._attr(m.FsGetattr, ino=inode)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        if inode != SELF_INO:
            raise pyfuse3.FUSEError(errno.EINVAL)
        self._self()
        return str(self.master.number).encode()

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        return await self._attr(
            m.FsSetattr, ino=inode, cred=_cred(ctx, True, self._take_pin),
            mode=attr.st_mode & 0o7777 if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        reply = await self._ask(m.FsAccess, ino=inode, mode=mode & 7, cred=_cred(ctx))
        return bool(reply.ok)

    async def forget(self, inode_list: Any) -> None:
        pass

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        reply = await self._ask(m.FsOpendir, ino=inode, cred=_cred(ctx))
        return reply.fh or 0

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        while True:
            entries = (await self._ask(m.FsReaddir, fh=fh, start=start_id)).entries or ()
            for e in entries:
                if not pyfuse3.readdir_reply(token, e.name, entry(e.attr), e.next):
                    return
                start_id = e.next
            if len(entries) < m.FS_ENTRIES:
                return

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        await self.release(fh)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        reply = await self._ask(m.FsOpen, ino=inode, flags=flags & 0xFFFFFFFF,
                                cred=_cred(ctx, writing, self._take_pin))
        fh = reply.fh or 0
        self._openers[fh] = ctx.pid
        if reply.data is not None:
            self._rendered[fh] = (reply.data, True)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False,
                                nonseekable=bool(reply.nonseekable))

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """What the master's handle would read (bpfs/fs/ops.py `read`): the content
        rendered at open, from any offset, until a second read from 0, which the master
        answers with a fresh rendering (and every read after it)."""
        rendered = self._rendered.get(fh)
        if rendered is not None:
            data, fresh = rendered
            if off == 0 and fresh:
                self._rendered[fh] = (data, False)
            if off or fresh:
                return data[off:off + size]
            del self._rendered[fh]
        pid = self._openers.get(fh, 0)
        reply = await self._ask(m.FsRead, lambda: _gave_up(pid), fh=fh, off=off,
                                size=min(size, m.FS_DATA))
        return reply.data or b""

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = bytes(buf[:m.FS_DATA])
        await self._ask(m.FsWrite, fh=fh, off=off, data=data)
        return len(data)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:
        """Told, not asked: the kernel does not wait for a release, nor does this."""
        self._openers.pop(fh, None)
        self._rendered.pop(fh, None)
        await self.master.tell(m.FsRelease(id=self.master.next_id(), fh=fh))


async def serve(mountpoint: str, master: Master, *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Mount at `mountpoint` (BpfsError if it cannot be), report started, answer until
    cancelled, then unmount."""
    fsmount.mount(RemoteOperations(master), mountpoint)
    try:
        task_status.started()
        await fsmount.serve()
    finally:
        fsmount.unmount()


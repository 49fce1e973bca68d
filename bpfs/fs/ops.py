"""pyfuse3 Operations for /bproc: thin handlers over the model and the tree tables.

Permissions: mounted *without* default_permissions, because a node directory's
mode is an ACL for running processes, not for reading: every node's status and
info are readable by all even when its directory is 0100. So the kernel checks
nothing and these handlers do: read-only files refuse opening for writing
(EACCES), setattr on a node directory is chmod/chown/chgrp by the model's
rules, ctl commands check permission per command.

Errors: `fuse_errors` is the one place a BpfsError becomes FUSEError(errno);
any other exception is logged with its traceback and becomes EIO, so no bad
input or bug in a handler takes the daemon down.

Callers: uid/gid come from the request; supplementary groups from /proc, read
by the caller's thread id and bracketed by a pidfd (bpfs/pin.py), so they are
the caller's own even if it was killed and its number reused meanwhile. pyfuse3
gives `write` no request context, so a ctl handle's caller is the one who
opened it (Unix credentials-at-open semantics). A request a node daemon forwarded
for a caller on its node (bpfs/fs/forwarded.py) comes with a `Forwarded` context
instead, which carries its Caller whole (`Caller.node` set, never pinned): the same
handlers, the same rules, with the ids the node claims and no more.

Pinned handles: execmove and exec act on the process behind a nodes/N/ctl
handle (they seize it, or read its environment), long after the open. A
number is no proof of who that is (the opener may have exited and its PID gone
to a root process), so a nodes/N/ctl handle opened for writing pins its opener
(`Caller.pin`: a pidfd, the start time and credentials), checked again at every
use: ESRCH once the opener has ended, EPERM once it is not the user it was (it
ran a set-user-ID program). The pin is closed at release. Each pin costs the
master a file descriptor, so a user (not root) may hold at most
MAX_PINS_PER_UID of them at once, and no more than an eighth of the master's
RLIMIT_NOFILE (read at start): EMFILE beyond.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import resource
import select
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Sequence, TypeVar

import pyfuse3
import trio

from bpfs import ctl, formats
from bpfs.errors import BpfsError
from bpfs.fs import masterprocs, procfs
from bpfs.fs.inodes import Ino, Kind, NODE_KINDS, PROC_KINDS
from bpfs.fs.masterprocs import MASTER_GEN
from bpfs.fs.tree import (FILES, MASTER_PROC_KINDS, NODE_FILES, PROC_FILES, ROOT_DIRS,
                          ROOT_FILES, FileSpec, parse_number, proc_files, spec_named)
from bpfs.model import Caller
from bpfs.output import OutputRing
from bpfs.pin import Pin
from bpfs.ratelog import RateLog

log = logging.getLogger("bpfs.fs")

SIGNAL_POLL = 0.2          # seconds between checks for a signal to a blocked events reader
ATTR_TIMEOUT = 0.0         # attributes are dynamic (sizes, ACLs): never cached by the kernel
ENTRY_TIMEOUT = 10.0       # names that never go away while the master runs (everything but
                           # procs/PID) stay in the kernel's dentry cache: a path walk costs
                           # no LOOKUP round trip (`cat nodes/*/status` halves its requests)
MAX_PINS_PER_UID = 1024    # pinned nodes/N/ctl handles a user may hold open at once, and
                           # never more than an eighth of the master's descriptors

T = TypeVar("T")
USAGE_KINDS = frozenset({Kind.PROC_STAT, Kind.PROC_STATUS})


def fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map BpfsError to FUSEError(errno); log anything else and answer EIO."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except BpfsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


TakePin = Callable[[int, int, int], Any]      # Pin.take(tid, uid, gid), or a test's fake
ReaddirReply = Callable[[Any, bytes, Any, int], bool]   # pyfuse3.readdir_reply, or a test's fake


@dataclass(frozen=True)
class Forwarded:
    """The context of a request forwarded from a node: its caller, as the node claims it."""
    caller: Caller

    @property
    def uid(self) -> int:
        return self.caller.uid


def caller_from_ctx(ctx: Any, *, with_groups: bool = True, keep_pin: bool = False,
                    take_pin: TakePin = Pin.take) -> Caller:
    """The request's caller; with its supplementary groups, read through a pin (ESRCH if
    it is gone, EPERM if its credentials are no longer the request's); `keep_pin`: the pin
    stays in the Caller (whoever keeps the Caller closes it). A forwarded request's caller
    is on its node: it has its groups already and no pin."""
    if isinstance(ctx, Forwarded):
        return ctx.caller
    if not with_groups and not keep_pin:
        return Caller(ctx.uid, ctx.gid, frozenset(), ctx.pid)
    pin = take_pin(ctx.pid, ctx.uid, ctx.gid)
    if not keep_pin:
        pin.close()
    return Caller(ctx.uid, ctx.gid, pin.groups, ctx.pid, pin if keep_pin else None)


def pin_limit() -> int:
    """How many pinned handles one user may hold (see the module doc)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_PINS_PER_UID
    return max(1, min(MAX_PINS_PER_UID, soft // 8))


@dataclass
class Handle:
    ino: Ino
    caller: Caller
    spec: FileSpec | None = None           # None for directories
    data: bytes = b""                       # rendered content, or a ctl's last result
    cursor: int = 0                         # events: next sequence number wanted
    pending: bytes = b""                    # events: rendered, not yet read
    nonblock: bool = False
    entries: list[tuple[str, Ino]] = field(default_factory=list)   # directories
    poll_handle: Any = None
    output: OutputRing | None = None        # procs/P/stdout, stderr: cursor is its offset
    fresh: bool = False                     # data rendered by open, not read yet


class RefusalLog(RateLog):
    """One log line per refused ctl write, so an administrator can see why a user's bpsh
    failed (FUSE carries only the errno back), at most BURST lines per uid per WINDOW
    seconds (bpfs/ratelog.py): a user can write refusals as fast as they like."""
    WINDOW = 10.0

    def __init__(self) -> None:
        super().__init__(log, logging.INFO, "refused ctl writes")

    def refused(self, h: "Handle", exc: BpfsError) -> None:
        name = h.spec.name if h.spec is not None else "?"
        where = "nodes" if h.ino.kind in NODE_KINDS else "procs"
        on = "" if h.caller.node is None else f" on node {h.caller.node}"
        self.log(f"uid {h.caller.uid}", time.monotonic(),
                 "%s/%d/%s: write by uid %d (pid %d%s) refused: %s: %s", where, h.ino.id, name,
                 h.caller.uid, h.caller.pid, on, errno.errorcode.get(exc.errno, str(exc.errno)),
                 exc.message)


class ReadOnlyTree:
    """What /bproc answers the same on the master and on a node (bpfs/fs/remote.py): its
    names are made by the master, never by users, and it has no blocks to count."""

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def _read_only_tree(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EACCES)

    create = mknod = mkdir = symlink = link = unlink = rmdir = rename = _read_only_tree


class BpfsOperations(ReadOnlyTree, pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, services: ctl.Services, take_pin: TakePin = Pin.take,
                 readdir_reply: ReaddirReply = pyfuse3.readdir_reply) -> None:
        super().__init__()
        self._take_pin = take_pin
        self._readdir_reply = readdir_reply
        self.services = services
        self.cluster = services.cluster
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._pins: dict[int, int] = {}            # uid -> pinned handles it holds
        self._max_pins = pin_limit()
        self._changed = trio.Event()
        self._time_ns = time.time_ns()
        self._refusals = RefusalLog()
        self.cluster.subscribe(self._wake)          # events and process output

    # ---- events wakeup ------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        for h in self._handles.values():
            if h.poll_handle is not None:
                ph, h.poll_handle = h.poll_handle, None
                ph.notify()

    # ---- resolving names and inodes -------------------------------------------------

    def _check(self, ino: Ino) -> Ino:
        """`ino` if what it names still exists, else ENOENT."""
        if ino.kind in NODE_KINDS and not self.cluster.has_node(ino.id):
            raise BpfsError(errno.ENOENT, f"no node {ino.id}")
        if ino.kind in PROC_KINDS:
            p = self.cluster.procs.get(ino.id)
            if (p is None or p.gen != ino.gen) and not (
                    ino.gen == MASTER_GEN and p is None and ino.kind in MASTER_PROC_KINDS
                    and masterprocs.owner(ino.id) is not None):
                raise BpfsError(errno.ENOENT, f"no process {ino.id}")
        return ino

    def _decode(self, inode: int) -> Ino:
        try:
            return self._check(Ino.decode(inode))
        except ValueError:
            raise BpfsError(errno.ENOENT, f"no inode {inode}") from None

    def _child(self, parent: Ino, name: str) -> Ino:
        if parent.kind == Kind.ROOT:
            for spec in ROOT_FILES:
                if spec.name == name:
                    return Ino(spec.kind)
            for dname, kind in ROOT_DIRS:
                if dname == name:
                    return Ino(kind)
        elif parent.kind == Kind.NODES:
            n = parse_number(name)
            if n is not None and self.cluster.has_node(n):
                return Ino(Kind.NODE_DIR, n)
        elif parent.kind == Kind.PROCS:
            pid = parse_number(name)
            p = self.cluster.procs.get(pid) if pid is not None else None
            if p is not None:
                return Ino(Kind.PROC_DIR, p.pid, p.gen)
            if pid is not None and masterprocs.owner(pid) is not None:
                return Ino(Kind.PROC_DIR, pid, MASTER_GEN)
        elif parent.kind in (Kind.NODE_DIR, Kind.PROC_DIR):
            spec = spec_named(self._files(parent), name)
            if spec is not None:
                return Ino(spec.kind, parent.id, parent.gen)
        else:
            raise BpfsError(errno.ENOTDIR, "not a directory")
        raise BpfsError(errno.ENOENT, f"no {name!r} here")

    def _entries(self, d: Ino) -> list[tuple[str, Ino]]:
        if d.kind == Kind.ROOT:
            return [(s.name, Ino(s.kind)) for s in ROOT_FILES] + \
                   [(name, Ino(kind)) for name, kind in ROOT_DIRS]
        if d.kind == Kind.NODES:
            return [(str(n.number), Ino(Kind.NODE_DIR, n.number)) for n in self.cluster.nodes()]
        if d.kind == Kind.PROCS:
            return [(str(p.pid), Ino(Kind.PROC_DIR, p.pid, p.gen))
                    for p in sorted(self.cluster.procs.values(), key=lambda p: p.pid)]
        return [(s.name, Ino(s.kind, d.id, d.gen)) for s in self._files(d)]

    def _files(self, d: Ino) -> Sequence[FileSpec]:
        if d.kind == Kind.NODE_DIR:
            return NODE_FILES
        if d.gen == MASTER_GEN:         # a master process: its ctl only (masterprocs.py)
            return tuple(s for s in PROC_FILES if s.kind in MASTER_PROC_KINDS)
        return proc_files(self.cluster, d.id)

    def _owner(self, ino: Ino) -> tuple[int, int]:
        if ino.gen == MASTER_GEN:
            return masterprocs.owner(ino.id) or (0, 0)
        p = self.cluster.proc(ino.id)
        return p.uid, p.gid

    def _attr(self, ino: Ino) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino.encode()
        a.generation = 0
        a.attr_timeout = ATTR_TIMEOUT
        a.entry_timeout = 0.0 if ino.kind in PROC_KINDS else ENTRY_TIMEOUT
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._time_ns
        a.st_blksize = 4096
        if ino.is_dir:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o555, 2, 0
            if ino.kind == Kind.NODE_DIR:
                node = self.cluster.node(ino.id)
                a.st_mode, a.st_uid, a.st_gid = stat.S_IFDIR | node.mode, node.uid, node.gid
            elif ino.kind == Kind.PROC_DIR:
                a.st_uid, a.st_gid = self._owner(ino)
            return a
        spec = FILES[ino.kind]
        a.st_mode, a.st_nlink = stat.S_IFREG | spec.mode, 1
        # procs/P/stat and status change between a stat() and a read (the node's reports):
        # size 0, as /proc's files (readers read to the end, direct_io)
        a.st_size = len(spec.read(self.cluster, ino.id).encode()) \
            if spec.read and ino.kind not in USAGE_KINDS else 0
        if ino.kind in PROC_KINDS:
            a.st_uid, a.st_gid = self._owner(ino)
        a.st_blocks = (a.st_size + 511) // 512
        return a

    # ---- metadata ----------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(self._child(self._decode(parent_inode), os.fsdecode(name)))

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(self._decode(inode))

    async def forget(self, inode_list: Any) -> None:
        pass    # nothing is kept per inode

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        """chmod/chown/chgrp of node directories; truncating a ctl file is a no-op.

        Time updates are ignored everywhere (touch succeeds and changes nothing).
        """
        ino = self._decode(inode)
        changes_owner = fields.update_mode or fields.update_uid or fields.update_gid
        if ino.kind == Kind.NODE_DIR and changes_owner:
            await self._chattr(ino.id, attr, fields,
                               caller_from_ctx(ctx, take_pin=self._take_pin))
        elif changes_owner:
            raise BpfsError(errno.EPERM, "only node directories change mode or owner")
        elif fields.update_size and (ino.is_dir or FILES[ino.kind].write is None):
            raise BpfsError(errno.EISDIR if ino.is_dir else errno.EACCES, "read-only file")
        return self._attr(ino)

    async def _chattr(self, n: int, attr: Any, fields: Any, caller: Caller) -> None:
        if fields.update_uid or fields.update_gid:
            self.cluster.chown(n, attr.st_uid if fields.update_uid else None,
                               attr.st_gid if fields.update_gid else None, caller)
        if fields.update_mode:
            self.cluster.chmod(n, attr.st_mode & 0o7777, caller)
        await self.services.persist()

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        """Everything may be read and traversed by all; only ctl files are writable."""
        ino = self._decode(inode)
        if mode & os.W_OK:
            return not ino.is_dir and FILES[ino.kind].write is not None
        return True

    # ---- directories ---------------------------------------------------------------------

    def _new_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = h
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise BpfsError(errno.EBADF, f"no open handle {fh}") from None

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        ino = self._decode(inode)
        if not ino.is_dir:
            raise BpfsError(errno.ENOTDIR, "not a directory")
        return self._new_handle(Handle(ino, caller_from_ctx(ctx, with_groups=False),
                                       entries=self._entries(ino)))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for name, attr, following in self.listing(fh, start_id):
            if not self._readdir_reply(token, name, attr, following):
                break

    def listing(self, fh: int, start: int) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """A directory handle's entries from `start` on: (name, attributes, the start of
        the next), skipping those that vanished since opendir."""
        entries = self._handle(fh).entries
        for i in range(start, len(entries)):
            name, ino = entries[i]
            try:
                attr = self._attr(self._check(ino))
            except BpfsError:
                continue
            yield os.fsencode(name), attr, i + 1

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # ---- files ------------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        ino = self._decode(inode)
        if ino.is_dir:
            raise BpfsError(errno.EISDIR, "is a directory")
        spec = FILES[ino.kind]
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if writing and spec.write is None:
            raise BpfsError(errno.EACCES, f"{spec.name} is read-only")
        caller = self._pinned(ctx) if writing and ino.kind == Kind.NODE_CTL else \
            caller_from_ctx(ctx, with_groups=False)
        h = Handle(ino, caller, spec, nonblock=bool(flags & os.O_NONBLOCK))
        if ino.kind in USAGE_KINDS:
            await self._fresh_usage(ino.id)
            self._check(ino)                # it may have ended meanwhile
        try:
            return self._open(h)
        except BaseException:
            self._unpin(h)
            raise

    async def _fresh_usage(self, pid: int) -> None:
        """procs/P/stat and status show the node's figures at most a moment old: the
        master may ask the node first (bpfs/master/usage.py; a short, bounded wait)."""
        fresh = getattr(self.services, "fresh_usage", None)
        if fresh is not None:
            await fresh(pid)

    def _open(self, h: Handle) -> pyfuse3.FileInfo:
        ino, spec = h.ino, h.spec
        assert spec is not None
        if spec.read is not None:
            h.data, h.fresh = spec.read(self.cluster, ino.id).encode(), True
        if spec.output is not None:
            h.output = self._output(ino, spec.output, h.caller)
            h.cursor = h.output.first
        elif spec.stream:
            h.cursor = self.cluster.events.cursor()
        fh = self._new_handle(h)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=spec.stream)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        assert h.spec is not None
        if h.output is not None:
            return await self._read_output(h, h.output, size)
        if h.spec.stream:
            return await self._read_events(h, size)
        if h.spec.read is not None and off == 0:
            self._check(h.ino)
            if not h.fresh:                 # read again from 0: render again
                h.data = h.spec.read(self.cluster, h.ino.id).encode()
            h.fresh = False
        return h.data[off:off + size]

    def take_rendered(self, fh: int) -> bytes | None:
        """A rendered file's content as its handle's first read from 0 would give it, that
        read then done (the next from 0 renders again); None for a stream or ctl file. A
        node gets it with its open, and answers that read itself (bpfs/fs/remote.py)."""
        h = self._handle(fh)
        if h.spec is None or h.spec.read is None:
            return None
        h.fresh = False
        return h.data

    async def _read_events(self, h: Handle, size: int) -> bytes:
        """Block until an event after the handle's cursor exists; EINTR if the reader is signalled."""
        while not h.pending:
            events, h.cursor = self.cluster.events.since(h.cursor)
            if events:
                h.pending = "".join(formats.render_event(e) for e in events).encode()
                break
            await self._wait_for_more(h, "no new events")
        out, h.pending = h.pending[:size], h.pending[size:]
        return out

    def _output(self, ino: Ino, name: str, caller: Caller) -> OutputRing:
        """The output ring behind procs/P/stdout or stderr: its uid and root only (EACCES)."""
        p = self.cluster.proc(ino.id, ino.gen)
        if p.output is None:
            raise BpfsError(errno.ENOENT, f"process {ino.id} keeps no output")
        if not (caller.is_root or caller.uid == p.uid):
            raise BpfsError(errno.EACCES, f"the output of process {ino.id} is its owner's")
        return p.output.streams[name]

    async def _read_output(self, h: Handle, ring: OutputRing, size: int) -> bytes:
        """Like a pipe: block until output or EOF (process ended, all received); EINTR if
        the reader is signalled. Handles opened before procs/P went keep reading."""
        while True:
            data, h.cursor = ring.read(h.cursor, size)
            if data:
                return data
            if ring.at_eof(h.cursor):
                ring.eof_read = True
                return b""
            await self._wait_for_more(h, "no output yet")

    async def _wait_for_more(self, h: Handle, nothing: str) -> None:
        """A blocking read's wait: EAGAIN (`nothing`) for a non-blocking handle; else until
        the cluster changes or SIGNAL_POLL passes, then EINTR if the reader is signalled."""
        if h.nonblock:
            raise BpfsError(errno.EAGAIN, nothing)
        with trio.move_on_after(SIGNAL_POLL):
            await self._changed.wait()
        if h.caller.node is None and procfs.interrupting_signal(h.caller.pid):
            raise BpfsError(errno.EINTR, "interrupted")

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Run the ctl commands in `buf`; the errno of the first failure is the write's."""
        h = self._handle(fh)
        if h.spec is None or h.spec.write is None:
            raise BpfsError(errno.EBADF, "not writable")
        self._check(h.ino)
        context = ctl.CtlContext(self.services, h.caller, h.ino.id,
                                 h.ino.gen if h.ino.kind in PROC_KINDS else None)
        try:
            result = await ctl.execute(h.spec.write, context, bytes(buf))
        except BpfsError as exc:
            h.data = f"{exc.message}\n".encode()
            self._refusals.refused(h, exc)
            raise
        h.data = f"{result}\n".encode()
        return len(buf)

    async def flush(self, fh: int) -> None:
        """Nothing to flush: ENOSYS once tells the kernel never to send FLUSH again, which
        saves a round trip on every close."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self.drop(fh)

    def drop(self, fh: int) -> None:
        """Forget handle `fh` (release, or its node's connection ended), closing its pin."""
        h = self._handles.pop(fh, None)
        if h is not None:
            self._unpin(h)

    def _pinned(self, ctx: Any) -> Caller:
        """The opener of a nodes/N/ctl handle for writing, pinned (see the module doc); a
        forwarded caller has no pin to count."""
        held = self._pins.get(ctx.uid, 0)
        if ctx.uid != 0 and held >= self._max_pins:
            raise BpfsError(errno.EMFILE, f"uid {ctx.uid} holds {held} open ctl handles "
                            "already")
        caller = caller_from_ctx(ctx, keep_pin=True, take_pin=self._take_pin)
        if caller.pin is not None:
            self._pins[ctx.uid] = held + 1
        return caller

    def _unpin(self, h: Handle) -> None:
        pin = h.caller.pin
        if pin is None:
            return
        pin.close()
        h.caller = dataclasses.replace(h.caller, pin=None)
        uid = h.caller.uid
        left = self._pins.get(uid, 1) - 1
        if left > 0:
            self._pins[uid] = left
        else:
            self._pins.pop(uid, None)

    @fuse_errors
    async def poll(self, inode: int, fh: int, poll_handle: Any, ctx: Any) -> int:
        """events and process output are readable when they have news (or EOF); every
        other file always is."""
        h = self._handle(fh)
        if h.spec is None or not h.spec.stream:
            return select.POLLIN | select.POLLOUT
        if h.output is not None:
            ready = bool(h.output.read(h.cursor, 1)[0]) or h.output.at_eof(h.cursor)
        else:
            ready = bool(h.pending) or self.cluster.events.cursor() > h.cursor
        if ready:
            return select.POLLIN
        if poll_handle is not None:
            h.poll_handle = poll_handle         # _wake notifies it
        return 0

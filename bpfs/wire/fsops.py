"""/bproc's operations, forwarded from a node (bpfs/fs/remote.py asks, bpfs/fs/forwarded.py
answers). Their grammar is in bpfs/wire/messages.py's docstring."""

from __future__ import annotations

from typing import Annotated, Optional

from msgspec import Meta, Struct

from bpfs.wire.grammar import *  # noqa: F401,F403  (the bounded types)
from bpfs.wire.grammar import Msg, _bytes, _int, _num, _str  # noqa: F401

# ---- the cluster seen from a node: /bproc's operations, forwarded -----------------------

class Cred(Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    uid: ID32
    gid: ID32
    groups: Annotated[tuple[ID32, ...], Meta(max_length=NGROUPS)]
    pid: Optional[PID] = None


class FsAttr(Struct, frozen=True, forbid_unknown_fields=False):
    ino: INODE
    mode: U32
    nlink: U32
    uid: ID32
    gid: ID32
    size: BYTES
    time_ns: ID
    entry_timeout: TIMEOUT
    attr_timeout: TIMEOUT


class FsEntry(Struct, frozen=True, forbid_unknown_fields=False):
    name: NAME
    attr: FsAttr
    next: ID


class FsLookup(Msg, tag="fs_lookup"):
    sender = "node"
    id: ID
    parent: INODE
    name: NAME


class FsGetattr(Msg, tag="fs_getattr"):
    sender = "node"
    id: ID
    ino: INODE


class FsSetattr(Msg, tag="fs_setattr", kw_only=True):
    sender = "node"
    id: ID
    ino: INODE
    cred: Cred
    mode: Optional[_int(0, 0o7777)] = None
    uid: Optional[ID32] = None
    gid: Optional[ID32] = None
    size: Optional[BYTES] = None


class FsAccess(Msg, tag="fs_access"):
    sender = "node"
    id: ID
    ino: INODE
    mode: _int(0, 7)
    cred: Cred


class FsOpendir(Msg, tag="fs_opendir"):
    sender = "node"
    id: ID
    ino: INODE
    cred: Cred


class FsReaddir(Msg, tag="fs_readdir"):
    sender = "node"
    id: ID
    fh: ID
    start: ID


class FsOpen(Msg, tag="fs_open"):
    sender = "node"
    id: ID
    ino: INODE
    flags: U32
    cred: Cred


class FsRead(Msg, tag="fs_read"):
    sender = "node"
    id: ID
    fh: ID
    off: ID
    size: _int(0, FS_DATA)


class FsWrite(Msg, tag="fs_write"):
    sender = "node"
    id: ID
    fh: ID
    off: ID
    data: _bytes(0, FS_DATA)


class FsRelease(Msg, tag="fs_release"):
    sender = "node"
    id: ID
    fh: ID


class FsCancel(Msg, tag="fs_cancel"):
    sender = "node"
    id: ID


class FsReply(Msg, tag="fs_reply", kw_only=True):
    sender = "master"
    id: ID
    errno: Optional[ERRNO] = None
    attr: Optional[FsAttr] = None
    fh: Optional[ID] = None
    data: Optional[_bytes(0, FS_DATA)] = None
    entries: Optional[Annotated[tuple[FsEntry, ...], Meta(max_length=FS_ENTRIES)]] = None
    ok: Optional[bool] = None
    nonseekable: Optional[bool] = None


FS_REQUESTS: tuple[type[Msg], ...] = (FsLookup, FsGetattr, FsSetattr, FsAccess, FsOpendir,
                                      FsReaddir, FsOpen, FsRead, FsWrite, FsRelease)

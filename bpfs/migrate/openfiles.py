"""A running process's open files: which can move (read at the dump), and how the node opens
them again (a part of the restore's syscall batch).

What moves is what a path names again on the node: a regular file (by path, flags and offset),
a directory not being read (offset 0), and the devices in SAFE_DEVICES. Everything else, a
pipe, a socket, an eventfd, an epoll, a terminal, a deleted file, is refused EBUSY with the fd
and what it is: those need their other end, or their content, which a path does not give.
The caller names the fds it carries itself (`links`: the stdio sockets to a stdio server).

A file of /bproc (a bpfs mount, on the master or a node) is not reopened: a node daemon
restoring the process would have to serve that open itself, and waits for the restore
instead (it stops answering the master, which marks the node down). The one handle left
out rather than refused is the process's own procs/PID/ctl: libbproc's bproc_move writes
`move N` through it, so it is open while the process moves; the moved copy finds that fd
closed (the library closes it, EBADF or not). Any other is refused EBUSY, naming it.

On the node each file is opened by the process itself, after its credentials were set: so as
its user, who must be allowed to open it (EACCES, ENOENT otherwise, naming the path, and the
restore kills the process before it ever ran).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import AbstractSet

from bpfs.migrate import stub
from bpfs.migrate.errors import MigrateError, from_oserror
from bpfs.migrate.image import OPEN_FLAGS, OpenFile

SAFE_DEVICES = frozenset(("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"))
NEVER = os.O_CREAT | os.O_TRUNC | os.O_EXCL    # a reopen creates or empties nothing
AT_FDCWD = -100
BPFS_FSTYPE = "fuse.bpfs"                      # /bproc's mounts (bpfs/fs/mount.py)
_KINDS = {"pipe": "a pipe", "socket": "a socket", "anon_inode": "an anonymous inode"}


# ---- the dump side ----

def collect(pid: int, links: AbstractSet[int] = frozenset()) -> list[OpenFile]:
    """Every fd of the stopped `pid` but `links`, as OpenFiles (fds ascending); EBUSY for the
    first one that cannot move, naming it."""
    try:
        fds = sorted(n for n in map(int, os.listdir(f"/proc/{pid}/fd")) if n not in links)
        bproc = _bpfs_mounts(pid) if fds else frozenset()   # none: its mounts unread
    except OSError as exc:
        raise from_oserror(exc, f"listing the fds of {pid}", pid) from exc
    files = (_open_file(pid, fd, bproc) for fd in fds)
    return [f for f in files if f is not None]


def _open_file(pid: int, fd: int, bproc: AbstractSet[int]) -> OpenFile | None:
    """The fd as an OpenFile; None for the process's own procs/PID/ctl (see the top)."""
    link = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(link)
        info = _fdinfo(pid, fd)
        if info["mnt_id"] in bproc:         # asked before any stat: no round trip to it
            if target.endswith(f"/procs/{pid}/ctl"):
                return None
            raise MigrateError(errno.EBUSY, f"fd {fd} is a file of /bproc ({target}): it "
                               "cannot move", pid)
        st = os.stat(link)
    except OSError as exc:
        raise from_oserror(exc, f"reading fd {fd} of {pid}", pid) from exc
    what = _refusal(target, st, info["pos"])
    if what:
        raise MigrateError(errno.EBUSY, f"fd {fd} is {what} ({target}): it cannot move", pid)
    return OpenFile(fd, target, info["flags"] & OPEN_FLAGS & ~NEVER, info["pos"])


def _refusal(target: str, st: os.stat_result, pos: int) -> str | None:
    """What makes an fd unable to move, in words; None if it can."""
    if not target.startswith("/"):
        return _KINDS.get(target.split(":", 1)[0], "not a file")
    if target.endswith(" (deleted)"):
        return "a deleted file"
    if stat.S_ISREG(st.st_mode):
        return None if _same_file(target, st) else "a file its path no longer names"
    if stat.S_ISDIR(st.st_mode):
        return None if pos == 0 else "a directory being read"
    if stat.S_ISCHR(st.st_mode) and target in SAFE_DEVICES:
        return None
    return "a named pipe" if stat.S_ISFIFO(st.st_mode) else "a device"


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _fdinfo(pid: int, fd: int) -> dict[str, int]:
    """pos (decimal), flags (octal; O_CLOEXEC set for a close-on-exec fd) and mnt_id of an
    fd."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {"pos": int(fields["pos"]), "flags": int(fields["flags"], 8),
            "mnt_id": int(fields.get("mnt_id", -1))}


def _bpfs_mounts(pid: int) -> frozenset[int]:
    """The mount ids of /bproc's mounts that `pid` sees (/proc/PID/mountinfo: the fields
    after " - " are the type, the source, the options)."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return frozenset(int(line.split()[0]) for line in f
                         if line.partition(" - ")[2].split()[:1] == [BPFS_FSTYPE])


# ---- the restore side ----

def reopen(batch: stub.Batch, files: list[OpenFile], taken: AbstractSet[int]) -> None:
    """Add to `batch` the calls that open `files` at their fd numbers, flags and offsets, in a
    process whose open fds are exactly `taken` (a carried fd in `taken` replaces that one).

    openat gives the lowest free fd, known here since the table is: where that is not the
    wanted number, dup3 moves it there (keeping close-on-exec) and the first is closed.
    """
    used = set(taken)
    for f in files:
        low = next(n for n in range(len(used) + 1) if n not in used)
        flags = f.flags & OPEN_FLAGS & ~NEVER
        batch.call("openat", AT_FDCWD, batch.cstr(f.path), flags, 0,
                   what=f"opening {f.path} as fd {f.fd}")
        if low != f.fd:
            batch.call("dup3", low, f.fd, flags & os.O_CLOEXEC)
            batch.call("close", low)
        used.add(f.fd)
        if f.offset:
            batch.call("lseek", f.fd, f.offset, os.SEEK_SET, what=f"seeking in {f.path}")

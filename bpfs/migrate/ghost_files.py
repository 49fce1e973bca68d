"""Files into a ghost that comes back to life (`Tracer.restore_in`): the image's mapped
files, checked on the master, and the fds the caller wants installed.

The tracer opens every file itself, by the path the image names, and hashes what it opened
(`dump.hashes`: (dev, ino, size, mtime, ctime) -> sha256, so a library is hashed once): the
content must be the image's, else ESTALE. Those very descriptors then go into the ghost,
never a path it would open again (no window between the check and the open):

```
    socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv)      in the ghost (injected)
    pidfd_getfd(ghost, sv[0])                                   the tracer takes one end
    sendmsg(SCM_RIGHTS: our fds), 250 at most per message       the tracer
    recvmsg(sv[1], MSG_CMSG_CLOEXEC | MSG_DONTWAIT)             in the ghost: the fds land
                                                                at the lowest free numbers,
                                                                read back from its cmsg
    close(sv[0]); close(sv[1])
```

Why so, and not the ghost opening each file by path: (1) an execute-only program (mode
0711) is mapped by the kernel at exec although its user may not open it; the tracer can, as
the node's restorer does; (2) the fd that is hashed is the fd that is mapped; (3) the same
channel carries the caller's `fds` (new stdio links). Not pidfd_getfd *from the ghost*: a
user's ghost may not take the root tracer's fds. The tracer may take the ghost's (it is its
tracer, and ptrace-allowed: the same check). The ghost's user must still be allowed the
files by path (`ghost_restore` asks the ghost, access(2)), so a user never gets to map
through the tracer's fd a file that user could not read on the master.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate import stub
from bpfs.migrate.dump import hashes
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.image import FileRef, Image
from bpfs.migrate.rebuild import refuse_setid

CHUNK = 250                       # SCM_MAX_FD is 253
O_CLOEXEC, F_SETFD, FD_CLOEXEC = 0o2000000, 2, 1
AF_UNIX, SOCK_DGRAM, SOCK_CLOEXEC = 1, 2, 0o2000000
MSG_DONTWAIT, MSG_CTRUNC, MSG_CMSG_CLOEXEC = 0x40, 0x8, 0x40000000
SOL_SOCKET, SCM_RIGHTS = 1, 1
# the channel's buffer in the ghost: sv[2] | msghdr (56) | iovec (16) | 1 byte | cmsg
MSGHDR, IOVEC, BYTE, CMSG = 16, 80, 96, 112
CHANNEL_SIZE = CMSG + 16 + 4 * CHUNK


def open_files(image: Image) -> list[int]:
    """Our fd of each file of the image, holding the very content dumped. ESTALE if the
    master lacks it at that path (missing, not a regular file, other content); EPERM for
    a set-ID or file-capability executable."""
    fds: list[int] = []
    try:
        for ref in image.files:
            fds.append(_open_same(ref))
        refuse_setid(fds[image.exe], image.exe_path)
    except BaseException:
        close_all(fds)
        raise
    return fds


def _open_same(ref: FileRef) -> int:
    try:
        fd = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MigrateError(errno.ESTALE, f"{ref.path}: the master has no such file "
                           f"({exc.strerror})") from exc
    try:
        digest, _ = hashes.hash_fd(fd)
    except MigrateError:
        digest = ""
    if digest != ref.hash:
        os.close(fd)
        raise MigrateError(errno.ESTALE, f"{ref.path} on the master is not the file the "
                           f"image maps ({ref.hash[:19]}...): changed since")
    return fd


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def check_installs(fds: Any) -> dict[int, int]:
    """`fds` (None or a mapping: fd number in the ghost -> an open fd of ours) as a dict.
    EINVAL for anything else; EBADF for a value that is not open here."""
    if fds is None:
        return {}
    try:
        items = dict(fds)
    except (TypeError, ValueError):
        items = {None: None}
    if any(not isinstance(n, int) or not isinstance(ours, int) or n < 0 or ours < 0
           for n, ours in items.items()):
        raise MigrateError(errno.EINVAL, "fds must map fd numbers to our open fds")
    for ours in items.values():
        try:
            os.fstat(ours)
        except OSError as exc:
            raise MigrateError(errno.EBADF, f"fd {ours} to install is not open") from exc
    return items


def send_into(pid: int, regs: pt.Regs, gadget: int, signals: list[int], buf: int,
              fds: list[int]) -> list[int]:
    """Copies of our `fds` installed in the halted ghost `pid` (close-on-exec), in order:
    their numbers there. `buf`: CHANNEL_SIZE bytes of the ghost's, writable. On failure,
    what was installed is closed again (EMFILE: the ghost's RLIMIT_NOFILE)."""
    if not fds:
        return []
    _check(pid, "socketpair", gp.inject(pid, regs, gadget, signals, pt.SYS["socketpair"],
                                         AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, buf))
    ends = list(struct.unpack("<ii", pt.read_memory(pid, [(buf, 8)])))
    got: list[int] = []
    try:
        pidfd = os.pidfd_open(pid)
        try:
            mine = pt.syscall(pt.SYS["pidfd_getfd"], pidfd, ends[0], 0)
        finally:
            os.close(pidfd)
        with socket.socket(fileno=mine) as sock:
            for at in range(0, len(fds), CHUNK):
                chunk = fds[at:at + CHUNK]
                socket.send_fds(sock, [b"\0"], chunk)
                got += _receive(pid, regs, gadget, signals, ends[1], buf, len(chunk))
    except BaseException:
        close_in(pid, regs, gadget, signals, got)
        raise
    finally:
        close_in(pid, regs, gadget, signals, ends)
    return got


def _receive(pid: int, regs: pt.Regs, gadget: int, signals: list[int], sock: int, buf: int,
             count: int) -> list[int]:
    space = 16 + 4 * count + (-4 * count) % 8
    hdr = struct.pack("<QI4xQQQQi4x", 0, 0, buf + IOVEC, 1, buf + CMSG, space, 0)
    pt.write_memory(pid, [(buf + MSGHDR, hdr), (buf + IOVEC, struct.pack("<QQ", buf + BYTE, 1)),
                          (buf + CMSG, bytes(space))])
    _check(pid, "recvmsg", gp.inject(pid, regs, gadget, signals, pt.SYS["recvmsg"], sock,
                                      buf + MSGHDR, MSG_DONTWAIT | MSG_CMSG_CLOEXEC))
    raw = pt.read_memory(pid, [(buf + MSGHDR, CMSG - MSGHDR + space)])
    flags = struct.unpack_from("<i", raw, 48)[0]
    length, level, kind = struct.unpack_from("<Qii", raw, CMSG - MSGHDR)
    got = []
    if level == SOL_SOCKET and kind == SCM_RIGHTS and length >= 16:
        got = list(struct.unpack_from(f"<{(length - 16) // 4}i", raw, CMSG - MSGHDR + 16))
    if flags & MSG_CTRUNC or len(got) != count:
        close_in(pid, regs, gadget, signals, got)
        raise MigrateError(errno.EMFILE, f"ghost {pid} could take {len(got)} of {count} "
                           "files (its RLIMIT_NOFILE?)", pid)
    return got


def close_in(pid: int, regs: pt.Regs, gadget: int, signals: list[int], fds: list[int]
             ) -> None:
    """close() each of `fds` in the halted ghost; failures passed over (a failure is on its
    way up, or the fd is gone already)."""
    for fd in fds:
        try:
            gp.inject(pid, regs, gadget, signals, pt.SYS["close"], fd)
        except MigrateError:
            pass


def place(a: stub.Batch, table: set[int], moves: list[tuple[int, int, int]],
          close_others: bool) -> None:
    """Add to `a` the calls that give the ghost its fds: dup3(temp, fd, flags) and
    close(temp) for each (temp, fd, flags) in order (a later move to the same fd wins);
    `table`: its fds now (the temps among them). A temp whose number is the target of an
    earlier move is moved out of the way first. `close_others`: every fd of the ghost
    that is neither a temp nor a target is closed first."""
    temps = {src for src, _, _ in moves}
    if close_others:
        for fd in sorted(table - temps - {dst for _, dst, _ in moves}):
            a.call("close", fd)
    busy = table | {dst for _, dst, _ in moves}
    for i, (src, dst, flags) in enumerate(moves):
        for j in range(i + 1, len(moves)):
            if moves[j][0] == dst:
                free = next(n for n in range(3, 1 << 20) if n not in busy)
                busy.add(free)
                a.call("dup3", dst, free, O_CLOEXEC)
                moves[j] = (free, *moves[j][1:])
        if src == dst:
            a.call("fcntl", dst, F_SETFD, flags and FD_CLOEXEC)
            continue
        a.call("dup3", src, dst, flags)
        a.call("close", src)


def _check(pid: int, what: str, res: int) -> int:
    if res < 0:
        raise MigrateError(-res, f"{what} in ghost: {os.strerror(-res)}", pid)
    return res

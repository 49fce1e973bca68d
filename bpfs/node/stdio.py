"""fds 0, 1, 2 of a process the node restores, from the IO specs of `bpfs.wire.execreq`.

    "socket"     a TCP connection to bpsh (the master's host, the run's port) that starts
                 with the stdio-link header `TOKEN PID FD`; then it is the fd itself, blocking:
                 the process reads its stdin from it or writes its output into it.
                 Connected by `Links`, all at once, mostly without waiting. A process that
                 moved here connects them again (`Links.again`: `TOKEN PID FD again
                 CONSUMED`; bpfs.wire.stdiolink, which the master shares).
    "null"       /dev/null.
    "stdout"     (fd 2 only) the same open file as fd 1, whatever that is: bpsh's stdout
                 and stderr are one file, and one link carries both.
    "file:PATH"  PATH on the node, opened *as the user* (`NodeRestorer.as_user`): stdin
                 O_RDONLY; stdout/stderr O_WRONLY|O_CREAT|O_TRUNC with mode 0666 & ~the
                 process's umask. A relative PATH is taken from the process's cwd (or /).
                 The same file for stdout and stderr is opened once and shared, as `>f 2>&1`.
                 Opened with O_NONBLOCK (cleared after): a FIFO without a reader is ENXIO
                 rather than a hung daemon (the open runs in the event loop's thread).

Every fd here is the node's copy: the restored process gets its own (pidfd_getfd), and the
caller closes these once the restore is over, whatever its outcome, so bpsh sees EOF when
the process ends. Errors are BpfsError with the errno of the failed connect or open and a
message naming the target.
"""

from __future__ import annotations

import errno
import os
from typing import Mapping, Sequence

from bpfs.errors import BpfsError
from bpfs.wire.stdiolink import LINK_TIMEOUT, Connector, LinkTarget, stdin_consumed

__all__ = ["LINK_TIMEOUT", "Links", "LinkTarget", "close_all", "open_local", "stdin_consumed"]

O_FLAGS = os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
IN_FLAGS = os.O_RDONLY | O_FLAGS
OUT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_FLAGS


def close_all(fds: Sequence[int | None]) -> None:
    for fd in set(fds):
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Links(Connector):
    """The links of one restore's "socket" fds (bpfs.wire.stdiolink.Connector: connects
    started at once, headers sent as each completes); `fds()` hands them over as blocking
    fds by fd number (None for other specs).

    `Links(host, port, token, pid, io)`: a first restore, plain headers. A process that
    moved here: `Links.again(io, targets)`, one LinkTarget per "socket" fd with its
    `consumed` (`again` headers; for fd 0 from `stdin_consumed` on the old node).
    Errors are BpfsError with the connect's errno.
    """

    def __init__(self, host: str, port: int, token: str, pid: int, io: Sequence[str],
                 targets: Mapping[int, LinkTarget] | None = None) -> None:
        self.io = io
        if targets is None:
            targets = {n: LinkTarget(host, port, token, pid)
                       for n, spec in enumerate(io) if spec == "socket"}
        super().__init__(targets)

    @classmethod
    def again(cls, io: Sequence[str], targets: Mapping[int, LinkTarget]) -> "Links":
        """The links of a process that moved: `targets` by fd, each with its consumed."""
        wanted = {n for n, spec in enumerate(io) if spec == "socket"}
        if set(targets) != wanted or any(t.consumed is None for t in targets.values()):
            raise BpfsError(errno.EINVAL, f"links again: targets for fds {sorted(targets)}, "
                            f"sockets {sorted(wanted)}, each with its consumed")
        return cls("", 0, "", 0, io, targets)

    def fds(self) -> list[int | None]:
        """The connected links as blocking fds, by fd number; the caller owns them now."""
        fds: list[int | None] = [None] * len(self.io)
        for n, fd in self.connected().items():
            fds[n] = fd
        return fds


def open_local(io: Sequence[str], fds: list[int | None], cwd: str, umask: int) -> None:
    """Fill the non-socket entries of `fds`, the links already in (call as the user, in
    the Restorer's thread).

    The umask is the process's; it is the image's only for the length of this
    synchronous call, in which the daemon does nothing else."""
    base = cwd if os.path.isdir(cwd) else "/"
    old = os.umask(umask)
    try:
        for n, spec in enumerate(io):
            if spec == "socket":
                continue
            if n == 2 and spec == "stdout":
                fds[2] = fds[1]    # the caller closes each fd once (close_all)
                continue
            if n == 2 and spec == io[1] and spec.startswith("file:") and fds[1] is not None:
                fds[2] = fds[1]    # one open file description, as the shell's >f 2>&1
                continue
            path = "/dev/null" if spec == "null" else os.path.join(base, spec[5:])
            fds[n] = _open(path, IN_FLAGS if n == 0 else OUT_FLAGS)
    finally:
        os.umask(old)


def _open(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        err = exc.errno or errno.EIO
        raise BpfsError(err, f"{path}: {os.strerror(err)}") from None
    os.set_blocking(fd, True)
    return fd

"""fds 0, 1, 2 of a process the node restores, from the IO specs of `bpfs.wire.execreq`.

    "socket"     a TCP connection to bpsh (the master's host, the run's port) that starts
                 with the stdio-link header `TOKEN PID FD`; then it is the fd itself, blocking:
                 the process reads its stdin from it or writes its output into it.
                 Connected by `Links`, all at once, mostly without waiting.
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
import functools
import os
import select
import socket
from typing import Sequence

import trio

from bpfs.errors import BpfsError
from bpfs.wire import execreq

LINK_TIMEOUT = 10.0
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


class Links:
    """The links of one restore's "socket" fds: connects started at once, headers sent
    as each completes; `fds()` hands them over as blocking fds (None for other specs).

    On loopback a non-blocking connect says EINPROGRESS but is over when connect()
    returns, so `ready()` (one poll(0)) is normally True at once and the node restores
    without a trip through the event loop; on a network the connects take one round
    trip together (`wait`). Errors are BpfsError with the connect's errno.
    """

    def __init__(self, host: str, port: int, token: str, pid: int, io: Sequence[str]) -> None:
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.token, self.pid, self.io = token, pid, io
        self.socks: dict[int, socket.socket] = {}      # fd number -> socket
        self.pending: set[int] = set()                 # fd numbers still connecting
        wanted = [n for n, spec in enumerate(io) if spec == "socket"]
        if not wanted:
            return
        family, addr = _address(host, port)
        try:
            for n in wanted:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                                     socket.SOCK_CLOEXEC)
                self.socks[n] = sock
                err = sock.connect_ex(addr)
                if err == errno.EINPROGRESS:
                    self.pending.add(n)
                elif err:
                    raise self._error(n, err)
                else:
                    self._hello(n)
        except BaseException:
            self.close()
            raise

    def ready(self) -> bool:
        """Finish, without waiting, the connects that are over; True if none is left."""
        if self.pending:
            poller = select.poll()
            for n in self.pending:
                poller.register(self.socks[n], select.POLLOUT)
            done = {fd for fd, _ in poller.poll(0)}
            for n in [n for n in self.pending if self.socks[n].fileno() in done]:
                self._connected(n)
        return not self.pending

    async def wait(self) -> None:
        """Wait for the connects still under way (LINK_TIMEOUT in all)."""
        try:
            with trio.fail_after(LINK_TIMEOUT):
                for n in sorted(self.pending):
                    await trio.lowlevel.wait_writable(self.socks[n])
                    self._connected(n)
        except trio.TooSlowError:
            n = min(self.pending)
            self.close()
            raise BpfsError(errno.ETIMEDOUT, f"connecting fd {n} to bpsh at {self.where}: "
                            "timed out") from None
        except BaseException:
            self.close()
            raise

    def fds(self) -> list[int | None]:
        """The connected links as blocking fds, by fd number; the caller owns them now."""
        assert not self.pending
        fds: list[int | None] = [None] * len(self.io)
        for n, sock in self.socks.items():
            fd = sock.detach()
            os.set_blocking(fd, True)
            fds[n] = fd
        self.socks.clear()
        return fds

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        self.pending.clear()

    def _connected(self, n: int) -> None:
        self.pending.discard(n)
        err = self.socks[n].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close()
            raise self._error(n, err)
        self._hello(n)

    def _hello(self, n: int) -> None:
        header = execreq.render_header(self.token, self.pid, n)
        try:
            sent = self.socks[n].send(header)
        except OSError as exc:
            self.close()
            raise self._error(n, exc.errno or errno.EIO) from None
        if sent != len(header):                     # a fresh connection: never short
            self.close()
            raise self._error(n, errno.EAGAIN)

    def _error(self, n: int, err: int) -> BpfsError:
        return BpfsError(err, f"connecting fd {n} to bpsh at {self.where}: {os.strerror(err)}")


def _address(host: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) of bpsh's host (the master's) at `port`."""
    family, addr = _resolve(host)
    return family, (addr[0], port, *addr[2:])


@functools.lru_cache(maxsize=8)
def _resolve(host: str) -> tuple[int, tuple]:
    """A numeric host at once; a name through the resolver, once per daemon (the event
    loop waits for it: the master's name, which the node has just resolved to connect).
    EHOSTUNREACH if it does not resolve (not cached: asked again next time)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family, (host, 0)
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    except OSError:
        raise BpfsError(errno.EHOSTUNREACH, f"connecting to bpsh at {host}: "
                        f"{os.strerror(errno.EHOSTUNREACH)}") from None
    return family, addr


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

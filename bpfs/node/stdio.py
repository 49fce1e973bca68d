"""fds 0, 1, 2 of a process the node restores, from the IO specs of `bpfs.execreq`.

    "socket"     a TCP connection to bpsh (the master's host, the run's port) that starts
                 with the stdio-link header `TOKEN PID FD`; then it is the fd itself, blocking:
                 the process reads its stdin from it or writes its output into it.
                 Connected by `connect_links` in the event loop, all at once.
    "null"       /dev/null.
    "file:PATH"  PATH on the node, opened *as the user* (`NodeRestorer.as_user`): stdin
                 O_RDONLY; stdout/stderr O_WRONLY|O_CREAT|O_TRUNC with mode 0666 & ~the
                 process's umask. A relative PATH is taken from the process's cwd (or /).
                 The same file for stdout and stderr is opened once and shared, as `>f 2>&1`.
                 Opened with O_NONBLOCK (cleared after): a FIFO without a reader is ENXIO
                 rather than a hung restore thread.

Every fd here is the node's copy: the restored process gets its own (pidfd_getfd), and the
caller closes these once the restore is over, whatever its outcome, so bpsh sees EOF when
the process ends. Errors are BpfsError with the errno of the failed connect or open and a
message naming the target.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Sequence

import trio

from bpfs import execreq
from bpfs.errors import BpfsError

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


async def connect_links(host: str, port: int, token: str, pid: int,
                        io: Sequence[str]) -> list[int | None]:
    """For each fd whose IO is "socket", a connected link to bpsh (header sent); None else.

    Plain non-blocking sockets, all connects started at once and then waited for: on
    loopback they are over when connect() returns (though it says EINPROGRESS), on a
    network they take one round trip together.
    """
    fds: list[int | None] = [None] * len(io)
    wanted = [n for n, spec in enumerate(io) if spec == "socket"]
    if not wanted:
        return fds
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    socks: list[tuple[int, socket.socket, int]] = []
    n = wanted[0]
    try:
        with trio.fail_after(LINK_TIMEOUT):
            family, _, _, _, addr = (await trio.socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM))[0]
            for n in wanted:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                                     socket.SOCK_CLOEXEC)
                socks.append((n, sock, sock.connect_ex(addr)))
            ready = _connected([sock for _, sock, err in socks if err == errno.EINPROGRESS])
            for n, sock, err in socks:
                if err == errno.EINPROGRESS:
                    if sock.fileno() not in ready:
                        await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                header = execreq.render_header(token, pid, n)
                if sock.send(header) != len(header):     # a fresh connection: never short
                    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    except trio.TooSlowError:
        _close_socks(socks)
        raise BpfsError(errno.ETIMEDOUT, f"connecting fd {n} to bpsh at {where}: "
                        "timed out") from None
    except OSError as exc:
        _close_socks(socks)
        err = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else \
            errno.EHOSTUNREACH          # a name that does not resolve (gaierror)
        raise BpfsError(err, f"connecting fd {n} to bpsh at {where}: "
                        f"{os.strerror(err)}") from None
    except BaseException:
        _close_socks(socks)
        raise
    for n, sock, _ in socks:
        fd = sock.detach()
        os.set_blocking(fd, True)
        fds[n] = fd
    return fds


def _connected(socks: list[socket.socket]) -> set[int]:
    """The fds among `socks` whose connect is already over (either way), without waiting.

    A non-blocking TCP connect says EINPROGRESS even on loopback, where the handshake is
    in fact done before connect() returns; one poll(0) then spares a trip through the
    event loop per link (three per restore)."""
    if not socks:
        return set()
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLOUT)
    return {fd for fd, _ in poller.poll(0)}


def _close_socks(socks: list[tuple[int, socket.socket, int]]) -> None:
    for _, sock, _ in socks:
        sock.close()


def open_local(io: Sequence[str], fds: list[int | None], cwd: str, umask: int) -> None:
    """Fill the non-socket entries of `fds` (call as the user, in the Restorer's thread).

    The umask is the process's; it is the image's only for the length of this
    synchronous call, in which the daemon does nothing else."""
    base = cwd if os.path.isdir(cwd) else "/"
    old = os.umask(umask)
    try:
        for n, spec in enumerate(io):
            if spec == "socket":
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

"""The client side of stdio links (bpfs.wire.execreq): connecting them, first or again.

A restored process's socket fds 0-2 are TCP links to its stdio server (bpsh, the
master's ExecService, or a relay the master started: docs/bpsh.md). The node connects
them when it restores a process the first time (header `TOKEN PID FD`); when a running
process moves, whoever restores it (node B, or the master restoring it into its ghost)
connects them again (`TOKEN PID FD again CONSUMED`). Both go through `Connector`, given
what to connect per fd as a `LinkTarget`; the node's `bpfs.node.stdio.Links` is the
first kind, `LinkTarget(..., consumed=N)` the second. Shared here, below the node and
the master, because both restore processes.

`stdin_consumed(fd, base)` is CONSUMED for an fd-0 link: where the link started in the
process's stdin stream (`base`: 0, or the CONSUMED it was made again with) plus how many
bytes the process has read from the socket (taken on a copy of its fd while it is
stopped, so nothing moves).

    conn = Connector({0: LinkTarget(host, port, token, pid, consumed=n),
                      1: LinkTarget(host, port, token, pid, consumed=0)})
    if not conn.ready():
        await conn.wait()
    fds = conn.fds()            # {fd number: blocking fd}, the caller's now
    fds = await connect_links(targets)      # the same, in one call

Errors are BpfsError with the errno of the failed connect (ETIMEDOUT after
LINK_TIMEOUT) and a message naming the fd and the server.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import socket
import struct
import termios
from typing import Mapping

import trio

from bpfs.errors import BpfsError
from bpfs.record import record
from bpfs.wire import execreq

LINK_TIMEOUT = 10.0

# struct tcp_info (linux/tcp.h): tcpi_state is its first byte; tcpi_bytes_received (since
# Linux 4.1) the u64 at offset 128, after 8 one-byte fields, 24 u32 and 3 u64.
TCPI_STATE = 0
TCPI_BYTES_RECEIVED = 128
TCP_INFO_LEN = 232
# States in which the peer's FIN has been received: it counts one byte in
# tcpi_bytes_received (rcv_nxt moves past it) and none in FIONREAD (tcp_inq takes it off).
FIN_RECEIVED = (6, 8, 9, 11)        # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING


@record(frozen=True)
class LinkTarget:
    """Where one fd's link goes: its server, the run's token, the process's PID; with
    `consumed` the `again` header (for fd 0 the stdin bytes already read; 0 for 1, 2)."""
    host: str
    port: int
    token: str
    pid: int
    consumed: int | None = None


class Connector:
    """The links of one restore: connects started at once, headers sent as each completes;
    `fds()` hands them over as blocking fds.

    On loopback a non-blocking connect says EINPROGRESS but is over when connect()
    returns, so `ready()` (one poll(0)) is normally True at once and the restore goes on
    without a trip through the event loop; on a network the connects take one round
    trip together (`wait`). Errors are BpfsError with the connect's errno; every socket
    is closed then.
    """

    def __init__(self, targets: Mapping[int, LinkTarget]) -> None:
        self.targets = dict(targets)
        self.socks: dict[int, socket.socket] = {}      # fd number -> socket
        self.pending: set[int] = set()                 # fd numbers still connecting
        try:
            for n in sorted(self.targets):
                self._start(n)
        except BaseException:
            self.close()
            raise

    def _start(self, n: int) -> None:
        t = self.targets[n]
        family, addr = _address(t.host, t.port)
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

    async def wait(self, timeout: float = LINK_TIMEOUT) -> None:
        """Wait for the connects still under way (`timeout` in all)."""
        try:
            with trio.fail_after(timeout):
                for n in sorted(self.pending):
                    await trio.lowlevel.wait_writable(self.socks[n])
                    self._connected(n)
        except trio.TooSlowError:
            n = min(self.pending)
            where = self._where(n)
            self.close()
            raise BpfsError(errno.ETIMEDOUT, f"connecting fd {n} to its stdio server at "
                            f"{where}: timed out") from None
        except BaseException:
            self.close()
            raise

    def connected(self) -> dict[int, int]:
        """The connected links as blocking fds, by fd number; the caller owns them now."""
        assert not self.pending
        fds: dict[int, int] = {}
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
            exc = self._error(n, err)
            self.close()
            raise exc
        self._hello(n)

    def _hello(self, n: int) -> None:
        t = self.targets[n]
        header = execreq.render_header(t.token, t.pid, n, t.consumed)
        try:
            sent = self.socks[n].send(header)
        except OSError as exc:
            err = self._error(n, exc.errno or errno.EIO)
            self.close()
            raise err from None
        if sent != len(header):                     # a fresh connection: never short
            err = self._error(n, errno.EAGAIN)
            self.close()
            raise err

    def _where(self, n: int) -> str:
        t = self.targets[n]
        return f"[{t.host}]:{t.port}" if ":" in t.host else f"{t.host}:{t.port}"

    def _error(self, n: int, err: int) -> BpfsError:
        return BpfsError(err, f"connecting fd {n} to its stdio server at {self._where(n)}: "
                         f"{os.strerror(err)}")


async def connect_links(targets: Mapping[int, LinkTarget],
                        timeout: float = LINK_TIMEOUT) -> dict[int, int]:
    """Connect every target's link (see Connector); {fd number: blocking fd}."""
    conn = Connector(targets)
    if not conn.ready():
        await conn.wait(timeout)
    return conn.connected()


def stdin_consumed(fd: int, base: int = 0) -> int:
    """CONSUMED for the fd-0 link `fd`: `base` plus how many bytes its reader has read
    from the socket (tcpi_bytes_received minus what waits in the receive queue, FIONREAD,
    less the peer's FIN if it came).

    `base` is where this link started in the process's stdin stream: 0 for a first link,
    the CONSUMED of its `again` header for a link made again (the socket counts only what
    came on it); whoever restores the process keeps it for its next move.
    Meant for a stopped process's fd 0 (a pidfd_getfd copy: the same socket), so that
    nothing is read meanwhile. BpfsError: ENOTSOCK or another errno of getsockopt/ioctl
    (EOPNOTSUPP if the kernel's tcp_info is too old to count bytes received)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise BpfsError(exc.errno or errno.EIO, f"stdin link fd {fd}: {exc.strerror}") from None
    with sock:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                    b"\0\0\0\0"))[0]
        except OSError as exc:
            raise BpfsError(exc.errno or errno.EIO,
                            f"stdin link fd {fd}: {os.strerror(exc.errno or errno.EIO)}") from None
    if len(info) < TCPI_BYTES_RECEIVED + 8:
        raise BpfsError(errno.EOPNOTSUPP, "this kernel's TCP_INFO has no bytes_received")
    received = struct.unpack_from("Q", info, TCPI_BYTES_RECEIVED)[0]
    fin = 1 if info[TCPI_STATE] in FIN_RECEIVED else 0
    return base + max(0, received - queued - fin)


def _address(host: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) of the server's host (the master's) at `port`."""
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
        raise BpfsError(errno.EHOSTUNREACH, f"connecting to a stdio server at {host}: "
                        f"{os.strerror(errno.EHOSTUNREACH)}") from None
    return family, addr

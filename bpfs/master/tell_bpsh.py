"""The master's one-way links to bpsh: a multi-node run's ranks, a failed migration's
error header (bpfs.wire.execreq renders both). bpsh listens on all addresses of this host.

    send(port, data, what)                    the whole link, waiting as needed
    send_now(port, data, what) -> Pending | None   what goes without waiting; None: done
    finish(pending, what)                     the rest of it, in a task

Nothing raises: a link that cannot be made or finished is logged (bpsh then reports
the rank itself) and REPORT_TIMEOUT bounds the wait.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from typing import NamedTuple

import trio

log = logging.getLogger("bpfs.master.procs")

REPORT_TIMEOUT = 5.0        # connecting to bpsh to report a failure


class Pending(NamedTuple):
    """A link `send_now` began: its socket, what is left to write, still connecting."""
    sock: socket.socket
    data: bytes
    connecting: bool


async def send(port: int, data: bytes, what: str, host: str | None = None) -> None:
    """One link to bpsh: an error header, or the ranks."""
    left = send_now(port, data, what, host)
    if left is not None:
        await finish(left, what)


def send_now(port: int, data: bytes, what: str, host: str | None = None) -> Pending | None:
    """Open the link and write what goes without waiting: on loopback a non-blocking
    connect is over when connect() returns, and a ranks link fits in the socket buffer, so
    usually all of it, at once, in the caller's turn of the event loop (an async connect
    waits for a loop that may be serving many busy nodes, for a link bpsh needs before it
    can reap any rank). None: done (or failed, and logged); else what `finish` completes."""
    host = host or "127.0.0.1"          # bpsh on a node: that node's address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                return Pending(sock, data, True)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            return Pending(sock, data[sent:], False)
    except OSError as exc:
        log.info("cannot tell bpsh (port %d) %s: %s", port, what, exc.strerror or exc)
    sock.close()
    return None


async def finish(pending: Pending, what: str) -> None:
    """Finish what `send_now` began, waiting as needed (REPORT_TIMEOUT in all); the
    socket is closed afterwards whatever happened."""
    sock = pending.sock
    try:
        with trio.fail_after(REPORT_TIMEOUT):
            if pending.connecting:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
            async with trio.SocketStream(trio.socket.from_stdlib_socket(sock)) as stream:
                await stream.send_all(pending.data)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        log.info("cannot tell bpsh %s: %s", what, exc)
    finally:
        sock.close()

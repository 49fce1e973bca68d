"""A stopped process writes its own pages into a socket of ours: one copy fewer at the source.

    with PageSender(pid, sock) as s:     pid: stopped, traced by this thread, dumped
        s.send(addr, size)               sendto(fd, addr, size, MSG_NOSIGNAL) in pid, until
                                         all went (poll on our socket while it is full)
                                         the process is as it was again once out

Why: a moved process's big runs were read into the node daemon's memory (process_vm_readv)
and written from there into the socket: two copies of every byte at the source. Written by
the process itself, straight from its pages into the socket, they are copied once, as the
plain socket floor is (bench/results-move.md). How: the socket goes into the process over
the channel `ghost_files.send_into` opens (socketpair injected, SCM_RIGHTS), its scratch
in a page mapped for the while; each sendto is injected, a whole piece at once: on a
blocking socket (SO_SNDTIMEO: `timeout`) the kernel waits for room inside it, as for any
sender; on a non-blocking one, a full socket returns EAGAIN and we wait for room with
poll, on our own fd, within `timeout`. Blocking is much the faster on a loaded machine:
each injected call needs the process scheduled, and a call per socketful (100 MB: a few
hundred) cost more than the copy it saved (the ratio to the daemon's way 1.28, load 5).

The process stays exactly as dumped: its signals blocked meanwhile (PTRACE_SETSIGMASK: none
is delivered, none is lost, they wait for its mask back), and on the way out, whatever
happened, the fd closed in it, the page unmapped, its mask and registers put back. Its
dump must be over before (it would see the fd and the page).

Errors: MigrateError, its errno the injected call's (EPIPE, ECONNRESET: the target went;
ETIMEDOUT: no room for `timeout`); Gone if the process ended. Refused at the start (nothing
sent: the caller sends the old way) with ENOTSUP for a process under a seccomp filter that
is not the node's own (it might refuse, or kill for, a call it never made itself).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from typing import Any

from bpfs.migrate import ghost_files, procfs
from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.dump import syscall_gadget
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.lazyrun import LazyRun

MSG_NOSIGNAL = 0x4000
PROT_RW, MAP_PRIVATE_ANON = 0x3, 0x22
SCRATCH = 4096                          # >= ghost_files.CHANNEL_SIZE
ALL_SIGNALS = (1 << 64) - 1             # the kernel keeps SIGKILL and SIGSTOP out of it
EAGAIN = -errno.EAGAIN


class PageSender:
    """See the module docstring. `filters`: the seccomp filters the process may have (the
    node's own: 1 on a supervised node, else 0)."""

    def __init__(self, pid: int, sock: int, timeout: float, filters: int = 0) -> None:
        self.pid, self.sock, self.timeout, self.filters = pid, sock, timeout, filters
        self.signals: list[int] = []    # stops for signals the kernel would not hold off
        self.fd: int | None = None      # the socket's number in the process
        self.scratch: int | None = None
        self.sent = 0

    def __enter__(self) -> "PageSender":
        status = procfs.read_status(self.pid)
        if int(status.get("Seccomp_filters", "0")) > self.filters:
            raise MigrateError(errno.ENOTSUP, "a seccomp filter of its own", self.pid)
        self.regs = pt.getregs(self.pid)
        self.mask = pt.get_sigmask(self.pid)
        self.gadget = syscall_gadget(self.pid)
        pt.set_sigmask(self.pid, ALL_SIGNALS)
        try:
            self.scratch = self._call("mmap", 0, SCRATCH, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
            (self.fd,) = ghost_files.send_into(self.pid, self.regs, self.gadget, self.signals,
                                               self.scratch, [self.sock])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, addr: int, size: int) -> None:
        """`size` bytes of the process's memory at `addr` into the socket, in order."""
        deadline = time.monotonic() + self.timeout
        while size:
            n = gp.inject(self.pid, self.regs, self.gadget, self.signals, pt.SYS["sendto"],
                          self.fd or 0, addr, size, MSG_NOSIGNAL, 0, 0)
            self._no_signals()
            if n == EAGAIN:
                self._wait_room(deadline)
                continue
            if n <= 0:
                raise MigrateError(-n if n < 0 else errno.EIO, "sending its pages: "
                                   f"{os.strerror(-n) if n < 0 else 'nothing sent'}", self.pid)
            addr, size, self.sent = addr + n, size - n, self.sent + n
            deadline = time.monotonic() + self.timeout

    def send_frame(self, head: bytes, piece: Any) -> None:
        """One frame into the socket: its `head` (written from here), then `piece`'s bytes,
        a LazyRun's by the process itself (`send`), any other buffer from here. For a
        tracer that does other work between frames (the master's: one frame a request)."""
        write_all(self.sock, head, self.timeout)
        if isinstance(piece, LazyRun):              # its pages, by the process
            self.send(piece.addr, piece.size)
        else:
            write_all(self.sock, piece, self.timeout)

    def _wait_room(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        if left <= 0 or not poller.poll(left * 1000):
            raise MigrateError(errno.ETIMEDOUT, f"sending its pages: no room for "
                               f"{self.timeout:g} s", self.pid)

    def close(self) -> None:
        """The process as it was: its fd closed, its page unmapped, its mask and registers
        back, a signal taken in the way sent again (pending, as `running.release` does).
        Failures pass (it ended, or an error is on its way up)."""
        calls = []
        if self.fd is not None:
            calls.append(("close", self.fd))
        if self.scratch is not None:
            calls.append(("munmap", self.scratch, SCRATCH))
        self.fd = self.scratch = None
        try:
            for name, *args in calls:
                gp.inject(self.pid, self.regs, self.gadget, self.signals, pt.SYS[name], *args)
        except (MigrateError, gp.Gone):
            pass
        finally:
            try:
                pt.setregs(self.pid, self.regs)
                pt.set_sigmask(self.pid, self.mask)
                for sig in self.signals:
                    os.kill(self.pid, sig)
            except (MigrateError, OSError):
                pass
            self.signals = []

    def _call(self, name: str, *args: int) -> int:
        res = gp.inject(self.pid, self.regs, self.gadget, self.signals, pt.SYS[name], *args)
        self._no_signals()
        if res < 0:
            raise MigrateError(-res, f"{name} in the process: {os.strerror(-res)}", self.pid)
        return res

    def _no_signals(self) -> None:
        """A stop for a signal that cannot be blocked (SIGSTOP) was taken in the way:
        give up (the move fails; the process goes on, as after a failed dump)."""
        if self.signals:
            raise MigrateError(errno.EINTR, f"signal {self.signals[0]} while sending its "
                               "pages", self.pid)


def blocking(fd: int, on: bool, timeout: float) -> None:
    """The socket `fd` (its open file: every copy of it, the process's too) blocking with
    SO_SNDTIMEO of `timeout` (one injected sendto a piece, the kernel waiting for room
    inside it), or back to trio's non-blocking without it."""
    secs = int(timeout) if on else 0
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", secs, 0))
    os.set_blocking(fd, on)


def write_all(fd: int, data: Any, timeout: float) -> None:
    """All of `data` into the socket `fd` (blocking or not), waiting for room at most
    `timeout` at a time (ETIMEDOUT); a broken stream raises its OSError."""
    view = memoryview(data).cast("B")
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not poller.poll(timeout * 1000):
            raise OSError(errno.ETIMEDOUT, f"no room to send for {timeout:g} s")

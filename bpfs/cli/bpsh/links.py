"""The links the nodes open back to bpsh: who is who, and what a header means.

A node connects once per remote fd whose IO is "socket" and sends the header of
`bpfs.wire.execreq` first. A connection whose header is not this run's (wrong token,
unknown PID, garbage, too long) is closed and forgotten. An `err` header means that the
migration of that PID failed: the master's reason, then bproc's `N: strerror(errno)`,
and nothing more is expected from that PID (docs/bpsh.md).

A link made again (header `again`, its process moved; docs/bpsh.md) is taken for a
(PID, fd) whose first link came: an output link queues behind the one it replaces
(`Proc.queued`, read once that one is at EOF), a stdin link takes over from CONSUMED
(`stdin.Stdin.relink`).

A multi-node run has one child, the writer of `execmove --nodes`; the master sends the
ranks link (rank -> PID, or -ERRNO for a rank that may not run). Until it comes, links
of unknown PIDs are held. Errors on a link close that link only.
"""

from __future__ import annotations

import _socket
import errno as _errno
import os
from bpfs.child import NODE_REFUSALS, one_line
from bpfs.cli.bpsh.poller import EVENT_READ
from bpfs.record import Factory, record
TYPE_CHECKING = False  # typing costs start-up; annotations only
if TYPE_CHECKING:
    from typing import Any, Callable
    from bpfs.cli.bpsh.poller import Poller

from bpfs.wire.execreq import HEADER_MAX, RANKS_FD, Header, parse_header, parse_ranks

RANKS_MAX = 16 << 20                # the most a ranks link may carry


@record(eq=False)
class Proc:
    """One rank: a child of bpsh (its ghost) and the links it sends back."""
    rank: int
    node: int
    pid: int
    expect: set[int]                        # fds not yet connected
    links: list["Link"] = Factory(list)   # open stdout/stderr links
    stdin_link: "Link | None" = None
    stdin_parked: "tuple[Link, int | None] | None" = None  # the old one during a move, and
                                            # what it had been sent (stdin.Stdin._park)
    status: int | None = None               # waitpid status once reaped
    reaped_at: float = 0.0
    failed: bool = False                    # never ran: expect nothing more
    checked_at: float = 0.0                 # when its node was last asked about (node_gone)
    sockets: set[int] = Factory(set)        # the fds that come back as links at all
    queued: list["Link"] = Factory(list)  # output links made again, behind the old ones
    pidfd: int = -1                         # not our child: its end is this pidfd (relay)

    def settled(self, now: float, grace: float) -> bool:
        """Reaped, all its output drained, and no link still worth waiting for."""
        if self.status is None or self.links or self.queued:
            return False
        waiting = (self.expect - {0}) and not self.failed
        return not waiting or now >= self.reaped_at + grace


@record(eq=False)
class Vector:
    """A multi-node run whose ranks link has not come yet (see the module docstring)."""
    writer: int                             # bpsh's child, the writer of the request
    procs: list[Proc]                       # the ranks, PIDs unknown (0)
    failed: bool = False                    # no rank will run: only the writer's end counts
    status: int | None = None               # the writer's, if reaped before the ranks
    reaped_at: float = 0.0
    held: list[tuple[Header, _socket.socket]] = Factory(list)   # links of unknown PIDs


@record(eq=False)
class Link:
    sock: _socket.socket
    proc: Proc
    fd: int
    pending: bytearray = Factory(bytearray)   # partial line (line mode)
    events: int = 0                                          # what the selector watches


def watch(sel: Poller, link: Link, events: int, handler: Callable[[Link, int], None]) -> None:
    """Have `sel` call handler(link, events) for `events` on the link."""
    if link.events == events:
        return
    callback = lambda ev, link=link: handler(link, ev)  # noqa: E731
    if link.events:
        sel.modify(link.sock, events, callback)
    else:
        sel.register(link.sock, events, callback)
    link.events = events


class Links:
    """The listening socket and every link of one run. `server` is the StdioServer: its
    procs, sel, clock, stdin and output, and read_status()."""

    def __init__(self, server: Any, listener: _socket.socket | None, token: str) -> None:
        self.server = server
        self.listener = listener
        self.token = token
        self.by_pid: dict[int, Proc] = {}
        self.vector: Vector | None = None       # a multi-node run waiting for its ranks

    def add(self, proc: Proc) -> None:
        if proc.pid:
            self.by_pid[proc.pid] = proc

    # ---- connections ----------------------------------------------------------------

    def on_accept(self, events: int) -> None:
        assert self.listener is not None
        sel = self.server.sel
        while True:
            try:
                fd, _ = self.listener._accept()     # socket.accept without the wrapper
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.server.output.warn(f"accept: {os.strerror(e.errno or _errno.EIO)}")
                if e.errno not in (_errno.EMFILE, _errno.ENFILE, _errno.ECONNABORTED):
                    sel.unregister(self.listener)
                return
            lst = self.listener
            sock = _socket.socket(lst.family, lst.type, lst.proto, fd)
            sock.setblocking(False)
            got = bytearray()
            sel.register(sock, EVENT_READ,
                         lambda ev, sock=sock, got=got: self._on_header(sock, got))

    def _on_header(self, sock: _socket.socket, got: bytearray) -> None:
        """Read the header line without reading past it: peek, then take what is header."""
        try:
            peek = sock.recv(HEADER_MAX - len(got), _socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peek = b""
        nl = peek.find(b"\n")
        if not peek or (nl < 0 and len(got) + len(peek) >= HEADER_MAX):
            self._drop(sock)
            return
        got += sock.recv(nl + 1 if nl >= 0 else len(peek))
        if nl < 0:
            return                                  # the rest of the header later
        self.server.sel.unregister(sock)
        header = parse_header(bytes(got), self.token)
        if header is None:
            sock.close()
        else:
            self._dispatch(header, sock)

    def _dispatch(self, header: Header, sock: _socket.socket) -> None:
        proc = self.by_pid.get(header.pid)
        vec = self.vector
        if vec is not None and header.pid == vec.writer and header.fd < 0:
            if header.fd == RANKS_FD:
                self._read_ranks(sock)
            else:
                sock.close()
                self.vector_failed(vec, header.errno, header.message)
        elif proc is None and vec is not None and not vec.failed:
            vec.held.append((header, sock))         # a rank's link, before the ranks link
        elif proc is None:
            sock.close()
        elif header.fd < 0:
            sock.close()
            self._migration_failed(proc, header.errno, header.message)
        elif header.again and header.fd in proc.sockets and not proc.failed:
            proc.expect.discard(header.fd)
            self.attach(proc, header.fd, sock, header.consumed)
        elif header.fd not in proc.expect or proc.failed:
            if not proc.failed:
                self.server.output.warn(
                    f"too many connections from pid {proc.pid} (fd {header.fd})")
            sock.close()
        else:
            proc.expect.discard(header.fd)
            self.attach(proc, header.fd, sock)

    def attach(self, proc: Proc, fd: int, sock: _socket.socket,
               again: int | None = None) -> None:
        """A link of `proc` for `fd`; `again`: made again after a move, and (fd 0) the
        stdin bytes the process had read."""
        link = Link(sock, proc, fd)
        output = self.server.output
        if fd == 0 and again is not None:
            self.server.stdin.relink(link, again)
        elif fd == 0:
            self.server.stdin.attach(link)
        elif (fd == 1 and output.out.broken) or (fd == 2 and output.err.broken):
            sock.close()
        elif again is not None and any(lk.fd == fd for lk in proc.links + proc.queued):
            proc.queued.append(link)                # read once the old one is at EOF
        else:
            proc.links.append(link)

    def _drop(self, sock: _socket.socket) -> None:
        self.server.sel.unregister(sock)
        sock.close()

    # ---- failures ---------------------------------------------------------------------

    def _migration_failed(self, proc: Proc, err: int, reason: str = "") -> None:
        if not proc.failed:
            self.say_failed([proc], err, reason)
        self.give_up(proc)

    def say_failed(self, procs: list[Proc], err: int, reason: str = "") -> None:
        """bproc's `N: strerror` for each rank, after the master's reason (once) when it
        says more than that (see NODE_REFUSALS)."""
        lines = [f"{p.node}: {os.strerror(err)}" for p in procs]
        reason = one_line(reason)
        if reason and err not in NODE_REFUSALS and lines:
            lines.insert(0, f"{self.server.output.prog}: {reason}")
        if lines:
            self.server.output.say("\n".join(lines))

    def give_up(self, proc: Proc) -> None:
        """`proc` never ran: expect nothing more from it."""
        proc.failed = True
        self.server.stdin.close_link(proc)

    # ---- multi-node runs -------------------------------------------------------------

    def _read_ranks(self, sock: _socket.socket) -> None:
        """Read the ranks link's body to its EOF (small: a PID per rank), then use it."""
        body = bytearray()

        def more(events: int) -> None:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data and len(body) + len(data) <= RANKS_MAX:
                body.extend(data)
                return
            self._drop(sock)
            vec = self.vector
            ranks = parse_ranks(bytes(body), len(vec.procs)) if vec is not None else None
            if vec is None or ranks is None or data:
                self.server.output.warn("the master sent a bad ranks link; ignored")
            else:
                self._ranks(vec, ranks)
        self.server.sel.register(sock, EVENT_READ, more)

    def _ranks(self, vec: Vector, ranks: list[int]) -> None:
        """Every rank gets its ghost's PID; a rank that may not run says why."""
        self.vector = None
        for proc, pid in zip(vec.procs, ranks):
            if pid < 0:
                self._migration_failed(proc, -pid)
                proc.status, proc.reaped_at = 1 << 8, self.server.clock()   # as a failed ctl write
                continue
            proc.pid = pid
            self.by_pid[pid] = proc
            if pid == vec.writer and vec.status is not None:
                proc.status, proc.reaped_at = vec.status, vec.reaped_at
                self.server.stdin.close_link(proc)
        for header, sock in vec.held:
            self._dispatch(header, sock)
        self.server.sigchld = True                  # reap what ended meanwhile

    def vector_failed(self, vec: Vector, err: int, reason: str = "") -> None:
        """Nothing runs anywhere: say so for every rank; the writer's end decides."""
        self.say_failed([p for p in vec.procs if not p.failed], err, reason)
        self.vector_dead(vec)

    def vector_dead(self, vec: Vector) -> None:
        vec.failed = True
        for proc in vec.procs:
            self.give_up(proc)
        for _, sock in vec.held:
            sock.close()
        vec.held.clear()
        self._vector_settle(vec)

    def _vector_settle(self, vec: Vector) -> None:
        """Once it failed and the writer is reaped, every rank has the writer's status."""
        if vec.failed and vec.status is not None:
            self.vector = None
            for proc in vec.procs:
                proc.status, proc.reaped_at = vec.status, vec.reaped_at

    def reap_writer(self, vec: Vector) -> None:
        try:
            pid, status = os.waitpid(vec.writer, os.WNOHANG)
        except ChildProcessError:
            pid, status = vec.writer, 255 << 8
        if pid:
            self.server.read_status()
            if self.vector is vec:
                vec.status, vec.reaped_at = status, self.server.clock()
                self._vector_settle(vec)

    def close_held(self) -> None:
        if self.vector is not None:
            for _, sock in self.vector.held:
                sock.close()

"""bpsh's side of the stdio links: accept the nodes' connections, forward, reap, time out.

One `StdioServer` serves one bpsh run. It knows the run's processes (`add_process`:
rank, node, PID, which of fds 0/1/2 come back as links), then `run()` loops until
every process is reaped and every output link it will ever get has reached EOF:

- the listening socket: a node connects once per remote fd whose IO is "socket" and
  sends `bpfs.wire.execreq` header first; a connection whose header is not this run's
  (wrong token, unknown PID, garbage, too long) is closed and forgotten. An `err`
  header means the migration of that PID failed: the master's reason (`bpsh: REASON`,
  e.g. "/usr/bin/passwd: set-user-ID programs cannot migrate") then bproc's
  `N: strerror(errno)` on stderr, and nothing more is expected from that PID.
  The reason is left out for bproc's own per-node refusals (NODE_REFUSALS: no x
  permission, node down, no such node), which `N: strerror` says in full.
- stdin: what is read from `stdin_fd` is broadcast to every fd-0 link. The buffer is
  kept until every process that may still connect its stdin has consumed it (so a
  node that connects late still gets all of stdin, as in bproc); reading stops while
  the buffer is full. At EOF each stdin link gets shutdown(SHUT_WR) once it has
  everything. Data or EOF arriving *on* a stdin link closes it (the process is gone).
- stdout/stderr links: copied to `stdout_fd`/`stderr_fd` unbuffered (big reads,
  `os.write`), or by whole lines (`line_buffered`; `prefix` adds "%3d: " with the
  node number), or in node order (`sequential`: only the current rank's links are
  read, the others wait in their sockets; `dividers` prints bproc's divider line).
  If our stdout is a broken pipe, every stdout link is closed so the remote
  programs get EPIPE as they would in a local pipeline.
- a multi-node run (`add_vector`): bpsh forked one child, the writer of
  `execmove --nodes`; the master makes a ghost per rank and sends the ranks link
  (rank -> PID, or -ERRNO for a rank that may not run). Until it comes, the ranks'
  PIDs are unknown: headers of unknown PIDs are held, and only the writer is reaped
  or signalled. If the writer ends first, the ranks link is waited for `late_grace`
  seconds (it may be on its way), then every rank ends with the writer's status. An
  `err` header for the writer, or a failed ctl write (rank -1 on the status pipe),
  before the ranks link means no rank runs.
- launch failures: bpsh's children report a failed ctl write or execve as records on
  `status_fd` (see `pack_failure`: rank, stage, errno and the master's reason, read
  back from the ctl handle; one atomic write each, read back in whatever pieces come);
  the server prints them as above and expects no links from that rank. A multi-node
  request refused whole prints its reason once, then `N: strerror` for every rank.
- children: SIGCHLD wakes the loop (signal.set_wakeup_fd) and each known PID is
  reaped with waitpid(WNOHANG). Links a reaped PID never connected are waited for
  `late_grace` seconds more (a connection made before the process ran can still be
  in flight), then given up: nothing hangs, and no output that was sent is lost.
- links that outlive their process: a reaped rank's output links are read to their
  EOF, however long that takes, while its node is up (the last output may come after
  the exit, and a slow reader of ours keeps megabytes in the sockets; a background
  child may hold them, as it would a local pipe). `late_grace` seconds after the reap,
  and every `late_grace` seconds after that, `node_gone(node)` is asked; once the node
  is down, the master has killed the ghost and whatever still holds the links there is
  an orphan (a node daemon stopped rather than dead keeps it alive until it resumes):
  what has arrived is printed and the links are closed, so bpsh ends with its ghost as
  when the node dies. Measured on a loaded machine (32-node `bpsh -a` with output,
  load average 15-21 on 2 cores): the last EOF came at most 151 ms after the reap, so
  a healthy run almost never asks. Not asked for bpsh's own processes (node -1), nor,
  in sequential mode, for ranks not being shown.
- signals to bpsh (INT, QUIT, TERM, HUP, USR1, USR2, CONT) are forwarded to every
  live child (the ghosts forward them to the real processes); TSTP is forwarded and
  then stops bpsh itself. After the third SIGINT the children get SIGKILL. The
  children are in bpsh's process group: when bpsh is in its terminal's foreground,
  INT, QUIT and TSTP came from the keyboard to the whole group, so they are not
  forwarded again (bpsh still stops itself on TSTP). A signal bpsh was started
  with ignored (nohup) is not caught, so not forwarded either.

Errors: OSErrors from our own stdout/stderr other than EPIPE propagate to the caller;
errors on a link close that link only.
"""

from __future__ import annotations

# The C modules on purpose: `socket`, `signal` and `selectors` wrap them with enums and
# import `enum`, `functools`, `collections`... (~5 ms of every bpsh run). So: `_socket`
# sockets (socket.socket is a subclass: callers may pass either), `_signal` (plain ints),
# and `_Poller` below on select.poll in place of selectors.PollSelector.
import _signal
import _socket
import errno as _errno
import math
import os
import select
import time
from _struct import Struct
from bpfs.record import Factory, record
TYPE_CHECKING = False  # typing costs ~3 ms of start-up; annotations only
if TYPE_CHECKING:
    from typing import Any, Callable

from bpfs.wire.execreq import HEADER_MAX, RANKS_FD, Header, parse_header, parse_ranks

DIVIDER = "-" * 69
RAW_CHUNK = 1 << 20             # read size for unbuffered output links
STDIN_BUFFER = 4 << 20          # the most of stdin held for slow readers
LATE_GRACE = 1.0                # seconds to wait for links of an already reaped PID, and
                                # between checks of the node of a reaped PID's open links
DRAIN_MAX = 64 << 20            # the most read from a gone node's link before it is closed
LOCAL = -1                      # the node number of a process bpsh runs here
FORWARDED = (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM, _signal.SIGHUP,
             _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGCONT, _signal.SIGTSTP)
TERMINATING = (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM, _signal.SIGHUP)
KEYBOARD = (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTSTP)     # a terminal's, to a group
EVENT_READ, EVENT_WRITE = 1, 2      # as selectors'

# launch failure records written by bpsh's children on the status pipe: a fixed part,
# then the master's reason (UTF-8, REASON_MAX bytes at most: a record is one atomic write)
STAGE_CTL, STAGE_EXEC = 1, 2
_RECORD = Struct("=iiiH")           # rank, stage, errno, length of the reason
REASON_MAX = 1024
ALL_RANKS = -1                      # the rank of a failure of a multi-node run's writer
RANKS_MAX = 16 << 20                # the most a ranks link may carry
# bproc's own per-node refusals (no x permission, node down, no such node): `N: strerror`
# says it all, and the ranks link carries no reason for them; other failures (a request
# the master refused, a program that may not migrate, a restore that failed) come with
# the master's reason, printed once before the `N: strerror` lines.
NODE_REFUSALS = (_errno.EACCES, _errno.EHOSTDOWN, _errno.ENODEV)


def pack_failure(rank: int, stage: int, err: int, reason: str = "") -> bytes:
    data = one_line(reason).encode("utf-8", "replace")[:REASON_MAX]
    return _RECORD.pack(rank, stage, err, len(data)) + data


def one_line(text: str) -> str:
    """A reason as one line of printable text."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _in_foreground() -> bool:
    """True if we are in the foreground process group of our controlling terminal: then
    a keyboard signal (Ctrl-C, Ctrl-\\, Ctrl-Z) went to the whole group, our children
    (the ghosts) included, and forwarding it would deliver it twice."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False                        # no controlling terminal
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


@record
class OutputOptions:
    """bpsh's -L, -p, -s, -d and -b."""
    line_buffered: bool = False
    prefix: bool = False
    sequential: bool = False
    dividers: bool = False
    buffer_size: int = 4096


@record(eq=False)
class Proc:
    """One rank: a child of bpsh (its ghost) and the links it sends back."""
    rank: int
    node: int
    pid: int
    expect: set[int]                        # fds not yet connected
    links: list["Link"] = Factory(list)   # open stdout/stderr links
    stdin_link: "Link | None" = None
    status: int | None = None               # waitpid status once reaped
    reaped_at: float = 0.0
    failed: bool = False                    # never ran: expect nothing more
    checked_at: float = 0.0                 # when its node was last asked about (node_gone)

    def settled(self, now: float, grace: float) -> bool:
        """Reaped, all its output drained, and no link still worth waiting for."""
        if self.status is None or self.links:
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


class _Sink:
    """bpsh's stdout or stderr: whole writes, even to a non-blocking fd; notes a broken pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    select.select([], [self.fd], [], 1.0)
                    continue
                view = view[n:]
        except BrokenPipeError:
            self.broken = True


class _Stdin:
    """The stdin broadcast buffer: an absolute offset per reader, trimmed to the slowest."""

    def __init__(self, fd: int | None, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self.buf = bytearray()
        self.base = 0               # absolute offset of buf[0]
        self.eof = fd is None
        self.readers: dict[Proc, int] = {}      # proc -> absolute offset it has been sent

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def wants_input(self) -> bool:
        return not self.eof and bool(self.readers) and len(self.buf) < self.capacity

    def read(self) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, min(RAW_CHUNK, self.capacity - len(self.buf)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.buf += data
        else:
            self.eof = True

    def has_pending(self, proc: Proc) -> bool:
        return self.readers.get(proc, self.end) < self.end

    def pending(self, proc: Proc) -> memoryview:
        return memoryview(self.buf)[self.readers[proc] - self.base:]

    def consumed(self, proc: Proc, n: int) -> None:
        self.readers[proc] += n
        self._trim()

    def drop(self, proc: Proc) -> None:
        if self.readers.pop(proc, None) is not None:
            self._trim()

    def _trim(self) -> None:
        low = min(self.readers.values(), default=self.end)
        if low > self.base:
            del self.buf[:low - self.base]
            self.base = low


class StdioServer:
    """Serves one bpsh run; see the module docstring. Use from the main thread."""

    def __init__(self, listener: _socket.socket | None, token: str,
                 options: OutputOptions | None = None, *, stdin_fd: int | None = 0,
                 stdout_fd: int = 1, stderr_fd: int = 2, status_fd: int | None = None,
                 command: str = "", prog: str = "bpsh", late_grace: float | None = None,
                 node_gone: Callable[[int], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.listener = listener
        self.token = token
        self.opt = options or OutputOptions()
        self.out, self.err = _Sink(stdout_fd), _Sink(stderr_fd)
        self.stdin = _Stdin(stdin_fd, max(STDIN_BUFFER, self.opt.buffer_size))
        self.status_fd = status_fd
        self.command, self.prog = command, prog
        self.grace = LATE_GRACE if late_grace is None else late_grace
        self.node_gone = node_gone
        self.clock = clock
        self.procs: list[Proc] = []
        self.by_pid: dict[int, Proc] = {}
        self.vector: Vector | None = None       # a multi-node run waiting for its ranks
        self.sel = _Poller()                    # poll, unlike epoll, takes regular files
        self.chunk = bytearray(max(RAW_CHUNK, self.opt.buffer_size))
        self.current = 0                        # sequential: index of the rank being shown
        self.signals: list[int] = []            # signals bpsh received, in order
        self._stdin_registered = False
        self._wake_r = self._wake_w = -1
        self._sigchld = True
        self._last_reap = 0.0
        self._status_buf = bytearray()          # a partial failure record

    # ---- set-up ---------------------------------------------------------------------

    def add_process(self, rank: int, node: int, pid: int, expect: set[int]) -> Proc:
        """Register a child; `expect` holds the fds (0, 1, 2) it will connect back.
        PID 0: not known yet (a rank of a multi-node run, see add_vector)."""
        proc = Proc(rank, node, pid, set(expect))
        self.procs.append(proc)
        if pid:
            self.by_pid[pid] = proc
        if 0 in proc.expect:
            self.stdin.readers[proc] = self.stdin.base
        return proc

    def add_vector(self, ranks: list[tuple[int, int]], writer: int, expect: set[int]) -> None:
        """A multi-node run: `ranks` are (rank, node) pairs, `writer` the one child forked;
        each rank's PID comes with the ranks link."""
        self.vector = Vector(writer, [self.add_process(rank, node, 0, expect)
                                      for rank, node in ranks])

    def add_link(self, proc: Proc, fd: int, sock: _socket.socket) -> None:
        """A link that exists already (a local child's socketpair end)."""
        sock.setblocking(False)
        proc.expect.discard(fd)
        self._attach(proc, fd, sock)

    def install_signals(self) -> None:
        """Catch SIGCHLD and the forwarded signals; call before forking (run() does too)."""
        if self._wake_r >= 0:
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup = _signal.set_wakeup_fd(self._wake_w)
        self._old_handlers = {sig: _signal.signal(sig, _noop)
                              for sig in (_signal.SIGCHLD, *FORWARDED)
                              if _signal.getsignal(sig) != _signal.SIG_IGN}

    # ---- the loop -------------------------------------------------------------------

    def run(self) -> list[Proc]:
        """Serve until every process is settled; returns the processes in rank order."""
        self.install_signals()
        try:
            self.sel.register(self._wake_r, EVENT_READ, self._on_wakeup)
            if self.listener is not None:
                self.listener.setblocking(False)
                self.sel.register(self.listener, EVENT_READ, self._on_accept)
            if self.status_fd is not None:
                self.sel.register(self.status_fd, EVENT_READ, self._on_status)
            if self.opt.dividers and self.procs:
                self._divider()
            while True:
                if self._sigchld or self.clock() - self._last_reap >= 1.0:
                    self._reap()
                self._close_orphans()
                self._advance()
                if self._done():
                    break
                self._update_interest()
                for callback, events in self.sel.select(self._timeout()):
                    callback(events)
        finally:
            self._restore_signals()
            self._close_all()
        return sorted(self.procs, key=lambda p: p.rank)

    def _done(self) -> bool:
        now = self.clock()
        vec = self.vector
        if vec is not None and vec.status is not None and now >= vec.reaped_at + self.grace:
            self._vector_dead(vec)          # the writer ended and no ranks link came
        return self.current >= len(self.procs) and all(
            p.settled(now, self.grace) for p in self.procs)

    def _timeout(self) -> float:
        now = self.clock()
        waits = [p.reaped_at + self.grace - now for p in self.procs
                 if p.status is not None and not p.failed and p.expect - {0}]
        waits += [self._next_check(p) - now for p in self._lingering()]
        vec = self.vector
        if vec is not None and vec.status is not None:
            waits.append(vec.reaped_at + self.grace - now)
        if waits:
            return max(0.0, min(waits)) + 0.001
        return 1.0      # a backstop for a lost SIGCHLD

    # ---- links that outlive their process ------------------------------------------

    def _lingering(self) -> list[Proc]:
        """Reaped remote ranks whose output links are open and read now (sequential mode
        leaves the others' in their sockets)."""
        if self.node_gone is None:
            return []
        shown = self.procs if not self.opt.sequential else self.procs[self.current:
                                                                       self.current + 1]
        return [p for p in shown if p.status is not None and p.links and p.node != LOCAL]

    def _next_check(self, proc: Proc) -> float:
        return max(proc.reaped_at, proc.checked_at) + self.grace

    def _close_orphans(self) -> None:
        """A reaped rank's links still open `grace` seconds on: if its node is gone (the
        master marked it down, and killed the ghost), whatever still holds them there is
        an orphan the master no longer answers for (a node daemon that is stopped rather
        than dead keeps them open): print what has come, close them. On a node that is
        up they stay open, checked every `grace` seconds, until what holds them ends
        (a background child of the program, say), as a local pipe would."""
        now = self.clock()
        gone: dict[int, bool] = {}              # asked once a round per node
        for proc in self._lingering():
            if now < self._next_check(proc):
                continue
            proc.checked_at = now
            if proc.node not in gone:
                gone[proc.node] = self.node_gone(proc.node)     # type: ignore[misc]
            if gone[proc.node]:
                for link in list(proc.links):
                    self._drain_and_close(link)

    def _drain_and_close(self, link: Link) -> None:
        """Read what is there now (DRAIN_MAX at most: an orphan may write for ever), then
        close the link as at its EOF."""
        total = 0
        while total < DRAIN_MAX and link in link.proc.links:
            n = self._read_output(link)
            if n <= 0:
                break
            total += n
        if link in link.proc.links:
            self._flush_partial(link, self.out if link.fd == 1 else self.err)
            self._close_output(link)

    def _advance(self) -> None:
        """Sequential mode: move to the next rank once the current one is settled."""
        if not self.opt.sequential:
            self.current = len(self.procs)
            return
        now = self.clock()
        while self.current < len(self.procs) and \
                self.procs[self.current].settled(now, self.grace):
            self.current += 1
            if self.opt.dividers and self.current < len(self.procs):
                self._divider()

    def _divider(self) -> None:
        self.out.write(f"{self.procs[self.current].node}\t{DIVIDER}\n".encode())

    def _update_interest(self) -> None:
        want = self.stdin.wants_input()
        if want != self._stdin_registered:
            assert self.stdin.fd is not None
            if want:
                self.sel.register(self.stdin.fd, EVENT_READ, self._on_stdin)
            else:
                self.sel.unregister(self.stdin.fd)
            self._stdin_registered = want
        shown = self.procs[self.current].rank \
            if self.opt.sequential and self.current < len(self.procs) else None
        for proc in self.procs:
            link = proc.stdin_link
            if link is not None:
                events = EVENT_READ
                if self.stdin.has_pending(proc):
                    events |= EVENT_WRITE
                self._watch(link, events, self._on_stdin_link)
            if shown is None or proc.rank == shown:
                for link in proc.links:
                    self._watch(link, EVENT_READ, self._on_output)

    def _watch(self, link: Link, events: int, handler: Callable[[Link, int], None]) -> None:
        if link.events == events:
            return
        callback = lambda ev, link=link: handler(link, ev)  # noqa: E731
        if link.events:
            self.sel.modify(link.sock, events, callback)
        else:
            self.sel.register(link.sock, events, callback)
        link.events = events

    # ---- connections ----------------------------------------------------------------

    def _on_accept(self, events: int) -> None:
        assert self.listener is not None
        while True:
            try:
                fd, _ = self.listener._accept()     # socket.accept without the wrapper
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._warn(f"accept: {os.strerror(e.errno or _errno.EIO)}")
                if e.errno not in (_errno.EMFILE, _errno.ENFILE, _errno.ECONNABORTED):
                    self.sel.unregister(self.listener)
                return
            lst = self.listener
            sock = _socket.socket(lst.family, lst.type, lst.proto, fd)
            sock.setblocking(False)
            got = bytearray()
            self.sel.register(sock, EVENT_READ,
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
        self.sel.unregister(sock)
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
                self._vector_failed(vec, header.errno, header.message)
        elif proc is None and vec is not None and not vec.failed:
            vec.held.append((header, sock))         # a rank's link, before the ranks link
        elif proc is None:
            sock.close()
        elif header.fd < 0:
            sock.close()
            self._migration_failed(proc, header.errno, header.message)
        elif header.fd not in proc.expect or proc.failed:
            if not proc.failed:
                self._warn(f"too many connections from pid {proc.pid} (fd {header.fd})")
            sock.close()
        else:
            proc.expect.discard(header.fd)
            self._attach(proc, header.fd, sock)

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
                self._warn("the master sent a bad ranks link; ignored")
            else:
                self._ranks(vec, ranks)
        self.sel.register(sock, EVENT_READ, more)

    def _ranks(self, vec: Vector, ranks: list[int]) -> None:
        """Every rank gets its ghost's PID; a rank that may not run says why."""
        self.vector = None
        for proc, pid in zip(vec.procs, ranks):
            if pid < 0:
                self._migration_failed(proc, -pid)
                proc.status, proc.reaped_at = 1 << 8, self.clock()   # as a failed ctl write
                continue
            proc.pid = pid
            self.by_pid[pid] = proc
            if pid == vec.writer and vec.status is not None:
                proc.status, proc.reaped_at = vec.status, vec.reaped_at
                self._close_stdin_link(proc)
        for header, sock in vec.held:
            self._dispatch(header, sock)
        self._sigchld = True                        # reap what ended meanwhile

    def _vector_failed(self, vec: Vector, err: int, reason: str = "") -> None:
        """Nothing runs anywhere: say so for every rank; the writer's end decides."""
        self._say_failed([p for p in vec.procs if not p.failed], err, reason)
        self._vector_dead(vec)

    def _vector_dead(self, vec: Vector) -> None:
        vec.failed = True
        for proc in vec.procs:
            self._give_up(proc)
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

    def _reap_writer(self, vec: Vector) -> None:
        try:
            pid, status = os.waitpid(vec.writer, os.WNOHANG)
        except ChildProcessError:
            pid, status = vec.writer, 255 << 8
        if pid:
            self._read_status()
            if self.vector is vec:
                vec.status, vec.reaped_at = status, self.clock()
                self._vector_settle(vec)

    def _attach(self, proc: Proc, fd: int, sock: _socket.socket) -> None:
        link = Link(sock, proc, fd)
        if fd == 0:
            if proc.status is not None or proc not in self.stdin.readers:
                sock.close()                        # too late: the process is gone
                return
            proc.stdin_link = link
            self._maybe_finish_stdin(proc)
        elif (fd == 1 and self.out.broken) or (fd == 2 and self.err.broken):
            sock.close()
        else:
            proc.links.append(link)

    def _drop(self, sock: _socket.socket) -> None:
        self.sel.unregister(sock)
        sock.close()

    def _migration_failed(self, proc: Proc, err: int, reason: str = "") -> None:
        if not proc.failed:
            self._say_failed([proc], err, reason)
        self._give_up(proc)

    def _say_failed(self, procs: list[Proc], err: int, reason: str = "") -> None:
        """bproc's `N: strerror` for each rank, after the master's reason (once) when it
        says more than that (see NODE_REFUSALS)."""
        lines = [f"{p.node}: {os.strerror(err)}" for p in procs]
        reason = one_line(reason)
        if reason and err not in NODE_REFUSALS and lines:
            lines.insert(0, f"{self.prog}: {reason}")
        if lines:
            self._warn_raw("\n".join(lines))

    def _give_up(self, proc: Proc) -> None:
        proc.failed = True
        self._close_stdin_link(proc)
        self.stdin.drop(proc)

    def _on_status(self, events: int) -> None:
        self._read_status()

    def _read_status(self) -> None:
        """Launch failure records from the children (see STAGE_*)."""
        if self.status_fd is None:
            return
        try:
            data = os.read(self.status_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.sel.unregister(self.status_fd)
            os.close(self.status_fd)
            self.status_fd = None
            return
        buf = self._status_buf
        buf += data
        while len(buf) >= _RECORD.size:
            rank, stage, err, n = _RECORD.unpack_from(buf)
            if len(buf) < _RECORD.size + n:
                break                               # the rest of it in the next read
            reason = buf[_RECORD.size:_RECORD.size + n].decode("utf-8", "replace")
            del buf[:_RECORD.size + n]
            self._launch_failed(rank, stage, err, reason)

    def _launch_failed(self, rank: int, stage: int, err: int, reason: str) -> None:
        vec = self.vector
        if rank == ALL_RANKS and vec is not None:
            if stage == STAGE_CTL:
                self._vector_failed(vec, err, reason)
            else:
                self._warn(f"{self.command}: {os.strerror(err)}")
                self._vector_dead(vec)
            return
        proc = next((p for p in self.procs if p.rank == rank), None)
        if stage != STAGE_CTL:
            self._warn(f"{self.command}: {os.strerror(err)}")
        elif proc is not None:
            self._say_failed([proc], err, reason)
        else:
            self._warn_raw(f"{rank}: {os.strerror(err)}")
        if proc is not None:
            self._give_up(proc)

    # ---- stdin ------------------------------------------------------------------------

    def _on_stdin(self, events: int) -> None:
        self.stdin.read()
        if self.stdin.eof:
            for proc in self.procs:
                self._maybe_finish_stdin(proc)

    def _on_stdin_link(self, link: Link, events: int) -> None:
        proc = link.proc
        if events & EVENT_READ:
            self._close_stdin_link(proc)            # the remote end went away
            return
        try:
            n = link.sock.send(self.stdin.pending(proc))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_stdin_link(proc)
            return
        self.stdin.consumed(proc, n)
        self._maybe_finish_stdin(proc)

    def _maybe_finish_stdin(self, proc: Proc) -> None:
        """At stdin's EOF, once a link has all of it: shutdown(SHUT_WR), watch for its close."""
        link = proc.stdin_link
        if link is None or not self.stdin.eof or self.stdin.has_pending(proc) \
                or proc not in self.stdin.readers:
            return
        try:
            link.sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass
        self.stdin.drop(proc)

    def _close_stdin_link(self, proc: Proc) -> None:
        self.stdin.drop(proc)
        link, proc.stdin_link = proc.stdin_link, None
        if link is not None:
            if link.events:
                self.sel.unregister(link.sock)
            link.sock.close()

    # ---- stdout and stderr ------------------------------------------------------------

    def _on_output(self, link: Link, events: int) -> None:
        self._read_output(link)

    def _read_output(self, link: Link) -> int:
        """One read of an output link, passed on: the bytes read, 0 at its EOF (then the
        link is closed), -1 if nothing was there."""
        try:
            n = link.sock.recv_into(self.chunk)
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError:
            n = 0
        sink = self.out if link.fd == 1 else self.err
        if n == 0:
            self._flush_partial(link, sink)
            self._close_output(link)
            return 0
        data = memoryview(self.chunk)[:n]
        if self.opt.line_buffered:
            self._lines(link, sink, data)
        else:
            sink.write(data)
        if sink.broken:
            self._close_broken(link.fd)
        return n

    def _lines(self, link: Link, sink: _Sink, data: memoryview) -> None:
        """Write whole lines only; a line longer than the buffer goes in buffer-sized pieces
        (with -p each piece gets the prefix and a newline, as bproc's do_line_buff_io)."""
        buf, size = link.pending, self.opt.buffer_size
        buf += data
        pre = self._prefix(link)
        out, start = [], 0
        while True:
            nl = buf.find(b"\n", start, start + size)
            if nl >= 0:
                out += (pre, buf[start:nl + 1])
                start = nl + 1
            elif len(buf) - start >= size:
                out += (pre, buf[start:start + size], b"\n" if pre else b"")
                start += size
            else:
                break
        del buf[:start]
        if out:
            sink.write(b"".join(out))

    def _prefix(self, link: Link) -> bytes:
        return b"%3d: " % link.proc.node if self.opt.prefix else b""

    def _flush_partial(self, link: Link, sink: _Sink) -> None:
        if link.pending:
            nl = b"\n" if self.opt.prefix else b""
            sink.write(self._prefix(link) + bytes(link.pending) + nl)
            link.pending.clear()

    def _close_output(self, link: Link) -> None:
        link.proc.links.remove(link)
        if link.events:
            self.sel.unregister(link.sock)
        link.sock.close()

    def _close_broken(self, fd: int) -> None:
        """Our stdout (or stderr) is a broken pipe: close every link that feeds it."""
        for proc in self.procs:
            for link in [lk for lk in proc.links if lk.fd == fd]:
                link.pending.clear()
                self._close_output(link)

    # ---- children and signals ---------------------------------------------------------

    def _reap(self) -> None:
        self._sigchld = False
        self._last_reap = self.clock()
        if self.vector is not None and self.vector.status is None:
            self._reap_writer(self.vector)      # once: a second waitpid finds no child
        for proc in self.procs:
            if proc.status is not None or not proc.pid:
                continue
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = proc.pid, 255 << 8    # reaped by someone else: unknown
            if pid:
                self._read_status()                 # a launch failure is written before exit
                proc.status, proc.reaped_at = status, self.clock()
                self._close_stdin_link(proc)

    def _on_wakeup(self, events: int) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except (BlockingIOError, InterruptedError):
            return
        for sig in data:
            if sig == _signal.SIGCHLD:
                self._sigchld = True
            elif sig in FORWARDED:
                self._forward(sig)

    def _forward(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == _signal.SIGINT and self.signals.count(_signal.SIGINT) >= 3:
            sig = _signal.SIGKILL
        elif sig in KEYBOARD and _in_foreground():
            sig = 0                         # the terminal sent it to our children too
        pids = [p.pid for p in self.procs if p.status is None and p.pid] if sig else []
        if self.vector is not None and self.vector.status is None:
            pids.append(self.vector.writer)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if self.signals[-1] == _signal.SIGTSTP:     # stop ourselves too, like a shell job;
            _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)    # SIGCONT is forwarded on resume
            os.kill(os.getpid(), _signal.SIGTSTP)
            _signal.signal(_signal.SIGTSTP, _noop)

    def _restore_signals(self) -> None:
        if self._wake_r < 0:
            return
        for sig, old in self._old_handlers.items():
            _signal.signal(sig, old)
        _signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    # ---- misc -------------------------------------------------------------------------

    def _warn(self, message: str) -> None:
        self._warn_raw(f"{self.prog}: {message}")

    def _warn_raw(self, line: str) -> None:
        self.err.write(f"{line}\n".encode())

    def _close_all(self) -> None:
        if self.vector is not None:
            for _, sock in self.vector.held:
                sock.close()
        for obj in self.sel.registered():
            if isinstance(obj, _socket.socket) and obj is not self.listener:
                obj.close()
        self.sel.close()
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None
        for proc in self.procs:
            for link in proc.links:
                link.sock.close()
            if proc.stdin_link is not None:
                proc.stdin_link.sock.close()


def _noop(signum: int, frame: object) -> None:
    """Signal handler: the work is done by the loop, woken through the wakeup fd."""


class _Poller:
    """What StdioServer used of selectors.PollSelector, on select.poll itself.

    register/modify/unregister take a socket or an fd (a closed socket is found by
    identity), with PollSelector's errors: KeyError for a second register or an unknown
    object, ValueError for bad events or fd. `select` returns (data, events) pairs; a
    hang-up or an error counts as both EVENT_READ and EVENT_WRITE, masked by what is
    watched, exactly as PollSelector reports them.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._map: dict[int, list[Any]] = {}        # fd -> [fileobj, events, data]

    @staticmethod
    def _fd(fileobj: Any) -> int:
        fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
        if fd < 0:
            raise ValueError(f"Invalid file descriptor: {fd}")
        return fd

    def _lookup(self, fileobj: Any) -> int:
        try:
            fd = self._fd(fileobj)
        except ValueError:
            fd = next((fd for fd, entry in self._map.items() if entry[0] is fileobj), -1)
        if fd not in self._map:
            raise KeyError(f"{fileobj!r} is not registered")
        return fd

    @staticmethod
    def _mask(events: int) -> int:
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        return (select.POLLIN if events & EVENT_READ else 0) | \
            (select.POLLOUT if events & EVENT_WRITE else 0)

    def register(self, fileobj: Any, events: int, data: Any = None) -> None:
        mask = self._mask(events)
        fd = self._fd(fileobj)
        if fd in self._map:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self._poll.register(fd, mask)
        self._map[fd] = [fileobj, events, data]

    def modify(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = self._lookup(fileobj)
        entry = self._map[fd]
        if events != entry[1]:
            try:
                self._poll.modify(fd, self._mask(events))
            except BaseException:
                self.unregister(fileobj)
                raise
        entry[1:] = [events, data]

    def unregister(self, fileobj: Any) -> None:
        fd = self._lookup(fileobj)
        del self._map[fd]
        try:
            self._poll.unregister(fd)
        except (OSError, KeyError):
            pass                    # the fd was closed since it was registered

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is not None:
            timeout = 0 if timeout <= 0 else math.ceil(timeout * 1e3)
        try:
            ready = self._poll.poll(timeout)
        except InterruptedError:
            return []
        out = []
        for fd, got in ready:
            events = (EVENT_WRITE if got & ~select.POLLIN else 0) | \
                (EVENT_READ if got & ~select.POLLOUT else 0)
            entry = self._map.get(fd)
            if entry is not None:
                out.append((entry[2], events & entry[1]))
        return out

    def registered(self) -> list[Any]:
        return [entry[0] for entry in self._map.values()]

    def close(self) -> None:
        self._map.clear()

"""bpsh's stdin, broadcast to every rank's fd-0 link.

What is read from bpsh's stdin goes to every fd-0 link. The buffer is kept until every
process that may still connect its stdin has consumed it (so a node that connects late
still gets all of stdin, as in bproc); reading stops while the buffer is full. At EOF
each stdin link gets shutdown(SHUT_WR) once it has everything. Data or EOF arriving *on*
a stdin link closes it (the process is gone). Errors on a link close that link only.

A process that moves makes its fd-0 link again (`relink`) with CONSUMED, the bytes of
its stdin stream it had read (the stream of every process starts at our stdin's first
byte): nothing more goes to the old link, and the new one gets the stream again from
CONSUMED. The old link is kept (`Proc.stdin_parked`) until its EOF (the old node
dropped its copy): if the new one ends first, the move failed after the new node
connected, and the process goes on with the old link from where it was. So what was sent may still be unread: the last `replay` bytes (STDIN_REPLAY)
behind the slowest reader are kept too. A CONSUMED older than that, or beyond what was
ever read, closes the new link (the process sees EOF) and is said once per run.
A server that is not the process's launcher (the relay) reads its stdin only once a
stdin link has come (`lazy`): until then the process may still be reading it itself.
"""

from __future__ import annotations

import _socket
import os
from bpfs.cli.bpsh.links import watch
from bpfs.cli.bpsh.output import RAW_CHUNK
from bpfs.cli.bpsh.poller import EVENT_READ, EVENT_WRITE
TYPE_CHECKING = False  # typing costs start-up; annotations only
if TYPE_CHECKING:
    from typing import Callable
    from bpfs.cli.bpsh.links import Link, Proc
    from bpfs.cli.bpsh.poller import Poller

STDIN_BUFFER = 4 << 20          # the most of stdin held for slow readers
STDIN_REPLAY = 16 << 20         # the most kept of what was sent, for a moved process


class Stdin:
    """The broadcast buffer (an absolute offset per reader, trimmed to the slowest) and
    the fd-0 links of `procs` (shared with the server)."""

    def __init__(self, fd: int | None, capacity: int, sel: Poller, procs: list[Proc],
                 warn: Callable[[str], None], replay: int = STDIN_REPLAY,
                 lazy: bool = False) -> None:
        self.fd = fd
        self.capacity = capacity
        self.replay = replay
        self.sel = sel
        self.procs = procs
        self.warn = warn
        self.buf = bytearray()
        self.base = 0               # absolute offset of buf[0]
        self.eof = fd is None
        self.readers: dict[Proc, int] = {}      # proc -> absolute offset it has been sent
        self.linked = not lazy      # lazy: no stdin read before a stdin link came
        self._registered = False
        self._warned = False

    # ---- the buffer -------------------------------------------------------------------

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def add_reader(self, proc: Proc) -> None:
        self.readers[proc] = self.base

    def wants_input(self) -> bool:
        return not self.eof and self.linked and bool(self.readers) and \
            self.end - min(self.readers.values()) < self.capacity

    def read(self) -> None:
        assert self.fd is not None
        try:
            room = self.capacity - (self.end - min(self.readers.values(), default=self.end))
            data = os.read(self.fd, max(1, min(RAW_CHUNK, room)))
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
        """Keep what someone has yet to be sent, and the last `replay` bytes before it."""
        low = min(self.readers.values(), default=self.end) - self.replay
        if low > self.base:
            del self.buf[:low - self.base]
            self.base = low

    # ---- the links --------------------------------------------------------------------

    def attach(self, link: Link) -> None:
        """A rank's fd-0 link has come (closed if the process is gone already)."""
        proc = link.proc
        if proc.status is not None or proc not in self.readers:
            link.sock.close()                       # too late: the process is gone
            return
        proc.stdin_link = link
        self.linked = True
        self.maybe_finish(proc)

    def relink(self, link: Link, consumed: int) -> None:
        """`link` is the fd-0 link of a process that moved and had read `consumed` bytes:
        the old link gets nothing more, the new one the stream from `consumed` on."""
        proc = link.proc
        if proc.status is not None:
            link.sock.close()                       # too late: the process is gone
            return
        if not self.base <= consumed <= self.end:
            link.sock.close()
            self.close_link(proc)
            if not self._warned:
                self._warned = True
                self.warn(f"pid {proc.pid} moved having read {consumed} bytes of stdin, "
                          f"but bytes {self.base}-{self.end} are all that is kept; "
                          "its stdin is closed")
            return
        self._park(proc)                            # the old one, if still open
        self.readers[proc] = consumed
        self.attach(link)

    def _park(self, proc: Proc) -> None:
        """Write no more to `proc`'s stdin link, but keep it until its EOF: if the new
        link ends first, the move failed and the process goes on with this one."""
        old = proc.stdin_link
        if old is None:
            return
        self._close_parked(proc)                    # a move before: long over
        proc.stdin_link = None
        proc.stdin_parked = (old, self.readers.get(proc))
        if old.events:
            self.sel.unregister(old.sock)
            old.events = 0
        watch(self.sel, old, EVENT_READ, self._on_parked)

    def _on_parked(self, link: Link, events: int) -> None:
        """The old link has ended (its node dropped its copy): the move is over."""
        parked = link.proc.stdin_parked
        if parked is not None and parked[0] is link:
            self._close_parked(link.proc)

    def _close_parked(self, proc: Proc) -> None:
        if proc.stdin_parked is not None:
            old = proc.stdin_parked[0]
            proc.stdin_parked = None
            if old.events:
                self.sel.unregister(old.sock)
            old.sock.close()

    def _unpark(self, proc: Proc) -> None:
        """The new link ended while the old one is still open: the process did not move
        (or ended at once): back to the old link, from where it was."""
        assert proc.stdin_parked is not None
        old, sent = proc.stdin_parked
        proc.stdin_parked = None
        new, proc.stdin_link = proc.stdin_link, None
        if new is not None:
            if new.events:
                self.sel.unregister(new.sock)
            new.sock.close()
        self.sel.unregister(old.sock)
        old.events = 0
        if sent is None:
            self.drop(proc)                         # it had all of stdin already
        elif sent >= self.base:
            self.readers[proc] = sent
        else:
            old.sock.close()
            self.drop(proc)
            return
        proc.stdin_link = old

    def update_interest(self) -> None:
        """Read our stdin while someone wants it; write to the links that lack some."""
        want = self.wants_input()
        if want != self._registered:
            assert self.fd is not None
            if want:
                self.sel.register(self.fd, EVENT_READ, self._on_input)
            else:
                self.sel.unregister(self.fd)
            self._registered = want
        for proc in self.procs:
            link = proc.stdin_link
            if link is not None:
                events = EVENT_READ
                if self.has_pending(proc):
                    events |= EVENT_WRITE
                watch(self.sel, link, events, self._on_link)

    def _on_input(self, events: int) -> None:
        self.read()
        if self.eof:
            for proc in self.procs:
                self.maybe_finish(proc)

    def _on_link(self, link: Link, events: int) -> None:
        proc = link.proc
        if events & EVENT_READ:
            self._gone(proc)                        # the remote end went away
            return
        try:
            n = link.sock.send(self.pending(proc))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._gone(proc)
            return
        self.consumed(proc, n)
        self.maybe_finish(proc)

    def maybe_finish(self, proc: Proc) -> None:
        """At stdin's EOF, once a link has all of it: shutdown(SHUT_WR), watch for its close."""
        link = proc.stdin_link
        if link is None or not self.eof or self.has_pending(proc) or proc not in self.readers:
            return
        try:
            link.sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass
        self.drop(proc)

    def _gone(self, proc: Proc) -> None:
        if proc.stdin_parked is not None:
            self._unpark(proc)
        else:
            self.close_link(proc)

    def close_link(self, proc: Proc) -> None:
        """No more stdin for `proc`: its link (if any) closed, its place in the buffer freed."""
        self._close_parked(proc)
        self.drop(proc)
        link, proc.stdin_link = proc.stdin_link, None
        if link is not None:
            if link.events:
                self.sel.unregister(link.sock)
            link.sock.close()

"""bpsh's stdout and stderr: what comes back on the output links, written out.

-L (whole lines), -p (the "%3d: " node prefix), -s (in node order), -d (bproc's divider
line) and -b (the line buffer's size) are `OutputOptions`. Without -L the links are
copied unbuffered (big reads, `os.write`). If bpsh's stdout is a broken pipe, every link
that feeds it is closed, so the remote programs get EPIPE as in a local pipeline.
An output link made again after a move waits in `Proc.queued` until the link it
replaces is at EOF (or reset: what came before the reset counts); then it is read, a
partial line of the old one (-L) carried over, so nothing is reordered.
Errors: OSErrors of our own stdout/stderr other than EPIPE propagate to the caller.
"""

from __future__ import annotations

import mmap
import os
import select
from bpfs.record import record
TYPE_CHECKING = False  # typing costs start-up; annotations only
if TYPE_CHECKING:
    from bpfs.cli.bpsh.links import Link, Proc
    from bpfs.cli.bpsh.poller import Poller

DIVIDER = "-" * 69
RAW_CHUNK = 1 << 20             # read size for unbuffered output links
DRAIN_MAX = 64 << 20            # the most read from a gone node's link before it is closed


@record
class OutputOptions:
    """bpsh's -L, -p, -s, -d and -b."""
    line_buffered: bool = False
    prefix: bool = False
    sequential: bool = False
    dividers: bool = False
    buffer_size: int = 4096


class Sink:
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


class Output:
    """The output links of every rank (`procs`, shared with the server) to our two sinks."""

    def __init__(self, options: OutputOptions, stdout_fd: int, stderr_fd: int,
                 sel: Poller, procs: list[Proc], prog: str) -> None:
        self.opt = options
        self.out, self.err = Sink(stdout_fd), Sink(stderr_fd)
        self.sel = sel
        self.procs = procs
        self.prog = prog
        # an anonymous mapping: its pages come as output does (a bytearray is zeroed
        # at once: 0.6 ms of a relay's or a short bpsh run's start for 1 MB)
        self.chunk = mmap.mmap(-1, max(RAW_CHUNK, options.buffer_size))

    def sink(self, fd: int) -> Sink:
        return self.out if fd == 1 else self.err

    def warn(self, message: str) -> None:
        self.say(f"{self.prog}: {message}")

    def say(self, line: str) -> None:
        """One line of bpsh's own on stderr."""
        self.err.write(f"{line}\n".encode())

    def divider(self, node: int) -> None:
        self.out.write(f"{node}\t{DIVIDER}\n".encode())

    def on_output(self, link: Link, events: int) -> None:
        self.read(link)

    def read(self, link: Link) -> int:
        """One read of an output link, passed on: the bytes read, 0 at its EOF (then the
        link is closed), -1 if nothing was there."""
        try:
            n = link.sock.recv_into(self.chunk)
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError:
            n = 0
        sink = self.sink(link.fd)
        if n == 0:
            nxt = self.successor(link)
            if nxt is not None:                     # the same stream goes on there
                nxt.pending[:0] = link.pending
                link.pending.clear()
            self.flush_partial(link)
            self.close(link)
            return 0
        data = memoryview(self.chunk)[:n]
        if self.opt.line_buffered:
            self._lines(link, sink, data)
        else:
            sink.write(data)
        if sink.broken:
            self._close_broken(link.fd)
        return n

    def _lines(self, link: Link, sink: Sink, data: memoryview) -> None:
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

    def flush_partial(self, link: Link) -> None:
        if link.pending:
            nl = b"\n" if self.opt.prefix else b""
            self.sink(link.fd).write(self._prefix(link) + bytes(link.pending) + nl)
            link.pending.clear()

    @staticmethod
    def successor(link: Link) -> Link | None:
        """The link made again for the same stream, waiting behind `link`."""
        return next((q for q in link.proc.queued if q.fd == link.fd), None)

    def close(self, link: Link) -> None:
        """Close an output link; the stream's next link (a move's) is read from now on."""
        proc = link.proc
        proc.links.remove(link)
        if link.events:
            self.sel.unregister(link.sock)
        link.sock.close()
        nxt = self.successor(link)
        if nxt is not None:
            proc.queued.remove(nxt)
            proc.links.append(nxt)

    def _close_broken(self, fd: int) -> None:
        """Our stdout (or stderr) is a broken pipe: close every link that feeds it."""
        for proc in self.procs:
            for link in [lk for lk in proc.queued if lk.fd == fd]:
                proc.queued.remove(link)
                link.sock.close()
            for link in [lk for lk in proc.links if lk.fd == fd]:
                link.pending.clear()
                self.close(link)

    def drain_and_close(self, link: Link) -> None:
        """Read what is there now (DRAIN_MAX at most: an orphan may write for ever), then
        close the link as at its EOF."""
        total = 0
        while total < DRAIN_MAX and link in link.proc.links:
            n = self.read(link)
            if n <= 0:
                break
            total += n
        if link in link.proc.links:
            self.flush_partial(link)
            self.close(link)

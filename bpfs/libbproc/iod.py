"""The library's I/O forwarder (BProc's iod): it carries the output of the processes a
program started with execmove or vexecmove back to that program's stdout.

    python -m bpfs.libbproc.iod LISTEN_FD CONTROL_FD RESULT_FD TOKEN

BProc 4 gave a process that moved without an I/O list (bproc_execmove, bproc_vexecmove)
/dev/null for stdin and its stdout and stderr together on one link back to the caller's
stdout. bpfs does the same with an execmove request of `--stdin null --stdout socket
--stderr stdout` (bpfs.wire.execreq): the node connects one link per process back to a
port of the caller's. The caller cannot serve it (after execmove's execve it *is* the
ghost; after vexecmove it goes on with its own work), so it listens, then starts this
program in a session of its own (the terminal's Ctrl-C is for the job, not for it; its
parent is init once the caller's intermediate child has exited), and hands it:

    LISTEN_FD    the listening socket whose port the request names
    CONTROL_FD   lines from the caller: "pid P" (a process to wait for), "quit" (the
                 request was refused: stop now); EOF: the caller exec'd or ended
    RESULT_FD    where a ranks link's body goes, as one line "ranks R R ...\n" (a
                 multi-node request: bpfs.wire.execreq), or -1
    TOKEN        the request's token: a connection that does not send it is dropped
    fd 1, fd 2   the caller's stdout (output) and stderr (a failed migration's reason)

Links are copied to fd 1 as they come (fd 2 for a link of fd 2), an `err` header is
written to fd 2 as `bproc: REASON`. It exits once every process it was told of, and
every rank of a ranks link, has ended and their links have reached EOF, or when nothing
came for LINGER seconds after the last end (a background child on a node that keeps a
link open does not keep it forever); at once on "quit", or on EOF of CONTROL_FD before
any "pid". An error on one link closes that link; EPIPE on fd 1 closes every link.
"""

from __future__ import annotations

import _signal
import _socket
import errno
import os
import select
import sys
import time

# `_socket` and `_signal`, not `socket` and `signal` (their enums cost start-up time): it
# starts for every execmove whose output it carries, as bpsh does for every run.
from bpfs.wire.execreq import HEADER_MAX, RANKS_FD, parse_header

LINGER = 2.0
READ = 65536


class Forwarder:
    def __init__(self, listener: _socket.socket, control: int, result: int, token: str) -> None:
        self.listener, self.control, self.result, self.token = listener, control, result, token
        self.poll = select.poll()
        self.conns: dict[int, tuple[_socket.socket, bytearray]] = {}   # fd -> (sock, header)
        self.links: dict[int, tuple[_socket.socket, int]] = {}         # fd -> (sock, out fd)
        self.ranks: dict[int, tuple[_socket.socket, bytearray]] = {}
        self.pidfds: dict[int, int] = {}                               # pidfd -> pid
        self.told = False               # a pid was ever given
        self.quit = False
        self.last = time.monotonic()
        for fd in (listener.fileno(), control):
            self.poll.register(fd, select.POLLIN)

    def run(self) -> None:
        while not self._done():
            timeout = None if self.pidfds or self.control >= 0 else LINGER * 1000 / 4
            for fd, _ in self.poll.poll(timeout):
                self._ready(fd)

    def _done(self) -> bool:
        if self.quit:
            return True
        if self.control >= 0 or self.pidfds:
            return False
        if not self.told:
            return True
        if time.monotonic() - self.last > LINGER:
            return True
        # A process's link connects before the process runs (the node opens it first), so
        # once every process has ended its link is ours or waits in the listen queue.
        return not (self.conns or self.links or self.ranks or self._waiting())

    def _waiting(self) -> bool:
        """A connection in the listen queue, not accepted yet."""
        poll = select.poll()
        poll.register(self.listener.fileno(), select.POLLIN)
        return bool(poll.poll(0))

    def _ready(self, fd: int) -> None:
        self.last = time.monotonic()
        if fd == self.listener.fileno():
            self._accept()
        elif fd == self.control:
            self._read_control()
        elif fd in self.pidfds:
            self.poll.unregister(fd)
            os.close(fd)
            del self.pidfds[fd]
        elif fd in self.conns:
            self._read_header(fd)
        elif fd in self.links:
            self._copy(fd)
        elif fd in self.ranks:
            self._read_ranks(fd)

    def _accept(self) -> None:
        try:
            fd, _ = self.listener._accept()     # socket.accept without the wrapper
        except OSError:
            return
        sock = _socket.socket(fileno=fd)
        self.conns[sock.fileno()] = (sock, bytearray())
        self.poll.register(sock.fileno(), select.POLLIN)

    def _read_control(self) -> None:
        data = os.read(self.control, 4096)
        if not data:
            self.poll.unregister(self.control)
            os.close(self.control)
            self.control = -1
            return
        for line in data.decode("ascii", "replace").splitlines():
            word, _, arg = line.partition(" ")
            if word == "quit":
                self.quit = True
            elif word == "pid" and arg.isdigit():
                self.watch(int(arg))

    def watch(self, pid: int) -> None:
        self.told = True
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return                      # already gone
        self.pidfds[fd] = pid
        self.poll.register(fd, select.POLLIN)

    def _read_header(self, fd: int) -> None:
        sock, buf = self.conns[fd]
        data = _recv(sock)
        buf += data
        if b"\n" not in buf:
            if not data or len(buf) > HEADER_MAX:
                self._drop(fd)
            return
        line, _, rest = bytes(buf).partition(b"\n")
        header = parse_header(line + b"\n", self.token)
        del self.conns[fd]
        if header is None:
            self.poll.unregister(fd)
            sock.close()
        elif header.fd == -1:
            _write_all(2, f"bproc: {header.message or os.strerror(header.errno)}\n".encode())
            self.poll.unregister(fd)
            sock.close()
        elif header.fd == RANKS_FD:
            self.ranks[fd] = (sock, bytearray(rest))
        else:
            self.links[fd] = (sock, 2 if header.fd == 2 else 1)
            if rest:
                self._out(fd, rest)

    def _read_ranks(self, fd: int) -> None:
        sock, body = self.ranks[fd]
        data = _recv(sock)
        if data and len(body) < 16 * 65536:
            body += data
            return
        del self.ranks[fd]
        self.poll.unregister(fd)
        sock.close()
        words = body.decode("ascii", "replace").split()
        if self.result >= 0:
            _write_all(self.result, ("ranks " + " ".join(words) + "\n").encode())
        for w in words:
            if w.isdigit():
                self.watch(int(w))

    def _copy(self, fd: int) -> None:
        sock, _ = self.links[fd]
        data = _recv(sock)
        if not data:
            self._drop(fd)
            return
        self._out(fd, data)

    def _out(self, fd: int, data: bytes) -> None:
        out = self.links[fd][1]
        try:
            _write_all(out, data)
        except OSError as e:
            if e.errno == errno.EPIPE and out == 1:
                for other in [f for f, (_, o) in self.links.items() if o == 1]:
                    self._drop(other)
            else:
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        for table in (self.conns, self.links, self.ranks):
            entry = table.pop(fd, None)
            if entry is not None:
                self.poll.unregister(fd)
                entry[0].close()


def _recv(sock: _socket.socket) -> bytes:
    try:
        return sock.recv(READ)
    except OSError:
        return b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(argv: list[str]) -> int:
    listen_fd, control, result, token = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    listener = _socket.socket(fileno=listen_fd)
    Forwarder(listener, control, result, token).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

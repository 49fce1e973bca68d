"""bpsh's stdio server: forward the children's stdio, reap them, time out (docs/bpsh.md).

One `StdioServer` serves one bpsh run. It knows the run's processes (`add_process`:
rank, node, PID, which of fds 0/1/2 come back as links), then `run()` loops until every
process is reaped and every output link it will ever get has reached EOF. It owns the
loop, the children's ends (SIGCHLD, the launch failures on the status pipe, links that
outlive their process) and bpsh's signals, and composes the helpers that hold the rest:
`links.Links` (the listener, headers, the ranks link), `output.Output` (-L/-p/-s/-d/-b,
a broken stdout), `stdin.Stdin` (the broadcast to fd-0 links), `poller.Poller`.

The relay (bpfs.cli.bpsh.relay) is this server for a process that is not our child
(`own_children=False`): no signal is caught or forwarded, its end is its pidfd
(`add_process(..., pidfd=)`), and stdin is read only once its stdin link has come.

Errors: OSErrors from our own stdout/stderr other than EPIPE propagate to the caller;
errors on a link close that link only.
"""

from __future__ import annotations

# The C modules on purpose: `socket`, `signal` and `selectors` wrap them with enums and
# import `enum`, `functools`, `collections`... (bench/results-startup.md). So: `_socket`
# sockets (socket.socket is a subclass: callers may pass either), `_signal` (plain ints),
# and poller.Poller on select.poll in place of selectors.PollSelector.
import _signal
import _socket
import os
import time
from bpfs.child import ALL_RANKS, CTL, Report
from bpfs.cli.bpsh.links import Links, Proc, Vector, watch
from bpfs.cli.bpsh.output import Output, OutputOptions
from bpfs.cli.bpsh.poller import EVENT_READ, Poller
from bpfs.cli.bpsh.stdin import STDIN_BUFFER, Stdin
TYPE_CHECKING = False  # typing costs start-up; annotations only
if TYPE_CHECKING:
    from typing import Callable

__all__ = ["LATE_GRACE", "LOCAL", "TERMINATING", "StdioServer"]

LATE_GRACE = 1.0                # seconds to wait for links of an already reaped PID, and
                                # between checks of the node of a reaped PID's open links
LOCAL = -1                      # the node number of a process bpsh runs here
FORWARDED = (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM, _signal.SIGHUP,
             _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGCONT, _signal.SIGTSTP)
TERMINATING = (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM, _signal.SIGHUP)
KEYBOARD = (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTSTP)     # a terminal's, to a group

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


class StdioServer:
    """Serves one bpsh run; see the module docstring. Use from the main thread."""

    def __init__(self, listener: _socket.socket | None, token: str,
                 options: OutputOptions | None = None, *, stdin_fd: int | None = 0,
                 stdout_fd: int = 1, stderr_fd: int = 2, status_fd: int | None = None,
                 command: str = "", prog: str = "bpsh", late_grace: float | None = None,
                 node_gone: Callable[[int], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 own_children: bool = True) -> None:
        self.opt = options or OutputOptions()
        self.status_fd = status_fd
        self.command = command
        self.grace = LATE_GRACE if late_grace is None else late_grace
        self.node_gone = node_gone
        self.clock = clock
        self.procs: list[Proc] = []
        self.sel = Poller()                     # poll, unlike epoll, takes regular files
        self.output = Output(self.opt, stdout_fd, stderr_fd, self.sel, self.procs, prog)
        self.own_children = own_children
        self.stdin = Stdin(stdin_fd, max(STDIN_BUFFER, self.opt.buffer_size), self.sel,
                           self.procs, self.output.warn, lazy=not own_children)
        self.links = Links(self, listener, token)
        self.current = 0                        # sequential: index of the rank being shown
        self.signals: list[int] = []            # signals bpsh received, in order
        self.sigchld = True                     # reap at the next turn of the loop
        self._wake_r = self._wake_w = -1
        self._last_reap = 0.0
        self._status_buf = bytearray()          # a partial failure record

    # ---- set-up ---------------------------------------------------------------------

    def add_process(self, rank: int, node: int, pid: int, expect: set[int],
                    pidfd: int | None = None) -> Proc:
        """Register a child; `expect` holds the fds (0, 1, 2) it will connect back.
        PID 0: not known yet (a rank of a multi-node run, see add_vector). `pidfd`: not
        a child of ours (the relay's process), ended when its pidfd says so; the server
        owns the pidfd from now on."""
        proc = Proc(rank, node, pid, set(expect), sockets=set(expect))
        if pidfd is not None:
            proc.pidfd = pidfd
            self.sel.register(pidfd, EVENT_READ, lambda ev, proc=proc: self._ended(proc))
        self.procs.append(proc)
        self.links.add(proc)
        if 0 in proc.expect:
            self.stdin.add_reader(proc)
        return proc

    def add_vector(self, ranks: list[tuple[int, int]], writer: int, expect: set[int]) -> None:
        """A multi-node run: `ranks` are (rank, node) pairs, `writer` the one child forked;
        each rank's PID comes with the ranks link."""
        self.links.vector = Vector(writer, [self.add_process(rank, node, 0, expect)
                                            for rank, node in ranks])

    def add_link(self, proc: Proc, fd: int, sock: _socket.socket) -> None:
        """A link that exists already (a local child's socketpair end)."""
        sock.setblocking(False)
        proc.expect.discard(fd)
        self.links.attach(proc, fd, sock)

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
        if self.own_children:
            self.install_signals()
        try:
            if self._wake_r >= 0:
                self.sel.register(self._wake_r, EVENT_READ, self._on_wakeup)
            listener = self.links.listener
            if listener is not None:
                listener.setblocking(False)
                self.sel.register(listener, EVENT_READ, self.links.on_accept)
            if self.status_fd is not None:
                self.sel.register(self.status_fd, EVENT_READ, self._on_status)
            if self.opt.dividers and self.procs:
                self.output.divider(self.procs[self.current].node)
            while True:
                if self.sigchld or self.clock() - self._last_reap >= 1.0:
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
        vec = self.links.vector
        if vec is not None and vec.status is not None and now >= vec.reaped_at + self.grace:
            self.links.vector_dead(vec)     # the writer ended and no ranks link came
        return self.current >= len(self.procs) and all(
            p.settled(now, self.grace) for p in self.procs)

    def _timeout(self) -> float:
        now = self.clock()
        waits = [p.reaped_at + self.grace - now for p in self.procs
                 if p.status is not None and not p.failed and p.expect - {0}]
        waits += [self._next_check(p) - now for p in self._lingering()]
        vec = self.links.vector
        if vec is not None and vec.status is not None:
            waits.append(vec.reaped_at + self.grace - now)
        if waits:
            return max(0.0, min(waits)) + 0.001
        return 1.0      # a backstop for a lost SIGCHLD

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
                self.output.divider(self.procs[self.current].node)

    def _update_interest(self) -> None:
        self.stdin.update_interest()
        shown = self.procs[self.current].rank \
            if self.opt.sequential and self.current < len(self.procs) else None
        for proc in self.procs:
            if shown is None or proc.rank == shown:
                for link in proc.links:
                    watch(self.sel, link, EVENT_READ, self.output.on_output)

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
                    self.output.drain_and_close(link)

    # ---- launch failures --------------------------------------------------------------

    def _on_status(self, events: int) -> None:
        self.read_status()

    def read_status(self) -> None:
        """Launch failure records from the children (bpfs.child.Report)."""
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
        while (report := Report.take(buf)) is not None:     # the rest in the next read
            self._launch_failed(report)

    def _launch_failed(self, report: Report) -> None:
        rank, stage, err, reason = report.rank, report.stage, report.errno, report.reason
        links, vec = self.links, self.links.vector
        if rank == ALL_RANKS and vec is not None:
            if stage == CTL:
                links.vector_failed(vec, err, reason)
            else:
                self.output.warn(f"{self.command}: {os.strerror(err)}")
                links.vector_dead(vec)
            return
        proc = next((p for p in self.procs if p.rank == rank), None)
        if stage != CTL:
            self.output.warn(f"{self.command}: {os.strerror(err)}")
        elif proc is not None:
            links.say_failed([proc], err, reason)
        else:
            self.output.say(f"{rank}: {os.strerror(err)}")
        if proc is not None:
            links.give_up(proc)

    # ---- children and signals ---------------------------------------------------------

    def _reap(self) -> None:
        self.sigchld = False
        self._last_reap = self.clock()
        vec = self.links.vector
        if vec is not None and vec.status is None:
            self.links.reap_writer(vec)         # once: a second waitpid finds no child
        for proc in self.procs:
            if proc.status is not None or not proc.pid or proc.pidfd >= 0:
                continue
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = proc.pid, 255 << 8    # reaped by someone else: unknown
            if pid:
                self.read_status()                  # a launch failure is written before exit
                proc.status, proc.reaped_at = status, self.clock()
                self.stdin.close_link(proc)

    def _ended(self, proc: Proc) -> None:
        """A process that is not our child has ended (its pidfd is readable): its status
        is not ours to know (0); its links are read to their EOF as a child's."""
        self.sel.unregister(proc.pidfd)
        os.close(proc.pidfd)
        proc.pidfd = -1
        proc.status, proc.reaped_at = 0, self.clock()
        self.stdin.close_link(proc)

    def _on_wakeup(self, events: int) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except (BlockingIOError, InterruptedError):
            return
        for sig in data:
            if sig == _signal.SIGCHLD:
                self.sigchld = True
            elif sig in FORWARDED:
                self._forward(sig)

    def _forward(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == _signal.SIGINT and self.signals.count(_signal.SIGINT) >= 3:
            sig = _signal.SIGKILL
        elif sig in KEYBOARD and _in_foreground():
            sig = 0                         # the terminal sent it to our children too
        pids = [p.pid for p in self.procs if p.status is None and p.pid] if sig else []
        vec = self.links.vector
        if vec is not None and vec.status is None:
            pids.append(vec.writer)
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

    def _close_all(self) -> None:
        self.links.close_held()
        for obj in self.sel.registered():
            if isinstance(obj, _socket.socket) and obj is not self.links.listener:
                obj.close()
        self.sel.close()
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None
        for proc in self.procs:
            for link in proc.links + proc.queued:
                link.sock.close()
            if proc.pidfd >= 0:
                os.close(proc.pidfd)
                proc.pidfd = -1
            if proc.stdin_link is not None:
                proc.stdin_link.sock.close()
            if proc.stdin_parked is not None:
                proc.stdin_parked[0].sock.close()


def _noop(signum: int, frame: object) -> None:
    """Signal handler: the work is done by the loop, woken through the wakeup fd."""

"""The master's ptrace thread: one thread makes every ptrace request for its ghosts.

The methods of `Tracer` queue work (a Future each) and ring the doorbell, a parked child
whose signal wakes the thread's blocking `waitid`; the thread peeks at every event of its
tracees, consumes it and hands it to the ghost state machine (`bpfs.migrate.ghost.Ghosts`).
At stop every tracee is killed and its end consumed. The API, how the thread waits and
its rules for the hosting process are in docs/ghosts.md.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import shutil
import signal as _signal
import threading
import time
from collections import deque
from typing import Any, Callable

from bpfs.errors import BpfsError
from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.ghost import Ghosts, check_finish
from bpfs.migrate.tracee import (CAPTURING, STEP_SIGNAL, MOVE_HELD, MOVING, RELEASING, SEIZED,
                                 as_error, kill_and_reap, resolve, send_kill)
from bpfs.migrate.image import Image
from bpfs.migrate.spawn import spawn_traced

log = logging.getLogger(__name__)

Future = concurrent.futures.Future
WNOTHREAD = 0x20000000
PEEK = os.WEXITED | os.WSTOPPED | os.WNOWAIT | pt.WALL | WNOTHREAD
ENDED = (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED)
POLL_MIN, POLL_MAX, STRANGER_POLL = 0.0001, 0.002, 0.1
DOORBELL_NAME = b"bpfs-doorbell"
RELEASE_WAIT = 0.5       # at stop(): how long a releasing stranger's stop is waited for


class _Doorbell:
    """A parked child of the tracer thread; a signal to it wakes the thread's waitid."""

    def __init__(self) -> None:
        pid = spawn_traced([shutil.which("true") or "/bin/true"], {}, "/")
        try:
            gp.wait_stop(pid)  # SIGTRAP after its execve
            pt.setoptions(pid, pt.O_EXITKILL)
            gp.park(pid, [], DOORBELL_NAME)
            self.fd = os.pidfd_open(pid)
        except BaseException:
            kill_and_reap(pid)
            raise
        self.pid = pid
        self._lock = threading.Lock()
        self._open = True

    def ring(self) -> None:
        """Wake the tracer thread (any thread may call this)."""
        with self._lock:
            if self._open:
                try:
                    _signal.pidfd_send_signal(self.fd, _signal.SIGUSR1)
                except ProcessLookupError:
                    pass  # it died: its end wakes the tracer anyway

    def answer(self) -> bool:
        """Consume its event and park it again; False if it died (it is reaped then)."""
        status = pt.wait(self.pid)
        if not os.WIFSTOPPED(status):
            self.close(reaped=True)
            return False
        try:
            pt.cont(self.pid, 0)
        except MigrateError as exc:
            if exc.errno != errno.ESRCH:
                raise
        return True

    def close(self, reaped: bool = False) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            os.close(self.fd)
        if not reaped:
            kill_and_reap(self.pid)


class Tracer:
    """The ptrace thread of the master: seizes, captures and holds ghosts (see module doc)."""

    def __init__(self, on_signal: Callable[[int, int], None],
                 on_exit: Callable[[int, int], None],
                 on_keyboard: Callable[[int, int], None] | None = None) -> None:
        self._ghosts = Ghosts(on_signal, on_exit, on_keyboard)
        self._lock = threading.Lock()  # guards _queue, _rung, _closing
        self._queue: deque[tuple[Callable[[], None], Future | None]] = deque()
        self._rung = False
        self._closing = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._started: Future = Future()
        # tracer-thread state
        self._tracees = self._ghosts.tracees   # the same dict: whom the thread waits for
        self._bell: _Doorbell | None = None
        self._stopping = False
        self._stranger_until = 0.0
        self._strangers: set[int] = set()
        self._interval = POLL_MIN
        self.park_rss = self._ghosts.park_rss  # the same dict (see docs/ghosts.md)

    # ---- life ----

    def start(self) -> None:
        """Start the tracer thread; raises MigrateError if its doorbell cannot be made."""
        if self._thread is not None:
            raise RuntimeError("Tracer.start() called twice")
        self._thread = threading.Thread(target=self._main, name="bpfs-tracer", daemon=True)
        self._thread.start()
        self._started.result()

    def stop(self) -> None:
        """SIGKILL every tracee (ghosts and seized processes), consume their ends, join."""
        thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("Tracer.stop() called from the tracer thread")
        self._enqueue(self._request_stop, None, force=True)
        thread.join()

    def _request_stop(self) -> None:
        self._stopping = True

    # ---- the API: queue work for the tracer thread ----

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) in the tracer thread; its result or exception comes in the Future.

        Called from the tracer thread itself (a callback), the work runs after the callback
        returns: do not wait for the Future there.
        """
        return self._deferred(lambda fut: fut.set_result(fn(*args)), raw=True)

    def seize(self, pid: int, check: Callable[[], None] | None = None) -> Future[None]:
        return self._deferred(self._ghosts.seize, pid, check)

    def capture(self, pid: int, timeout: float) -> Future[Image]:
        return self._deferred(self._ghosts.capture, pid, timeout)

    def finish(self, pid: int, *, exit_code: int | None = None,
               signal: int | None = None) -> Future[None]:
        return self._deferred(self._ghosts.finish, pid, exit_code, signal)

    def finish_soon(self, pid: int, *, exit_code: int | None = None,
                    signal: int | None = None) -> Future[None]:
        """`finish` of a parked ghost without the doorbell: the ghost is sent STEP_SIGNAL,
        and that signal's stop (an event like any, which wakes this thread) is where it
        is aimed at its end, with no halt. The request is queued too, without a ring:
        one that cannot be done at that stop (a ghost in a job-control stop, or in the
        middle of a step) is done as `finish` does, at the thread's next turn. Anything
        but a parked ghost, or one held in a job-control stop (a signal does not wake
        it): `finish` (a signal to a running process would be its own). Not a SIGKILL
        even for a child ghost its parent ghost reaps (cheaper: no stop of it): its
        end is the process's (exit code or signal), which a pidfd of it, or its zombie
        in /proc, shows on the master."""
        fut: Future = Future()
        try:
            check_finish(exit_code, signal)
        except MigrateError as exc:
            fut.set_exception(exc)
            return fut
        if not self._ghosts.wakeable(pid):
            return self.finish(pid, exit_code=exit_code, signal=signal)
        self._ghosts.ends[pid] = (exit_code, signal, fut)
        sent = self._wake_ghost(pid)
        self._enqueue(lambda: self._ghosts.finish_queued(pid), fut, ring=not sent)
        return fut

    def fork_soon(self, pid: int, reaped: bool = True) -> Future[int]:
        """`fork` of a parked ghost without the doorbell and without a halt: the ghost is
        sent STEP_SIGNAL, and the fork is made in that signal's stop (as `finish_soon`;
        queued too, unrung, for a ghost that cannot take that stop now)."""
        if not self._ghosts.wakeable(pid):
            return self.fork(pid, reaped)
        fut: Future = Future()
        with self._ghosts._lock:
            self._ghosts.forks.setdefault(pid, []).append((fut, reaped))
        sent = self._wake_ghost(pid)
        self._enqueue(lambda: self._ghosts.fork_queued(pid, fut), fut, ring=not sent)
        return fut

    def _wake_ghost(self, pid: int) -> bool:
        """STEP_SIGNAL to the ghost: its stop wakes the thread. False if it was not sent
        (the queue, rung, does the request then). Counted once sent, and the request
        queued after that: an item that finds one on its way may wait for its stop
        (`Ghosts.await_step`), never for one that was not sent (EPERM, EAGAIN)."""
        t = self._ghosts.tracees.get(pid)
        if t is None:
            return False
        try:
            pt.kill(pid, STEP_SIGNAL)     # the GIL released meanwhile (os.kill holds it)
        except ProcessLookupError:
            return True                 # its end wakes the thread
        except OSError:
            return False
        with self._ghosts._lock:
            t.steps_sent += 1
        return True

    def kill(self, pid: int) -> Future[None]:
        return self._deferred(self._ghosts.kill, pid)

    def set_stopped(self, pid: int, stopped: bool, sig: int = _signal.SIGSTOP
                    ) -> Future[None]:
        return self._deferred(self._ghosts.set_stopped, pid, stopped, sig)

    def clone(self, pid: int, count: int) -> Future[list[int]]:
        return self._deferred(self._ghosts.clone, pid, count)

    def fork(self, pid: int, reaped: bool = False) -> Future[int]:
        """`reaped`: the parent ghost reaps the child itself once it has ended (its
        SIGCHLD's stop: docs/ghosts.md, "Children"); else the caller's `reap` does."""
        return self._deferred(self._ghosts.fork, pid, reaped)

    def reap(self, parent: int, child: int, status: int | None = None) -> Future[int]:
        """`status`: the wait status of a child that ran here untraced (restored into its
        ghost), whose end the tracer did not see."""
        return self._deferred(self._ghosts.reap, parent, child, status)

    def rename(self, pid: int, argv: list[bytes]) -> Future[None]:
        return self._deferred(self._ghosts.rename, pid, list(argv))

    def exec_in(self, pid: int, path: bytes, argv: list[bytes], envp: list[bytes],
                cwd: bytes) -> Future[None]:
        return self._deferred(self._ghosts.exec_in, pid, path, _copied(argv), _copied(envp), cwd)

    def seize_running(self, pid: int, check: Callable[[], None] | None = None,
                      stop: bool = False) -> Future[None]:
        """Seize and interrupt a running process to move it (bpfs/migrate/ghost_move.py);
        with `stop`, resolved once it is stopped."""
        return self._deferred(self._ghosts.seize_running, pid, check, stop)

    def stop_moving(self, pid: int) -> Future[None]:
        """Resolved once the seized `pid` is stopped: its fds are those that move (queue
        dump_moving right behind it: the stop is not waited for twice)."""
        return self._deferred(self._ghosts.stop_moving, pid)

    def dump_moving(self, pid: int, links: set[int], lazy: bool = False) -> Future[Image]:
        """`lazy`: its big runs are read when sent (bpfs.migrate.lazyrun): the caller
        sends the image before `park_moved` (which empties the process)."""
        return self._deferred(self._ghosts.dump_moving, pid, set(links), lazy)

    def park_moved(self, pid: int, close: tuple[int, ...] = ()) -> Future[None]:
        return self._deferred(self._ghosts.park_moved, pid, tuple(close))

    def release_moving(self, pid: int, err: int | None = None) -> Future[None]:
        return self._deferred(self._ghosts.release_moving, pid, err)

    def restore_in(self, pid: int, image: Image, fds: dict[int, int] | None = None,
                   close_others: bool = False) -> Future[None]:
        """The parked ghost `pid` becomes `image`'s process, running here, detached (docs/
        ghosts.md, "Back into the ghost"). `fds`: fd in the ghost -> one of ours to install
        there (ours must stay open until the Future resolves); the image's open files are
        opened again at their numbers; `close_others`: the ghost's other fds are closed
        (the image's fd table exactly, for a process that ran elsewhere)."""
        return self._deferred(self._ghosts.restore_in, pid, image,
                              dict(fds) if isinstance(fds, dict) else fds, close_others)

    def stream_in(self, pid: int, image: Image) -> Future[tuple[int, int]]:
        """An image comes back into the parked ghost `pid` in pieces (bpfs/migrate/
        ghost_stream.py): `image` decoded from its header; its regions mapped beside the
        ghost's pages, which sleeps on as a ghost. (bytes written as they come, bytes
        kept for the end). Then `write_in` each piece's runs, and `restore_in` with the
        same image, or `abort_in`."""
        return self._deferred(self._ghosts.stream_in, pid, image)

    def write_in(self, pid: int, runs: list[tuple[int, Any]]) -> Future[None]:
        """(address, bytes) of the image streaming into `pid`; the bytes must stay as
        they are until the Future resolves."""
        return self._deferred(self._ghosts.write_in, pid, list(runs))

    def abort_in(self, pid: int) -> Future[None]:
        """The image streaming into `pid` is not coming: the ghost as it was before."""
        return self._deferred(self._ghosts.abort_in, pid)

    def ghosts(self) -> list[int]:
        return self._ghosts.ghosts()

    def _deferred(self, fn: Callable[..., None], *args: Any, raw: bool = False) -> Future:
        """Queue fn(fut, *args); fn resolves `fut` now or later; what it raises goes in `fut`,
        as a MigrateError unless `raw` (a bug is logged with its traceback, and the caller
        still gets an errno it can handle)."""
        fut: Future = Future()

        def item() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fn(fut, *args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                if not (raw or isinstance(exc, BpfsError)):
                    log.exception("tracer: %s%r failed", fn.__name__, args)
                resolve(fut, exc=exc if raw else as_error(exc, fn.__name__.strip("_"),
                                                          None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                resolve(fut, exc=exc)
        self._enqueue(item, fut)
        return fut

    def _enqueue(self, item: Callable[[], None], fut: Future | None, force: bool = False,
                 ring: bool = True) -> None:
        with self._lock:
            if self._closing and not force:
                if fut is not None:
                    fut.set_exception(MigrateError(errno.ESHUTDOWN, "the tracer is stopped"))
                return
            self._closing = self._closing or force
            self._queue.append((item, fut))
            bell = self._bell
            ring = (ring and bell is not None and not self._rung and
                    threading.current_thread() is not self._thread)
            self._rung = self._rung or ring
        self._wake.set()
        if ring:
            bell.ring()

    # ---- the thread ----

    def _main(self) -> None:
        try:
            self._set_bell(_Doorbell())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._started.set_exception(exc)
            with self._lock:
                self._closing = True
            return
        self._started.set_result(None)
        try:
            while not self._stopping:
                self._run_queue()
                if self._ghosts.to_reap:
                    self._ghosts.reap_ended()
                self._ghosts.expire_captures()
                if self._stopping:
                    break
                if self._must_poll():
                    self._poll()
                else:
                    self._block()
        except BaseException:
            log.exception("tracer thread failed: its ghosts die with it")
        finally:
            self._shutdown()

    def _run_queue(self) -> None:
        self._wake.clear()
        while True:
            with self._lock:
                if not self._queue:
                    return
                item, _ = self._queue.popleft()
            item()

    def _must_poll(self) -> bool:
        return (time.monotonic() < self._stranger_until or
                any(t.state in (SEIZED, CAPTURING, MOVING, MOVE_HELD)
                    for t in self._tracees.values()))

    def _block(self) -> None:
        try:
            info = os.waitid(os.P_ALL, 0, PEEK)
        except ChildProcessError:  # not even the doorbell: someone reaped it
            self._new_bell()
            return
        if info is not None:
            self._event(info.si_pid, info.si_code, info.si_status)

    def _poll(self) -> None:
        """One look without blocking: P_ALL, or pid by pid when P_ALL shows an event that
        must stay (a held exec stop, a stranger) and could hide the others."""
        try:
            info = os.waitid(os.P_ALL, 0, PEEK | os.WNOHANG)
        except ChildProcessError:
            self._new_bell()
            return
        busy = info is not None
        if info is not None and self._stays(info.si_pid, info.si_code):
            busy = self._scan()
        elif info is not None:
            self._event(info.si_pid, info.si_code, info.si_status)
        self._interval = POLL_MIN if busy else min(self._interval * 2, POLL_MAX)
        if not busy:
            self._wake.wait(self._interval)

    def _stays(self, pid: int, code: int) -> bool:
        t = self._tracees.get(pid)
        if t is None:
            return pid != self._bell.pid
        return t.held and code not in ENDED

    def _scan(self) -> bool:
        busy = False
        for pid in [self._bell.pid, *self._tracees]:
            try:
                info = os.waitid(os.P_PID, pid, PEEK | os.WNOHANG)
            except ChildProcessError:
                self._ghosts.lost(pid)
                continue
            if info is not None and not self._stays(pid, info.si_code):
                busy = True
                self._event(pid, info.si_code, info.si_status)
        return busy

    def _event(self, pid: int, code: int, status: int) -> None:
        """One peeked (not yet consumed) event of `pid`: consume it and act."""
        if pid == self._bell.pid:
            self._answer_bell()
            return
        t = self._tracees.get(pid)
        if t is None:
            self._stranger(pid)
            return
        try:
            if t.state == RELEASING:
                self._ghosts.release_stop(t)
            elif code in ENDED:
                self._ghosts.gone(t, pt.wait(pid))
            elif t.killed:
                gp.wait_stop(pid)
            elif t.state in (SEIZED, CAPTURING):
                self._ghosts.before_exec(t, status)
            else:
                self._ghosts.ghost_stop(t, gp.wait_stop(pid))
        except gp.Gone as gone:
            self._ghosts.gone(t, gone.status)
        except Exception as exc:  # noqa: BLE001 - one tracee's trouble must not end the others
            self._ghosts.fail(t, "handling its stop", exc)

    def _stranger(self, pid: int) -> None:
        """A child of this thread that is no tracee: never reap it; poll around it a while."""
        if pid not in self._strangers:
            log.warning("tracer: process %d is a child of the tracer thread but not one of "
                        "its tracees; left alone", pid)
            self._strangers = {pid} if len(self._strangers) > 100 else self._strangers | {pid}
        self._stranger_until = time.monotonic() + STRANGER_POLL

    def _answer_bell(self) -> None:
        with self._lock:
            self._rung = False
        try:
            alive = self._bell.answer()
        except MigrateError:  # reaped by someone else (ECHILD)
            alive = False
        if not alive:
            self._new_bell()

    def _new_bell(self) -> None:
        log.warning("tracer: the doorbell died; making a new one")
        old = self._bell
        self._set_bell(_Doorbell())
        if old is not None:
            old.close()

    def _set_bell(self, bell: _Doorbell) -> None:
        with self._lock:
            self._bell, self._rung = bell, False
        self._ghosts.bell = bell.pid

    # ---- shutdown ----

    def _release_all(self) -> None:
        """At stop: strangers being released are never killed; their stops are waited for
        (RELEASE_WAIT at most) so they can be detached before this thread ends."""
        deadline = time.monotonic() + RELEASE_WAIT
        while releasing := [t for t in self._tracees.values() if t.state == RELEASING]:
            if time.monotonic() > deadline:
                for t in releasing:
                    log.warning("tracer: process %d did not stop to be released", t.pid)
                    self._ghosts.forget(t)
                return
            for t in releasing:
                try:
                    info = os.waitid(os.P_PID, t.pid, PEEK | os.WNOHANG)
                    if info is not None:
                        self._ghosts.release_stop(t)
                except (ChildProcessError, MigrateError):
                    self._ghosts.forget(t)
            time.sleep(POLL_MAX)

    def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
        for _, fut in queued:
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(MigrateError(errno.ESHUTDOWN, "the tracer is stopped"))
        self._release_all()
        tracees = list(self._tracees.values())
        for t in tracees:
            send_kill(t.pid)
        for t in tracees:
            status = kill_and_reap(t.pid)
            if status is None:
                self._ghosts.lost(t.pid)
            else:
                self._ghosts.gone(t, status)
        if self._bell is not None:
            self._bell.close()


def _copied(words: Any) -> Any:
    """A list of the caller's words (theirs may change meanwhile); anything else as it is,
    for the tracer thread to refuse (EINVAL)."""
    return list(words) if isinstance(words, (list, tuple)) else words

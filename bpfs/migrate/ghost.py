"""Ghosts: the master's stand-ins for migrated processes, held by one ptrace thread.

bpsh forks a child; the child asks the master (execmove) to migrate its next execve and then
calls execve itself. The master seizes the child, catches the exec, dumps the program at its
entry point and sends the image to a node. The exec'd process stays here as the **ghost**: same
PID, same parent (bpsh), its own name and command line in `ps`, asleep (see `ghost_park` for the
surgery). Every signal sent to it is intercepted, reported and suppressed, so the master can
forward it to the real process; SIGKILL cannot be intercepted: the ghost dies and its end is
reported. When the real process ends, `finish` makes the ghost end the same way, so bpsh's
waitpid sees the real status; a parked ghost is interrupted and aimed at its end when its stop
comes in, so ghosts that end together are halted together, not one after the other. If the
master dies, the ghosts die (PTRACE_O_EXITKILL), and so they do when the tracer thread ends.

API (every ptrace request comes from one thread, the tracer's; the methods only queue work)::

    t = Tracer(on_signal, on_exit[, on_keyboard])
                                        on_signal(pid, sig): a signal sent to a ghost, suppressed
                                        on_exit(pid, wait_status): a tracee ended (raw status)
                                        on_keyboard(pid, sig): INT, QUIT or TSTP that a
                                        terminal sent to the ghost's process group
                                        (si_code SI_KERNEL), suppressed; default on_signal
    t.start() / t.stop()                stop: SIGKILL every tracee, consume their ends, join
    t.submit(fn, *args) -> Future       fn(*args) in the tracer thread
    t.seize(pid, check) -> Future[None] PTRACE_SEIZE a process about to execve (a bpsh child);
                                        `check()` raises unless `pid` still names the
                                        process meant (a bpfs.pin.Pin's check): see below
    t.capture(pid, timeout) -> Future[Image]
                                        wait for its exec, dump it at its entry point, park it
    t.finish(pid, exit_code=N | signal=S) -> Future[None]
                                        end the ghost that way; resolves once it is gone
                                        (MigrateError if it had to be killed instead)
    t.kill(pid) -> Future[None]         SIGKILL; resolves once it is gone
    t.set_stopped(pid, stopped) -> Future[None]
                                        the real process stopped (or went on): the ghost
                                        enters a group-stop (held with PTRACE_LISTEN, so
                                        its parent's waitpid sees a stopped child) or is
                                        continued; neither signal is reported
    t.clone(pid, count) -> Future[list[int]]
                                        `count` more ghosts just like the parked ghost `pid`
                                        (vexecmove: one dump, many ranks); see below
    t.ghosts() -> [pid]                 parked ghosts (any thread)
    t.park_rss[pid] -> (kB, kB)         VmRSS right after the dump and after parking (a
                                        clone: its original's figures)

`clone` makes each copy with clone(CLONE_PARENT) injected into the halted ghost (see
`ghost_park.copy`): a new pid whose parent is the ghost's parent (bpsh), with the same name,
command line and environment (a copy of the kept argument pages), exit signal, dispositions and
ptrace options, asleep in pause(): a ghost like any other (signals reported with its own pid,
`finish`, `kill`, `ghosts`, `stop`). The list has `count` entries in order: a new pid, or
-errno where that clone failed (EAGAIN: process limits), the others are still made (if a
step fails otherwise, the ghost is put back to sleep and the rest are that errno); if the
ghost ends meanwhile, the copies made so far are kept and the rest are -ESRCH. An entry may
name a copy that has already ended (its `on_exit` came first). The ghost's parent must reap
the copies like its own children. A copy is in the ghost's process group and session: a signal
to the group reaches each and is reported once per pid. About 0.1 ms per copy in a batch of
100, 0.3-0.4 ms for a batch of one (test_clone_time).

A number is no proof of who holds it: the process meant may end, be reaped and its PID go
to another process (say, root's) between the moment it was checked and the PTRACE_SEIZE. So
`seize` brackets the act: `check()` before, PTRACE_SEIZE, `check()` again. If the second
check fails, whatever was seized is a stranger (or no longer the principal it was): it is
*released*, untouched: PTRACE_INTERRUPT, and at its stop PTRACE_DETACH with the signal it
was about to get (a group-stop stays stopped); nothing is reported for it, not even its end
if it dies meanwhile, and the Future fails with the check's error (ESRCH, EPERM). It was
traced for those few microseconds, with PTRACE_O_EXITKILL: were the master to die right
then, it would die too. `seize(pid)` without a check is for tests that own `pid`.

Callbacks run in the tracer thread: keep them short (hand them to trio). `on_signal` may come
for a pid whose `capture` future has only just resolved (a signal that arrived while it was
parked). `on_exit` comes for every tracee whose end the tracer consumed: a killed or finished
ghost, or a seized process that ended before its exec. Errors are `MigrateError` in the futures:
ESRCH (not held here, or it ended), EBUSY (wrong state, e.g. capture twice, or clone of what is
not a parked ghost), ETIMEDOUT (no exec in time: the process stays seized, `kill` it),
EPERM/EINTR/... from the dump (the process stays stopped, never having run the program:
`finish(pid, exit_code=255)` or `kill` it), EINVAL (bad finish arguments, a negative clone
count), ECANCELED (a capture overtaken by finish/kill), ESHUTDOWN (tracer stopped); a bug in
the tracer is EIO (logged with its traceback), so callers need catch only `BpfsError`.

Faults: whatever fails while the thread handles one tracee (a ptrace request refused, a step
of `ghost_park` failing, a bug), that tracee never stays parked or stopped for ever (its
parent would wait for ever) and never runs its program here. A finish that fails, a stop that
cannot be resumed, a capture that fails other than by MigrateError, a copy that cannot be
parked: the tracee dies by SIGKILL at once, its end comes in `on_exit` like any other, and
the futures waiting for it get the failure once it is gone. A failed clone puts the ghost back
to sleep, or kills it if even that fails. The other tracees go on; the thread never dies of
one tracee. Capabilities: ending a ghost by a signal needs none but CAP_KILL (its core limit
is lowered by the ghost itself); a kill needs none (PTRACE_KILL when kill() is refused). Left as they were: a process whose dump failed with MigrateError (above) and a
ghost given bad arguments (EINVAL, EBUSY), which the caller must end.

How the thread waits, and its latency: it blocks in `waitid(P_ALL, WNOWAIT | __WALL |
__WNOTHREAD)`, which wakes for any event of *its own* tracees and children only (__WNOTHREAD:
not the children of the master's other threads), peeks without reaping, and then consumes the
event with `waitpid(pid)` only if the pid is one of ours. To take new work while blocked there,
the thread keeps one child of its own, the **doorbell**: /bin/true parked like a ghost (named
bpfs-doorbell). `submit` queues the work and sends the doorbell SIGUSR1 (through a pidfd),
whose signal-delivery-stop wakes the thread. No timer and no CPU while idle; measured here
(test_latency_and_no_cpu_when_idle): os.kill of a ghost -> `on_signal` 0.03 ms median, submit ->
result 0.03 ms median, both under 0.5 ms at worst. While a seized process has not exec'd yet
(between `seize` and the end of `capture`), its exec stop may have to wait unconsumed for
`capture` and would hide the other events from a blocking P_ALL peek, so the thread peeks with
WNOHANG instead (P_ALL, or pid by pid while such a stop is pending) every 0.1-2 ms, backing
off when nothing happens; submissions still wake it at once (an Event), tracee events within
2 ms. A child of the tracer thread that is no tracee (say, spawned by submitted work) is never
reaped: the thread warns once, polls around it for 0.1 s and looks again.

Rules for the process that hosts a Tracer: no other thread may wait for "any child"
(wait(), waitpid(-1 or 0 or -pgid)): that also returns the tracees' stops and ends and would
steal them; waiting by pid or pidfd (subprocess, trio) is fine. A ghost whose real parent is
this same process is reaped by the tracer itself (the kernel gives a same-process tracer the
zombie), its status then only comes in `on_exit`: ghosts' parents should be other processes.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import shutil
import signal as _signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from bpfs.migrate import ghost_park as gp
from bpfs.migrate import procfs
from bpfs.migrate import ptrace as pt
from bpfs.errors import BpfsError
from bpfs.migrate.dump import TRACE_OPTIONS, seize_for_exec, wait_exec_and_dump
from bpfs.migrate.errors import MigrateError, from_oserror
from bpfs.migrate.image import Image
from bpfs.migrate.spawn import spawn_traced

log = logging.getLogger(__name__)

Future = concurrent.futures.Future
WNOTHREAD = 0x20000000
PEEK = os.WEXITED | os.WSTOPPED | os.WNOWAIT | pt.WALL | WNOTHREAD
ENDED = (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED)
POLL_MIN, POLL_MAX, STRANGER_POLL = 0.0001, 0.002, 0.1
DOORBELL_NAME = b"bpfs-doorbell"
STOP_SIGNALS = frozenset({_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU})
KEYBOARD = frozenset({_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTSTP})  # Ctrl-C, -\, -Z
SI_KERNEL = 0x80

# tracee states
SEIZED = "seized"        # running towards its execve
CAPTURING = "capturing"  # capture() waits for its exec
GHOST = "ghost"          # parked, asleep in pause()
STOPPED = "stopped"      # held in a ptrace-stop (a failed capture)
HALTING = "halting"      # a parked ghost interrupted to be finished; its stop is due
FINISHING = "finishing"  # aimed at its end; waiting for it
RELEASING = "releasing"  # seized by mistake (a reused PID): detached at its next stop
RELEASE_WAIT = 0.5       # at stop(): how long a releasing stranger's stop is waited for


@dataclass(eq=False)
class _Tracee:
    pid: int
    state: str = SEIZED
    held: bool = False       # its exec stop waits, unconsumed, for capture()
    killed: bool = False     # SIGKILL sent: only its end matters now
    capture: Future | None = None
    timeout: float = 0.0
    deadline: float = 0.0
    waiters: list[Future] = field(default_factory=list)
    aim: tuple[int | None, int | None] = (None, None)   # HALTING: (exit code, signal)
    failure: MigrateError | None = None   # why the tracer killed it (`_fail`)
    failed: list[Future] = field(default_factory=list)  # they get `failure` at its end
    stopped: bool = False    # a GHOST in a group-stop (set_stopped), held with LISTEN
    stop_sent: int = 0       # our SIGSTOP (set_stopped) is on its way: deliver this one
    cont_sent: bool = False  # our SIGCONT is on its way: not the user's, not reported


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
            _kill_and_reap(pid)
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
            _kill_and_reap(self.pid)


def _send_kill(pid: int) -> bool:
    """SIGKILL to a tracee; False if there is no such process.

    A master without CAP_KILL may not signal another user's process; PTRACE_KILL then
    does it (since Linux 5.19 a plain SIGKILL from the kernel, no permission asked). If
    even that fails it is logged, never raised: one tracee must not end the thread.
    """
    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        return False
    except OSError as exc:
        try:
            pt.ptrace(pt.KILL, pid)
        except MigrateError as again:
            if again.errno == errno.ESRCH:
                return False
            log.error("tracer: cannot kill process %d (%s; PTRACE_KILL: %s)", pid, exc,
                      again)
    return True


def _kill_and_reap(pid: int) -> int | None:
    """SIGKILL a tracee and consume its end; its raw status, or None if it was not ours."""
    if not _send_kill(pid):
        return None
    try:
        while True:
            status = pt.wait(pid)
            if not os.WIFSTOPPED(status):
                return status
    except MigrateError:
        return None


def _from_terminal(pid: int) -> bool:
    """True if the signal `pid` is stopped with came from a terminal (si_code SI_KERNEL: the
    tty driver signals the foreground process group so), not from kill()."""
    info = ctypes.create_string_buffer(128)
    try:
        pt.ptrace(pt.GETSIGINFO, pid, 0, ctypes.addressof(info))
    except MigrateError:
        return False
    return int.from_bytes(info.raw[8:12], "little", signed=True) == SI_KERNEL


def _ignores(pid: int, sig: int) -> bool:
    try:
        status = procfs.parse_status(procfs.read_text(pid, "status"))
        return bool(int(status["SigIgn"], 16) >> (sig - 1) & 1)
    except (MigrateError, OSError, KeyError, ValueError):
        return True


def _resolve(fut: Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _as_error(exc: BaseException, what: str, pid: int | None) -> MigrateError:
    """Any failure as the MigrateError a caller can handle (an errno and a message)."""
    if isinstance(exc, MigrateError):
        return exc
    if isinstance(exc, BpfsError):
        return MigrateError(exc.errno, exc.message, pid)
    if isinstance(exc, OSError):
        return from_oserror(exc, what, pid)
    return MigrateError(errno.EIO, f"{what}: internal error in the tracer ({exc!r})", pid)


class Tracer:
    """The ptrace thread of the master: seizes, captures and holds ghosts (see module doc)."""

    def __init__(self, on_signal: Callable[[int, int], None],
                 on_exit: Callable[[int, int], None],
                 on_keyboard: Callable[[int, int], None] | None = None) -> None:
        self._on_signal, self._on_exit = on_signal, on_exit
        self._on_keyboard = on_keyboard or on_signal
        self._lock = threading.Lock()  # guards _queue, _rung, _closing, _ghosts
        self._queue: deque[tuple[Callable[[], None], Future | None]] = deque()
        self._rung = False
        self._closing = False
        self._ghosts: set[int] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._started: Future = Future()
        # tracer-thread state
        self._tracees: dict[int, _Tracee] = {}
        self._bell: _Doorbell | None = None
        self._stopping = False
        self._stranger_until = 0.0
        self._strangers: set[int] = set()
        self._interval = POLL_MIN
        self.park_rss: dict[int, tuple[int, int]] = {}

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
        return self._deferred(self._seize, pid, check)

    def capture(self, pid: int, timeout: float) -> Future[Image]:
        return self._deferred(self._capture, pid, timeout)

    def finish(self, pid: int, *, exit_code: int | None = None,
               signal: int | None = None) -> Future[None]:
        return self._deferred(self._finish, pid, exit_code, signal)

    def kill(self, pid: int) -> Future[None]:
        return self._deferred(self._kill, pid)

    def set_stopped(self, pid: int, stopped: bool, sig: int = _signal.SIGSTOP
                    ) -> Future[None]:
        return self._deferred(self._set_stopped, pid, stopped, sig)

    def clone(self, pid: int, count: int) -> Future[list[int]]:
        return self._deferred(self._clone, pid, count)

    def ghosts(self) -> list[int]:
        with self._lock:
            return sorted(self._ghosts)

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
                _resolve(fut, exc=exc if raw else _as_error(exc, fn.__name__.strip("_"),
                                                            None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                _resolve(fut, exc=exc)
        self._enqueue(item, fut)
        return fut

    def _enqueue(self, item: Callable[[], None], fut: Future | None, force: bool = False) -> None:
        with self._lock:
            if self._closing and not force:
                if fut is not None:
                    fut.set_exception(MigrateError(errno.ESHUTDOWN, "the tracer is stopped"))
                return
            self._closing = self._closing or force
            self._queue.append((item, fut))
            bell = self._bell
            ring = (bell is not None and not self._rung and
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
                self._expire_captures()
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
                any(t.state in (SEIZED, CAPTURING) for t in self._tracees.values()))

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
                self._lost(pid)
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
                self._release_stop(t)
            elif code in ENDED:
                self._gone(t, pt.wait(pid))
            elif t.killed:
                gp.wait_stop(pid)
            elif t.state in (SEIZED, CAPTURING):
                self._before_exec(t, status)
            else:
                self._ghost_stop(t, gp.wait_stop(pid))
        except gp.Gone as gone:
            self._gone(t, gone.status)
        except Exception as exc:  # noqa: BLE001 - one tracee's trouble must not end the others
            self._fail(t, "handling its stop", exc)

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

    def _before_exec(self, t: _Tracee, status: int) -> None:
        """A stop of a seized process before its exec: keep its exec stop for capture()."""
        if status >> 8 == pt.EVENT_EXEC:
            if t.state == CAPTURING:
                self._capture_now(t)
            else:
                t.held = True
            return
        sig, event = gp.stop_parts(gp.wait_stop(t.pid))
        # as wait_exec_and_dump does: the program has not started, the signal is the child's
        pt.cont(t.pid, 0 if event or sig == _signal.SIGTRAP else sig)

    def _ghost_stop(self, t: _Tracee, status: int) -> None:
        """A stop of a ghost: suppress and report a signal; any other stop, just resume.
        A HALTING ghost's interrupt stop is where it is aimed at its end (`_aim`)."""
        sig, event = gp.stop_parts(status)
        if t.state == HALTING and event == pt.EVENT_STOP:
            self._aim(t)
            return
        if t.state == GHOST and self._job_stop(t, sig, event):
            return
        keyboard = event == 0 and sig in KEYBOARD and _from_terminal(t.pid)
        if keyboard:                     # first: told even if it cannot be resumed
            self._call(self._on_keyboard, t.pid, sig)
        elif event == 0:
            self._report(t.pid, [sig])
        if t.state in (GHOST, FINISHING, HALTING):
            pt.cont(t.pid, 0)

    def _job_stop(self, t: _Tracee, sig: int, event: int) -> bool:
        """The stops of `set_stopped`: our SIGSTOP is delivered, the group-stop it makes is
        held (LISTEN: the parent sees a stopped child, and a SIGCONT wakes it), our SIGCONT
        is not reported. True if the stop was one of those (handled)."""
        if event == pt.EVENT_STOP and sig in STOP_SIGNALS:
            t.stopped = True
            pt.ptrace(pt.LISTEN, t.pid)
        elif event == 0 and sig == _signal.SIGSTOP and t.stop_sent:
            pt.cont(t.pid, t.stop_sent)         # the real process's stop signal, delivered
            t.stop_sent = 0
        elif event == 0 and sig == _signal.SIGCONT:
            t.stopped, t.stop_sent = False, 0   # a SIGCONT discards a pending SIGSTOP
            if not t.cont_sent:
                return False                    # the user's: reported, forwarded
            t.cont_sent = False
            pt.cont(t.pid, 0)
        else:
            return False
        return True

    def _set_stopped(self, fut: Future, pid: int, stopped: bool, sig: int) -> None:
        """Stop a parked ghost by `sig` (its real process stopped so) or let it go on; a
        ghost already so, or on its way, is left alone. A stop signal the ghost ignores
        (its dispositions are the program's at its entry point) becomes SIGSTOP."""
        t = self._known(pid)
        if t.state == GHOST and not t.killed:
            if stopped and not t.stopped and not t.stop_sent:
                t.stop_sent = sig if sig in STOP_SIGNALS and not _ignores(pid, sig) \
                    else _signal.SIGSTOP
                os.kill(pid, _signal.SIGSTOP)
            elif not stopped and t.stopped and not t.cont_sent:
                t.cont_sent = True
                os.kill(pid, _signal.SIGCONT)
        fut.set_result(None)

    def _expire_captures(self) -> None:
        now = time.monotonic()
        for t in list(self._tracees.values()):
            if t.state == CAPTURING and now > t.deadline:
                t.state, fut, t.capture = SEIZED, t.capture, None
                _resolve(fut, exc=MigrateError(
                    errno.ETIMEDOUT, f"process {t.pid} did not exec in {t.timeout:g} s", t.pid))

    # ---- operations (tracer thread) ----

    def _known(self, pid: int) -> _Tracee:
        t = self._tracees.get(pid)
        if t is None:
            raise MigrateError(errno.ESRCH, f"process {pid} is not held by the tracer", pid)
        return t

    def _seize(self, fut: Future, pid: int, check: Callable[[], None] | None) -> None:
        if pid in self._tracees:
            raise MigrateError(errno.EBUSY, f"process {pid} is already traced", pid)
        if check is not None:
            check()
        seize_for_exec(pid)
        t = self._tracees[pid] = _Tracee(pid)
        if check is not None:
            try:
                check()
            except BaseException:
                self._release(t)
                raise
        fut.set_result(None)

    def _release(self, t: _Tracee) -> None:
        """Let go of `t`, seized by mistake, without a trace: interrupt it; its stop (an
        event like any other) is where it is detached (`_release_stop`)."""
        log.warning("tracer: process %d is not the one meant; released untouched", t.pid)
        t.state = RELEASING
        try:
            pt.ptrace(pt.INTERRUPT, t.pid)
        except MigrateError as exc:
            if exc.errno != errno.ESRCH:    # ESRCH: it died meanwhile; its end follows
                raise

    def _release_stop(self, t: _Tracee) -> None:
        """The releasing `t` stopped (or ended): detach it as it was, say nothing of it."""
        status = pt.wait(t.pid)
        if os.WIFSTOPPED(status):
            sig, event = gp.stop_parts(status)
            # a signal-delivery-stop: the signal goes on; any other stop (the interrupt,
            # a group-stop, its exec): nothing is added
            try:
                pt.detach(t.pid, sig if event == 0 else 0)
            except MigrateError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        self._forget(t)

    def _capture(self, fut: Future, pid: int, timeout: float) -> None:
        t = self._known(pid)
        if t.state != SEIZED or t.killed:
            raise MigrateError(errno.EBUSY, f"process {pid} is {t.state}, not waiting for "
                                            "its exec", pid)
        t.state, t.capture, t.timeout = CAPTURING, fut, timeout
        t.deadline = time.monotonic() + timeout
        if t.held:
            self._capture_now(t)

    def _capture_now(self, t: _Tracee) -> None:
        """The exec stop of `t` is there: dump at the entry point, then park it."""
        fut, t.capture, t.held = t.capture, None, False
        signals: list[int] = []
        try:
            img = wait_exec_and_dump(t.pid, max(t.deadline - time.monotonic(), 1.0))
            before = gp.vm_rss_kb(t.pid)
            gp.park(t.pid, signals)
            after = gp.vm_rss_kb(t.pid)
        except gp.Gone as gone:
            t.capture = fut
            self._gone(t, gone.status)
            return
        except MigrateError as exc:  # the caller hears of it, and ends it
            self._capture_failed(t, fut, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: who knows where it was left
            t.capture = fut
            self._fail(t, "capture", exc)
            return
        t.state = GHOST
        self.park_rss[t.pid] = (before, after)
        with self._lock:
            self._ghosts.add(t.pid)
        log.debug("ghost %d parked: VmRSS %d kB -> %d kB", t.pid, before, after)
        _resolve(fut, img)
        self._report(t.pid, signals)

    def _capture_failed(self, t: _Tracee, fut: Future, exc: Exception) -> None:
        if gp.still_traced(t.pid):
            t.state = STOPPED  # stopped in some ptrace-stop, the program never ran
        else:  # its end was consumed inside the dump
            self._tracees.pop(t.pid, None)
        _resolve(fut, exc=exc)

    def _finish(self, fut: Future, pid: int, code: int | None, sig: int | None) -> None:
        _check_finish(code, sig)
        t = self._known(pid)
        if sig == _signal.SIGKILL:
            self._kill(fut, pid)
            return
        t.waiters.append(fut)
        if t.state in (FINISHING, HALTING) or t.killed:
            return
        if t.state == GHOST:
            self._interrupt(t, code, sig)
            return
        signals: list[int] = []
        try:
            self._halt(t, signals)
            if code is not None:
                gp.aim_exit(pid, code, signals)
            else:
                gp.aim_signal(pid, sig, signals)
            t.state = FINISHING
        except gp.Gone as gone:
            self._gone(t, gone.status)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the process must end
            self._fail(t, "finish", exc)
        finally:
            self._report(pid, signals)

    def _interrupt(self, t: _Tracee, code: int | None, sig: int | None) -> None:
        """Interrupt the parked ghost `t` and return: its stop comes as an event like any
        other (`_ghost_stop`), and is where it is aimed at its end. The thread does not wait
        for a ghost to be scheduled (on a busy machine, the ghosts that end together would
        otherwise be halted one after the other); their stops come in any order."""
        try:
            pt.ptrace(pt.INTERRUPT, t.pid)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the process must end
            self._fail(t, "finish", exc)   # ESRCH: killed meanwhile, its end follows
            return
        t.state, t.aim = HALTING, (code, sig)

    def _aim(self, t: _Tracee) -> None:
        """The HALTING ghost `t` is in its interrupt stop: make it end as `finish` asked."""
        code, sig = t.aim
        signals: list[int] = []
        try:
            if code is not None:
                gp.aim_exit(t.pid, code, signals)
            else:
                gp.aim_signal(t.pid, sig, signals)
            t.state = FINISHING
        except gp.Gone as gone:
            self._gone(t, gone.status)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the process must end
            self._fail(t, "finish", exc)
        finally:
            self._report(t.pid, signals)

    def _halt(self, t: _Tracee, signals: list[int]) -> None:
        """Bring `t` into a ptrace-stop, whatever its state."""
        self._cancel_capture(t)
        if t.held:
            gp.wait_stop(t.pid)
            t.held = False
        elif t.state != STOPPED:
            gp.halt(t.pid, signals)

    def _cancel_capture(self, t: _Tracee) -> None:
        if t.capture is not None:
            fut, t.capture = t.capture, None
            _resolve(fut, exc=MigrateError(errno.ECANCELED, f"capture of {t.pid} overtaken",
                                           t.pid))

    def _kill(self, fut: Future, pid: int) -> None:
        t = self._known(pid)
        t.waiters.append(fut)
        self._cancel_capture(t)
        t.killed, t.held = True, False
        _send_kill(pid)

    def _fail(self, t: _Tracee, what: str, exc: BaseException) -> None:
        """Handling `t` failed (`exc`): it dies by SIGKILL now.

        Whatever state the failure left it in (a ptrace-stop, half aimed at its end, half
        parked), it must neither stay parked for ever (its parent would wait for ever) nor
        run the program here. Its end comes as an event like any other: `on_exit` reports
        it, and the futures that waited for it (finish) or for its capture get the failure
        as a MigrateError once it is gone. ESRCH from ptrace means it was killed meanwhile:
        the SIGKILL only makes sure, and its end resolves the futures as usual.
        """
        if not gp.still_traced(t.pid):  # its end was consumed (or stolen): nothing to kill
            log.warning("tracer: process %d: %s failed (%s), and it is gone", t.pid, what, exc)
            self._lost(t.pid)
            return
        t.killed, t.held = True, False
        with self._lock:
            self._ghosts.discard(t.pid)
        if isinstance(exc, MigrateError) and exc.errno == errno.ESRCH:
            _send_kill(t.pid)
            return
        err = _as_error(exc, what, t.pid)
        if err is exc:
            log.warning("tracer: process %d: %s failed (%s); killing it", t.pid, what, err)
        else:
            log.error("tracer: process %d: %s failed; killing it", t.pid, what, exc_info=exc)
        t.failure = t.failure or err
        t.failed += t.waiters
        t.waiters = []
        if t.capture is not None:
            fut, t.capture = t.capture, None
            _resolve(fut, exc=err)
        _send_kill(t.pid)

    def _clone(self, fut: Future, pid: int, count: int) -> None:
        """`count` copies of the ghost `pid` (see `gp.copy`), made from it halted once.

        The copies are made first and parked afterwards: by then each has reached its first
        stop, so no wait for it to be scheduled. Each is held (in `_tracees`) from its birth.
        """
        if count < 0:
            raise MigrateError(errno.EINVAL, f"cannot make {count} copies", pid)
        t = self._known(pid)
        if t.state != GHOST or t.killed:
            raise MigrateError(errno.EBUSY, f"process {pid} is {t.state}, not a parked ghost",
                               pid)
        signals: list[int] = []
        pids: list[int] = []  # new pids and -errno, in order
        err = gadget = 0
        regs: pt.Regs | None = None
        rss = self.park_rss.get(pid)
        try:
            gp.halt(pid, signals)
            regs = pt.getregs(pid)
            gadget = gp.sleeping_gadget(pid, regs)
            pt.setoptions(pid, TRACE_OPTIONS | gp.TRACE_COPIES)
            while len(pids) < count:
                made: list[int] = []  # the new pid, once its fork event stop came
                try:
                    res = gp.copy(pid, regs, gadget, signals, made)
                except Exception:
                    if not made:  # killed before the fork event stop: the child may exist
                        made.extend(self._strays())
                    raise
                finally:  # a child is ours, whatever happened to the original: held at once
                    for child in made:
                        self._tracees[child] = _Tracee(child, GHOST)
                    pids.extend(made)
                if res < 0:
                    pids.append(res)
            pt.setoptions(pid, TRACE_OPTIONS)
            gp.sleep_in_pause(pid, regs, gadget)
        except gp.Gone as gone:
            err = errno.ESRCH
            self._gone(t, gone.status)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the ghost goes on or ends
            err = self._repark(t, regs, gadget, exc)
        finally:
            self._report(pid, signals)
            for child in pids:
                if child > 0:
                    self._adopt(self._tracees[child], gadget, rss)
        fut.set_result(pids + [-err] * (count - len(pids)))

    def _repark(self, t: _Tracee, regs: pt.Regs | None, gadget: int, exc: Exception) -> int:
        """A clone of the ghost `t` failed (`exc`) with `t` halted at `regs`: put it back to
        sleep, a ghost as before; if that fails too (or it was not halted), `_fail`.

        Returns the errno for the copies not made: ESRCH if `t` was killed meanwhile (a
        dying process gives other errors too, e.g. ENOEXEC for its vanished vdso; then
        putting it back fails with ESRCH)."""
        err = _as_error(exc, "clone", t.pid)
        if regs is not None and err.errno != errno.ESRCH:
            try:
                pt.setoptions(t.pid, TRACE_OPTIONS)
                gp.sleep_in_pause(t.pid, regs, gadget)
            except Exception as again:  # noqa: BLE001 - it cannot stay halted
                exc = again
            else:
                log.warning("tracer: cloning ghost %d: %s; parked again", t.pid, err)
                return err.errno
        self._fail(t, "clone", exc)
        killed = isinstance(exc, MigrateError) and exc.errno == errno.ESRCH
        return errno.ESRCH if killed else err.errno

    def _adopt(self, c: _Tracee, gadget: int, rss: tuple[int, int] | None) -> None:
        """Make the new `c`, made by a clone, a ghost: consume its first stop, park it.

        If it cannot be parked it is killed; if it ended already, its end is consumed: either
        way `on_exit` follows, as for any ghost. `rss` is the original's `park_rss` (the copy
        maps the same pages).
        """
        signals: list[int] = []
        try:
            # its attach stop, before it ran anything: an EVENT_STOP (the ghost was seized;
            # a SIGSTOP had it been PTRACE_TRACEME'd)
            sig, event = gp.stop_parts(gp.wait_stop(c.pid))
            if event == 0 and sig != _signal.SIGSTOP:
                signals.append(sig)
            pt.setoptions(c.pid, TRACE_OPTIONS)
            gp.sleep_in_pause(c.pid, pt.getregs(c.pid), gadget)
        except gp.Gone as gone:
            self._gone(c, gone.status)
            return
        except Exception as exc:  # noqa: BLE001 - it cannot stay in its first stop
            self._fail(c, "parking a clone", exc)
            return
        finally:
            self._report(c.pid, signals)
        if rss is not None:
            self.park_rss[c.pid] = rss
        with self._lock:
            self._ghosts.add(c.pid)

    def _strays(self) -> list[int]:
        """Processes traced by this thread that it does not hold (a clone whose parent was
        killed before its fork event stop, so its pid never came)."""
        me, out = threading.get_native_id(), []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in self._tracees or int(name) == self._bell.pid:
                continue
            try:
                status = procfs.parse_status(procfs.read_text(int(name), "status"))
            except MigrateError:
                continue
            if status.get("TracerPid") == str(me):
                out.append(int(name))
        return out

    # ---- ends ----

    def _gone(self, t: _Tracee, status: int) -> None:
        self._forget(t)
        if t.capture is not None:
            _resolve(t.capture, exc=MigrateError(errno.ESRCH, f"process {t.pid} ended before "
                                                             "its exec", t.pid))
        for fut in t.waiters:
            _resolve(fut)
        for fut in t.failed:
            _resolve(fut, exc=t.failure)
        self._call(self._on_exit, t.pid, status)

    def _lost(self, pid: int) -> None:
        """`pid` is no longer ours to wait for: someone else consumed its end."""
        t = self._tracees.get(pid)
        if t is None:
            return
        log.warning("tracer: process %d vanished (another thread waited for it?)", pid)
        self._forget(t)
        self._cancel_capture(t)
        for fut in t.waiters + t.failed:
            _resolve(fut, exc=MigrateError(errno.ESRCH, f"process {pid} vanished", pid))

    def _forget(self, t: _Tracee) -> None:
        self._tracees.pop(t.pid, None)
        self.park_rss.pop(t.pid, None)
        with self._lock:
            self._ghosts.discard(t.pid)

    def _release_all(self) -> None:
        """At stop: strangers being released are never killed; their stops are waited for
        (RELEASE_WAIT at most) so they can be detached before this thread ends."""
        deadline = time.monotonic() + RELEASE_WAIT
        while releasing := [t for t in self._tracees.values() if t.state == RELEASING]:
            if time.monotonic() > deadline:
                for t in releasing:
                    log.warning("tracer: process %d did not stop to be released", t.pid)
                    self._forget(t)
                return
            for t in releasing:
                try:
                    info = os.waitid(os.P_PID, t.pid, PEEK | os.WNOHANG)
                    if info is not None:
                        self._release_stop(t)
                except (ChildProcessError, MigrateError):
                    self._forget(t)
            time.sleep(POLL_MAX)

    def _report(self, pid: int, signals: list[int]) -> None:
        for sig in signals:
            self._call(self._on_signal, pid, sig)

    def _call(self, fn: Callable[[int, int], None], pid: int, arg: int) -> None:
        try:
            fn(pid, arg)
        except Exception:  # noqa: BLE001 - a callback must not take the tracer down
            log.exception("tracer: callback %r failed for process %d", fn, pid)

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
            _send_kill(t.pid)
        for t in tracees:
            status = _kill_and_reap(t.pid)
            if status is None:
                self._lost(t.pid)
            else:
                self._gone(t, status)
        if self._bell is not None:
            self._bell.close()


def _check_finish(code: int | None, sig: int | None) -> None:
    if (code is None) == (sig is None):
        raise MigrateError(errno.EINVAL, "finish needs exactly one of exit_code and signal")
    if code is not None and not 0 <= code <= 255:
        raise MigrateError(errno.EINVAL, f"exit code {code} is not in 0..255")
    if sig is not None and (not 1 <= sig <= 64 or sig in gp.NOT_FATAL):
        raise MigrateError(errno.EINVAL, f"signal {sig} does not end a process")

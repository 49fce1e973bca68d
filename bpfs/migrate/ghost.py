"""Ghosts: the state machine of the master's stand-ins for migrated processes.

A ghost keeps a migrated process's PID, parent, name and command line on the master, asleep
(`ghost_park` does the surgery); `Ghosts` takes each tracee through seized -> capturing ->
ghost -> halting -> finishing (and kill, release; clone, fork, reap, rename and exec_in
are `ghost_kin`'s; an exec_in'd ghost goes back to seized, stopped at its exec, for
capture), resolves the futures and reports signals and ends. `bpfs.migrate.tracer.Tracer`
owns it and drives it from its ptrace thread: every method here runs in that thread, except
`ghosts()`. The design, the API and the fault
rules are in docs/ghosts.md.
"""

from __future__ import annotations

import errno
import logging
import os
import signal as _signal
import threading
import time
from typing import Callable

from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.dump import dump_at_exec, seize_for_exec, wait_exec_and_dump
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.ghost_kin import Kin
from bpfs.migrate.ghost_move import Moving
from bpfs.migrate.ghost_stream import Built, Streaming
from bpfs.migrate.tracee import (Future, STOP_SIGNALS, KEYBOARD, DISCARD, SEIZED, CAPTURING, GHOST,
                                 STOPPED, HALTING, FINISHING, RELEASING, Signals, Tracee,
                                 send_kill, child_signal, from_terminal, pending, ignores,
                                 own_signal, STEP_SIGNAL,
                                 resolve, as_error)

log = logging.getLogger(__name__)


class Ghosts(Kin, Moving, Streaming):
    """The tracees of one tracer thread and their states (see the module doc)."""

    def __init__(self, on_signal: Callable[[int, int], None],
                 on_exit: Callable[[int, int], None],
                 on_keyboard: Callable[[int, int], None] | None = None) -> None:
        self._on_signal, self._on_exit = on_signal, on_exit
        self._on_keyboard = on_keyboard or on_signal
        self._lock = threading.Lock()  # guards _parked (read by any thread)
        self._parked: set[int] = set()
        self.tracees: dict[int, Tracee] = {}
        self.park_rss: dict[int, tuple[int, int]] = {}
        self.building: dict[int, Built] = {}    # images streaming into ghosts
        self.bell = 0  # the tracer's doorbell: traced by the thread, no tracee
        self.to_reap: set[int] = set()  # ghosts to halt to reap their children (Kin)
        # finish_soon's requests (any thread writes, the tracer thread takes): pid ->
        # (exit code, signal, future), done at the ghost's STEP_SIGNAL stop or when queued
        self.ends: dict[int, tuple[int | None, int | None, Future]] = {}
        # fork_soon's (under _lock): pid -> [(future, reaped)], done at its STEP_SIGNAL stop
        self.forks: dict[int, list[tuple[Future, bool]]] = {}

    def ghosts(self) -> list[int]:
        """The parked ghosts (any thread)."""
        with self._lock:
            return sorted(self._parked)

    def wakeable(self, pid: int) -> bool:
        """(Any thread) `pid` is a parked ghost that a signal wakes into a stop: none held
        in a job-control stop (a signal does not wake it: only the doorbell would)."""
        with self._lock:
            if pid not in self._parked:
                return False
        t = self.tracees.get(pid)
        return t is not None and not (t.stopped or t.stopping or t.stop_sent or
                                      t.cont_sent)

    # ---- stops (tracer thread) ----

    def before_exec(self, t: Tracee, status: int) -> None:
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

    def ghost_stop(self, t: Tracee, status: int) -> None:
        """A stop of a ghost: suppress and report a signal; any other stop, just resume.
        A HALTING ghost's interrupt stop is where it is aimed at its end (`_aim`)."""
        sig, event = gp.stop_parts(status)
        if t.state == HALTING and event == pt.EVENT_STOP:
            self._aim(t)
            return
        if event == 0 and sig == STEP_SIGNAL and own_signal(t.pid):
            self._step_at_stop(t)
            return
        if t.state == GHOST and self._job_stop(t, sig, event):
            return
        keyboard = event == 0 and sig in KEYBOARD and from_terminal(t.pid)
        if keyboard:                     # first: told even if it cannot be resumed
            self._call(self._on_keyboard, t.pid, sig)
        elif event == 0 and sig == _signal.SIGCHLD and child_signal(t.pid, t):
            # a child ghost's end: not reported (its real parent has its own); the ghost
            # reaps it now if it is one it reaps itself (a process forked on a node)
            if t.state == GHOST and not t.killed and t.ended:
                self.reap_at_stop(t)
                return
        elif event == 0:
            self._report(t.pid, [sig])
        if t.state in (GHOST, FINISHING, HALTING):
            pt.cont(t.pid, 0)

    def _job_stop(self, t: Tracee, sig: int, event: int) -> bool:
        """The stops of `set_stopped`: our SIGSTOP is delivered, the group-stop it makes is
        held (LISTEN: the parent sees a stopped child, and a SIGCONT wakes it), our SIGCONT
        is not reported. True if the stop was one of those (handled).

        The reports that drive `set_stopped` come late (the node saw the stop first), and a
        user's SIGCONT (a shell's `bg`, `fg`) can be anywhere by then. The rules, so that
        the last word is the user's: a SIGCONT generated after our SIGSTOP discards it (the
        kernel does); a SIGCONT of the user's dequeued before our SIGSTOP was sent (our
        SIGSTOP is still pending when it is seen here) makes our SIGSTOP stale: it is
        swallowed when it comes (DISCARD), never delivered nor reported (reported, it would
        be forwarded and stop the real process again, after the user continued it).
        `set_stopped` does not stop a ghost with a SIGCONT pending (sending SIGSTOP would
        discard it, unseen); one that comes between its look and its SIGSTOP is discarded
        all the same, but leaves a trace: the notify trap a SIGCONT makes a seized process
        take, with no SIGCONT left to deliver. That SIGCONT is reported from there."""
        if event == pt.EVENT_STOP and sig in STOP_SIGNALS:
            t.stopped, t.stopping = True, False
            pt.ptrace(pt.LISTEN, t.pid)
        elif event == 0 and sig == _signal.SIGSTOP and t.stop_sent:
            # the real process's stop signal, delivered; or, overtaken, swallowed
            pt.cont(t.pid, 0 if t.stop_sent == DISCARD else t.stop_sent)
            t.stopping, t.stop_sent = t.stop_sent != DISCARD, 0
        elif event == 0 and sig == _signal.SIGCONT:
            t.stopped = t.stopping = False     # (a SIGCONT cancels a stop under way)
            if t.stop_sent and not pending(t.pid, _signal.SIGSTOP):
                t.stop_sent = 0                 # it was discarded by this SIGCONT
            if not t.cont_sent:
                if t.stop_sent:
                    t.stop_sent = DISCARD       # sent before this was seen: stale
                return False                    # the user's: reported, forwarded
            t.cont_sent = False                 # ours; a SIGSTOP still pending is newer
            pt.cont(t.pid, 0)
        elif event == pt.EVENT_STOP and t.stop_sent > 0 and not t.stopped and \
                not pending(t.pid, _signal.SIGCONT):
            # a jobctl notify trap: a SIGCONT came (a seized process traps before it takes
            # one), and is gone: our SIGSTOP, sent just after it, discarded it. It was the
            # user's (ours are not sent while a stop is on its way): reported here, and
            # our SIGSTOP is stale.
            t.stop_sent = DISCARD
            pt.cont(t.pid, 0)
            self._report(t.pid, [_signal.SIGCONT])
        else:
            return False
        return True

    def set_stopped(self, fut: Future, pid: int, stopped: bool, sig: int) -> None:
        """Stop a parked ghost by `sig` (its real process stopped so) or let it go on; a
        ghost already so, or on its way, is left alone. A stop signal the ghost ignores
        (its dispositions are the program's at its entry point) becomes SIGSTOP. A ghost
        with a user's SIGCONT pending is not stopped: that SIGCONT, forwarded when it is
        delivered, continues the real process, whose stop this report is (`_job_stop`)."""
        t = self._known(pid)
        if t.state == GHOST and not t.killed:
            if stopped and t.stop_sent <= 0 and not t.stopping and \
                    (not t.stopped or t.cont_sent):
                if pending(pid, _signal.SIGCONT):
                    if not t.cont_sent:
                        fut.set_result(None)    # the user's: the job goes on
                        return
                    t.cont_sent = False         # ours, discarded by the SIGSTOP below
                t.stop_sent = sig if sig in STOP_SIGNALS and not ignores(pid, sig) \
                    else _signal.SIGSTOP
                os.kill(pid, _signal.SIGSTOP)
            elif not stopped and (t.stopped or t.stopping or t.stop_sent > 0) and \
                    not t.cont_sent:
                # also a stop still on its way: SIGCONT discards a pending SIGSTOP, or
                # cancels the stop of one being delivered; its own stop is swallowed
                t.cont_sent = True
                os.kill(pid, _signal.SIGCONT)
        fut.set_result(None)

    def expire_captures(self) -> None:
        now = time.monotonic()
        for t in list(self.tracees.values()):
            if t.state == CAPTURING and now > t.deadline:
                t.state, fut, t.capture = SEIZED, t.capture, None
                resolve(fut, exc=MigrateError(
                    errno.ETIMEDOUT, f"process {t.pid} did not exec in {t.timeout:g} s", t.pid))

    # ---- operations (tracer thread) ----

    def _known(self, pid: int) -> Tracee:
        t = self.tracees.get(pid)
        if t is None:
            raise MigrateError(errno.ESRCH, f"process {pid} is not held by the tracer", pid)
        return t

    def seize(self, fut: Future, pid: int, check: Callable[[], None] | None) -> None:
        if pid in self.tracees:
            raise MigrateError(errno.EBUSY, f"process {pid} is already traced", pid)
        if check is not None:
            check()
        seize_for_exec(pid)
        t = self.tracees[pid] = Tracee(pid)
        if check is not None:
            try:
                check()
            except BaseException:
                self._release(t)
                raise
        fut.set_result(None)

    def _release(self, t: Tracee) -> None:
        """Let go of `t`, seized by mistake, without a trace: interrupt it; its stop (an
        event like any other) is where it is detached (`_release_stop`)."""
        log.warning("tracer: process %d is not the one meant; released untouched", t.pid)
        t.state = RELEASING
        try:
            pt.ptrace(pt.INTERRUPT, t.pid)
        except MigrateError as exc:
            if exc.errno != errno.ESRCH:    # ESRCH: it died meanwhile; its end follows
                raise

    def release_stop(self, t: Tracee) -> None:
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
        self.forget(t)

    def capture(self, fut: Future, pid: int, timeout: float) -> None:
        t = self._known(pid)
        if t.state != SEIZED or t.killed:
            raise MigrateError(errno.EBUSY, f"process {pid} is {t.state}, not waiting for "
                                            "its exec", pid)
        t.state, t.capture, t.timeout = CAPTURING, fut, timeout
        t.deadline = time.monotonic() + timeout
        if t.held or t.at_exec:
            self._capture_now(t)

    def _capture_now(self, t: Tracee) -> None:
        """The exec stop of `t` is there (or consumed already: `exec_in`): dump at the entry
        point, then park it. A SIGCHLD the kernel sends for one of its child ghosts (it
        may have some: an `exec_in` ghost) is no signal of the program's: dropped."""
        fut, t.capture, t.held = t.capture, None, False
        at_exec, t.at_exec = t.at_exec, False
        signals: list[int] = []

        def drop(sig: int) -> bool:
            return sig == _signal.SIGCHLD and child_signal(t.pid, t)
        try:
            img = dump_at_exec(t.pid, drop) if at_exec else \
                wait_exec_and_dump(t.pid, max(t.deadline - time.monotonic(), 1.0), drop)
            before = gp.vm_rss_kb(t.pid)
            gp.park(t.pid, signals)
            after = gp.vm_rss_kb(t.pid)
        except gp.Gone as gone:
            t.capture = fut
            self.gone(t, gone.status)
            return
        except MigrateError as exc:  # the caller hears of it, and ends it
            self._capture_failed(t, fut, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: who knows where it was left
            t.capture = fut
            self.fail(t, "capture", exc)
            return
        t.state = GHOST
        self.park_rss[t.pid] = (before, after)
        with self._lock:
            self._parked.add(t.pid)
        log.debug("ghost %d parked: VmRSS %d kB -> %d kB", t.pid, before, after)
        resolve(fut, img)
        self._report(t.pid, signals)

    def _capture_failed(self, t: Tracee, fut: Future, exc: Exception) -> None:
        if gp.still_traced(t.pid):
            t.state = STOPPED  # stopped in some ptrace-stop, the program never ran
        else:  # its end was consumed inside the dump
            self.tracees.pop(t.pid, None)
        resolve(fut, exc=exc)

    def finish(self, fut: Future, pid: int, code: int | None, sig: int | None) -> None:
        check_finish(code, sig)
        t = self._known(pid)
        if sig == _signal.SIGKILL:
            self.kill(fut, pid)
            return
        t.waiters.append(fut)
        if t.state in (FINISHING, HALTING) or t.killed:
            return
        if t.state == GHOST:
            self._interrupt(t, code, sig)
            return
        t.aim = (code, sig)
        self._aim(t, halt=True)

    def _step_at_stop(self, t: Tracee) -> None:
        """The stop of our STEP_SIGNAL (`Tracer.finish_soon`, `fork_soon`): a parked ghost
        is aimed at its end, or forks, from this stop, no halt; anything else only has the
        signal suppressed (the request, queued too, is done as `finish` or `fork` does)."""
        t.steps_met += 1
        free = self._free(t)
        entry = self.ends.pop(t.pid, None) if free else None
        if entry is not None:
            code, sig, fut = entry
            t.waiters.append(fut)
            t.state, t.aim = HALTING, (code, sig)
            self._aim(t)
            return
        fork = self.take_fork(t.pid) if free else None
        if fork is None:
            pt.cont(t.pid, 0)
            return
        fut, reaped = fork
        try:
            self.fork(fut, t.pid, reaped, halt=False, reap=True)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            resolve(fut, exc=as_error(exc, "fork", t.pid))

    @staticmethod
    def _free(t: Tracee) -> bool:
        """A parked ghost that our STEP_SIGNAL stops, and that may fork or end in that stop."""
        return t.state == GHOST and not t.killed and not (
            t.stopped or t.stopping or t.stop_sent or t.cont_sent)

    def await_step(self, pid: int) -> None:
        """A request of `finish_soon` or `fork_soon` is queued for `pid`, and its STEP_SIGNAL
        is on its way (sent, not yet met: the thread was busy when it came, and runs the
        queue first): its stop is waited for and does it, rather than a halt of the ghost
        for the request and that stop met on the way (two waits for the ghost, not one).
        Any stop that comes first is handled as any event; once the ghost is not free any
        more or no STEP_SIGNAL of ours is on its way, the caller does what is left."""
        t = self.tracees.get(pid)
        while t is not None and self.tracees.get(pid) is t and self._free(t) and \
                t.steps_met < t.steps_sent and (pid in self.ends or self.forks.get(pid)):
            try:
                status = pt.wait(pid)
                if os.WIFSTOPPED(status):
                    self.ghost_stop(t, status)
                else:
                    self.gone(t, status)
            except gp.Gone as gone:
                self.gone(t, gone.status)
            except MigrateError as exc:
                if exc.errno == errno.ECHILD:
                    self.lost(pid)
                else:
                    self.fail(t, "handling its stop", exc)
            except Exception as exc:  # noqa: BLE001 - as Tracer._event
                self.fail(t, "handling its stop", exc)

    def fork_queued(self, pid: int, fut: Future) -> None:
        """fork_soon's request, if its STEP_SIGNAL stop has not done it: `fork`."""
        self.await_step(pid)
        with self._lock:
            waiting = self.forks.get(pid, [])
            fork = next((f for f in waiting if f[0] is fut), None)
            if fork is not None:
                waiting.remove(fork)
            if not waiting:
                self.forks.pop(pid, None)
        if fork is not None:
            try:
                self.fork(fut, pid, fork[1])
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                resolve(fut, exc=as_error(exc, "fork", pid))

    def finish_queued(self, pid: int) -> None:
        """finish_soon's request, if its STEP_SIGNAL stop has not done it: `finish`."""
        self.await_step(pid)
        entry = self.ends.pop(pid, None)
        if entry is not None:
            code, sig, fut = entry
            try:
                self.finish(fut, pid, code, sig)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                resolve(fut, exc=as_error(exc, "finish", pid))

    def _interrupt(self, t: Tracee, code: int | None, sig: int | None) -> None:
        """Interrupt the parked ghost `t` and return: its stop comes as an event like any
        other (`_ghost_stop`), and is where it is aimed at its end. The thread does not wait
        for a ghost to be scheduled (on a busy machine, the ghosts that end together would
        otherwise be halted one after the other); their stops come in any order."""
        try:
            pt.ptrace(pt.INTERRUPT, t.pid)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the process must end
            self.fail(t, "finish", exc)   # ESRCH: killed meanwhile, its end follows
            return
        t.state, t.aim = HALTING, (code, sig)

    def _aim(self, t: Tracee, halt: bool = False) -> None:
        """Make `t` end as `finish` asked (`t.aim`): a HALTING ghost in its interrupt stop,
        or (`halt`) any other tracee, brought into a ptrace-stop first."""
        code, sig = t.aim
        signals = Signals(t)
        try:
            if halt:
                self._halt(t, signals)
            if code is not None:     # a HALTING ghost is in its interrupt stop
                gp.aim_exit(t.pid, code, signals, 0 if halt else t.gadget)
            else:
                gp.aim_signal(t.pid, sig, signals)
            t.state = FINISHING
        except gp.Gone as gone:
            self.gone(t, gone.status)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the process must end
            self.fail(t, "finish", exc)
        finally:
            self._report(t.pid, signals)

    def _halt(self, t: Tracee, signals: list[int]) -> None:
        """Bring `t` into a ptrace-stop, whatever its state."""
        self._cancel_capture(t)
        if t.held:
            gp.wait_stop(t.pid)
            t.held = False
        elif t.at_exec:
            t.at_exec = False           # in its exec stop, consumed already
        elif t.state != STOPPED:
            gp.halt(t.pid, signals)

    def _cancel_capture(self, t: Tracee) -> None:
        if t.capture is not None:
            fut, t.capture = t.capture, None
            resolve(fut, exc=MigrateError(errno.ECANCELED, f"capture of {t.pid} overtaken",
                                          t.pid))

    def kill(self, fut: Future, pid: int) -> None:
        t = self._known(pid)
        t.waiters.append(fut)
        self._cancel_capture(t)
        t.killed, t.held, t.at_exec = True, False, False
        send_kill(pid)

    def fail(self, t: Tracee, what: str, exc: BaseException) -> None:
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
            self.lost(t.pid)
            return
        t.killed, t.held, t.at_exec = True, False, False
        with self._lock:
            self._parked.discard(t.pid)
        if isinstance(exc, MigrateError) and exc.errno == errno.ESRCH:
            log.warning("tracer: process %d: %s failed (%s): killing it", t.pid, what, exc)
            send_kill(t.pid)
            return
        err = as_error(exc, what, t.pid)
        if err is exc:
            log.warning("tracer: process %d: %s failed (%s); killing it", t.pid, what, err)
        else:
            log.error("tracer: process %d: %s failed; killing it", t.pid, what, exc_info=exc)
        t.failure = t.failure or err
        t.failed += t.waiters
        t.waiters = []
        if t.capture is not None:
            fut, t.capture = t.capture, None
            resolve(fut, exc=err)
        send_kill(t.pid)

    # ---- ends ----

    def gone(self, t: Tracee, status: int) -> None:
        self.forget(t, status)
        if t.capture is not None:
            resolve(t.capture, exc=MigrateError(errno.ESRCH, f"process {t.pid} ended before "
                                                            "its exec", t.pid))
        for fut in t.waiters:
            resolve(fut)
        for fut in t.failed:
            resolve(fut, exc=t.failure)
        self._call(self._on_exit, t.pid, status)

    def lost(self, pid: int) -> None:
        """`pid` is no longer ours to wait for: someone else consumed its end."""
        t = self.tracees.get(pid)
        if t is None:
            return
        log.warning("tracer: process %d vanished (another thread waited for it?)", pid)
        self.forget(t)
        self._cancel_capture(t)
        for fut in t.waiters + t.failed:
            resolve(fut, exc=MigrateError(errno.ESRCH, f"process {pid} vanished", pid))

    def forget(self, t: Tracee, status: int | None = None) -> None:
        """`t` is no longer ours: it ended (`status`), vanished, or was released."""
        self.unlink(t, status)
        self.tracees.pop(t.pid, None)
        self.park_rss.pop(t.pid, None)
        self.building.pop(t.pid, None)      # (what it built went with it)
        with self._lock:
            self._parked.discard(t.pid)

    def _report(self, pid: int, signals: list[int]) -> None:
        for sig in signals:
            self._call(self._on_signal, pid, sig)

    def _call(self, fn: Callable[[int, int], None], pid: int, arg: int) -> None:
        try:
            fn(pid, arg)
        except Exception:  # noqa: BLE001 - a callback must not take the tracer down
            log.exception("tracer: callback %r failed for process %d", fn, pid)


def check_finish(code: int | None, sig: int | None) -> None:
    if (code is None) == (sig is None):
        raise MigrateError(errno.EINVAL, "finish needs exactly one of exit_code and signal")
    if code is not None and not 0 <= code <= 255:
        raise MigrateError(errno.EINVAL, f"exit code {code} is not in 0..255")
    if sig is not None and (not 1 <= sig <= 64 or sig in gp.NOT_FATAL):
        raise MigrateError(errno.EINVAL, f"signal {sig} does not end a process")

"""One traced process as the tracer thread knows it: its record and states, and what is
done to it by PID (kill and reap, where its signal came from, what is pending or ignored),
and the futures the tracer resolves for it. Shared by `tracer` (the thread) and `ghost`
(the state machine); imports neither.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import signal as _signal
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bpfs import procstatus
from bpfs.errors import BpfsError
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError, from_oserror

log = logging.getLogger("bpfs.migrate.ghost")

Future = concurrent.futures.Future
STOP_SIGNALS = frozenset({_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU})
KEYBOARD = frozenset({_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTSTP})  # Ctrl-C, -\, -Z
SI_KERNEL = 0x80
CLD_EXITED, CLD_CONTINUED = 1, 6  # si_code of a SIGCHLD the kernel sends for a child
DISCARD = -1             # Tracee.stop_sent: our SIGSTOP, overtaken by a SIGCONT
STEP_SIGNAL = _signal.SIGRTMIN + 6   # ours to a parked ghost: its stop is where it is
                         # ended (`Tracer.finish_soon`); never reported nor delivered
LATELY = 64              # Tracee.lately: how many reaped children it remembers

# tracee states
SEIZED = "seized"        # running towards its execve
CAPTURING = "capturing"  # capture() waits for its exec
GHOST = "ghost"          # parked, asleep in pause()
STOPPED = "stopped"      # held in a ptrace-stop (a failed capture)
HALTING = "halting"      # a parked ghost interrupted to be finished; its stop is due
FINISHING = "finishing"  # aimed at its end; waiting for it
RELEASING = "releasing"  # seized by mistake (a reused PID): detached at its next stop
MOVING = "moving"        # a running process seized to move (ghost_move): its stop is due
MOVE_HELD = "move-held"  # ... in its interrupt stop: dumped, then parked or let go



@dataclass(eq=False)
class Tracee:
    pid: int
    state: str = SEIZED
    held: bool = False       # its exec stop waits, unconsumed, for capture()
    at_exec: bool = False    # stopped in its exec stop, consumed (`exec_in`), for capture()
    killed: bool = False     # SIGKILL sent: only its end matters now
    capture: Future | None = None
    timeout: float = 0.0
    deadline: float = 0.0
    waiters: list[Future] = field(default_factory=list)
    aim: tuple[int | None, int | None] = (None, None)   # what finish asked: (exit code, signal)
    failure: MigrateError | None = None   # why the tracer killed it (`_fail`)
    failed: list[Future] = field(default_factory=list)  # they get `failure` at its end
    stopped: bool = False    # a GHOST in a group-stop (set_stopped), held with LISTEN
    stop_sent: int = 0       # our SIGSTOP (set_stopped) is on its way: deliver this one
                             # (DISCARD: a SIGCONT overtook it, it is swallowed)
    stopping: bool = False   # our stop signal delivered, its group-stop not seen yet
    cont_sent: bool = False  # our SIGCONT is on its way: not the user's, not reported
    parent: int = 0          # the ghost whose child (`fork`) this one is; 0: none of ours
    children: dict[int, int | None] = field(default_factory=dict)
                             # its children made by `fork` (and their copies): None while
                             # they live, their wait status once ended, until reaped
    gadget: int = 0          # the vdso `syscall` where it sleeps, once known (a copy's too)
    argv_map: tuple[int, int] | None = None  # (address, size): where `rename` put its argv
    reaps: set[int] = field(default_factory=set)   # children it reaps itself once they
                             # end (`fork(reaped=True)`: a process forked on a node)
    ended: list[int] = field(default_factory=list)  # ... those that have ended: reaped at
                             # its SIGCHLD's stop, or in its next halt (`Kin.reap_ended`)
    lately: deque[int] = field(default_factory=lambda: deque(maxlen=LATELY))
                             # children reaped lately: a SIGCHLD for one of them may still
                             # come (coalesced with another's), and is no user's either
    steps_sent: int = 0      # our STEP_SIGNALs sent to it (any thread, under Ghosts._lock)
    steps_met: int = 0       # ... and met since, at their stop or during a step (tracer
                             # thread): while fewer, one is on its way (`Ghosts.await_step`)

    def kin(self, child: int) -> bool:
        """`child` is (or was lately) one of its children: a SIGCHLD for it is the kernel's."""
        return child in self.children or child in self.lately



class Signals(list):
    """The signals a `ghost_park` step suppressed in the ghost `t`, for the tracer to report.

    ghost_park appends each while `t` is still in that signal's delivery stop, so its siginfo
    can be read then: a SIGCHLD the kernel sent for one of `t`'s child ghosts is dropped here
    (`child_signal`), as `Ghosts.ghost_stop` drops it outside the steps. Our own SIGSTOP
    or SIGCONT (`set_stopped`'s, on their way) are neither reported nor lost: they go to
    `again`, to be sent again once the step is over, and met by `Ghosts._job_stop` then.
    """

    def __init__(self, t: "Tracee") -> None:
        super().__init__()
        self._t = t
        self.again: list[int] = []
        self.chld = False       # a SIGCHLD for one of its children was dropped

    def append(self, sig: int) -> None:
        t = self._t
        if sig == STEP_SIGNAL and own_signal(t.pid):
            t.steps_met += 1
            return          # its finish, queued too, is done after this step
        if sig == _signal.SIGCHLD and child_signal(t.pid, t):
            self.chld = True
            return
        if (sig == _signal.SIGSTOP and t.stop_sent > 0) or (sig == _signal.SIGCONT and
                                                             t.cont_sent):
            self.again.append(sig)
            return
        super().append(sig)


def send_kill(pid: int) -> bool:
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


def send_signal(pid: int, sig: int) -> None:
    """kill(pid, sig) of a tracee; a process already gone is no error, a refusal is logged."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.error("tracer: cannot send signal %d to process %d: %s", sig, pid, exc)


def kill_and_reap(pid: int) -> int | None:
    """SIGKILL a tracee and consume its end; its raw status, or None if it was not ours."""
    if not send_kill(pid):
        return None
    try:
        while True:
            status = pt.wait(pid)
            if not os.WIFSTOPPED(status):
                return status
    except MigrateError:
        return None


def from_terminal(pid: int) -> bool:
    """True if the signal `pid` is stopped with came from a terminal (si_code SI_KERNEL: the
    tty driver signals the foreground process group so), not from kill()."""
    info = ctypes.create_string_buffer(128)
    try:
        pt.ptrace(pt.GETSIGINFO, pid, 0, ctypes.addressof(info))
    except MigrateError:
        return False
    return int.from_bytes(info.raw[8:12], "little", signed=True) == SI_KERNEL


def own_signal(pid: int) -> bool:
    """True if the signal `pid` is stopped with was sent by kill() from this process
    (si_code SI_USER, si_pid ours): the tracer's STEP_SIGNAL, not a user's."""
    info = ctypes.create_string_buffer(128)
    try:
        pt.ptrace(pt.GETSIGINFO, pid, 0, ctypes.addressof(info))
    except MigrateError:
        return False
    code, _, sender = struct.unpack_from("<iii", info.raw, 8)   # si_pid: after a pad
    return code == 0 and sender == os.getpid()


def child_signal(pid: int, t: "Tracee") -> bool:
    """True if the SIGCHLD `pid` is stopped with was sent by the kernel for one of the
    children of `t` (si_code CLD_EXITED..CLD_CONTINUED, si_pid among them or reaped
    lately, `Tracee.kin`); False for a user's kill() (SI_USER: a process may not forge a
    positive si_code for another's signal)."""
    if not t.children and not t.lately:
        return False
    info = ctypes.create_string_buffer(128)
    try:
        pt.ptrace(pt.GETSIGINFO, pid, 0, ctypes.addressof(info))
    except MigrateError:
        return False
    code, _, child = struct.unpack_from("<iiI", info.raw, 8)
    return CLD_EXITED <= code <= CLD_CONTINUED and t.kin(child)


def pending(pid: int, sig: int) -> bool:
    """True if `sig` is pending for `pid` (sent to the process or to its thread). Exact for
    a tracee in a ptrace-stop, or asleep in pause() with the tracer thread not yet told."""
    try:
        st = procstatus.read(pid)
        return bool((int(st["ShdPnd"], 16) | int(st["SigPnd"], 16)) >> (sig - 1) & 1)
    except (OSError, KeyError, ValueError):
        return False


def ignores(pid: int, sig: int) -> bool:
    try:
        return bool(int(procstatus.read(pid)["SigIgn"], 16) >> (sig - 1) & 1)
    except (OSError, KeyError, ValueError):
        return True


def resolve(fut: Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def as_error(exc: BaseException, what: str, pid: int | None) -> MigrateError:
    """Any failure as the MigrateError a caller can handle (an errno and a message)."""
    if isinstance(exc, MigrateError):
        return exc
    if isinstance(exc, BpfsError):
        return MigrateError(exc.errno, exc.message, pid)
    if isinstance(exc, OSError):
        return from_oserror(exc, what, pid)
    return MigrateError(errno.EIO, f"{what}: internal error in the tracer ({exc!r})", pid)

"""Dump a process that is already running, wherever it is, and give it back untouched if the
move fails: `seize_running`, `stop`, `dump_running`, `release` (and `discard` once moved).

Every call for one process comes from the thread that seized it (ptrace answers only the
tracer thread); the tracer need not be its parent. Errors are `MigrateError` with errno:
ESRCH the process is gone, EBUSY a state that cannot move yet (already traced by another
tracer, several threads, a shared mapping, an fd that cannot move, user or group ids that
differ, stopped by job control), each message saying which.

The seize sets no ptrace option: no PTRACE_O_EXITKILL (if we die, it runs on), no event
stops; so a detach leaves nothing behind. Signals: while it is stopped, signals sent to it
stay pending in the kernel (a ptrace-stopped task does not dequeue them), and the dump's
injected syscalls run with every signal blocked, so none is dequeued there either. Only a
signal dequeued before the interrupt trap (its signal-delivery-stop) is taken from it: it is
recorded, put first in the image's pending signals, and sent again by `release`.

Where it stopped: the interrupt trap lies on its way back to user space, after any syscall
it was in returned. A blocking syscall returns -ERESTART* there; resumed on this kernel (the
registers as they were), the kernel restarts it as for any stop: a nanosleep keeps its end.
The image cannot carry the kernel's restart state, so `image_registers` makes the syscall
run again from the start on the node: rip back on the `syscall` instruction, rax its number,
its arguments still in their registers. A relative sleep (nanosleep, poll's or select's
timeout) starts over for its full length; an absolute one (clock_nanosleep TIMER_ABSTIME, as
Python's time.sleep does) keeps its end on the node's clock. A call already being restarted
by restart_syscall (it was stopped before, e.g. an earlier move that failed) has lost its
number: it returns EINTR on the node, as calls do after a SIGSTOP/SIGCONT (signal(7)).
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from typing import AbstractSet

from bpfs.migrate import dump, openfiles, procfs
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.image import Image

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
SYS_RESTART_SYSCALL = 219
SYSCALL_INSN_SIZE = 2
NO_SYSCALL = 2**64 - 1
ALL_SIGNALS = 2**64 - 1   # SIGKILL and SIGSTOP cannot be blocked; the kernel drops their bits
JOB_STOPS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


@dataclass
class _Seized:
    """What this tracer knows of one seized process."""

    stopped: bool = False
    interrupted: bool = False               # PTRACE_INTERRUPT sent, its stop not seen yet
    job_stop: int = 0                       # its stop signal if stopped by job control
    signals: list[int] = field(default_factory=list)   # dequeued by its delivery stops


_seized: dict[int, _Seized] = {}


# ---- seize, stop, release ----

def seize_running(pid: int) -> None:
    """PTRACE_SEIZE `pid` (it keeps running). EBUSY if another tracer has it, ESRCH if gone."""
    try:
        pt.seize(pid, 0)
    except MigrateError as exc:
        raise _seize_error(pid, exc) from exc
    _seized[pid] = _Seized()


def _seize_error(pid: int, exc: MigrateError) -> MigrateError:
    if exc.errno == errno.ESRCH:
        return MigrateError(errno.ESRCH, f"no process {pid}", pid)
    if exc.errno == errno.EPERM:    # already traced, or exiting: the status says which
        try:
            status = procfs.read_status(pid)
        except MigrateError:
            return MigrateError(errno.ESRCH, f"no process {pid}", pid)
        if status.get("State", "")[:1] in ("Z", "X"):
            return MigrateError(errno.ESRCH, f"process {pid} has ended", pid)
        tracer = status.get("TracerPid", "0")
        if tracer != "0":
            return MigrateError(errno.EBUSY, f"process {pid} is traced by process {tracer}",
                                pid)
    return exc


def stop(pid: int) -> None:
    """Bring the seized `pid` into a ptrace-stop (PTRACE_INTERRUPT) and wait for it there.

    Signals it dequeues first are kept for `release` and the image. ESRCH if it ended (the
    tracer has then consumed one wait status of it; its parent still gets its own)."""
    state = _state(pid)
    if state.stopped:
        return
    interrupt(pid)
    while True:
        status = pt.wait(pid)
        if not os.WIFSTOPPED(status):
            _seized.pop(pid, None)
            raise MigrateError(errno.ESRCH, f"process {pid} ended while being stopped", pid)
        sig, event = os.WSTOPSIG(status), status >> 16
        if event == pt.EVENT_STOP:
            state.stopped, state.job_stop = True, sig if sig in JOB_STOPS else 0
            state.interrupted = False
            return
        if event == 0:
            state.signals.append(sig)
        pt.cont(pid, 0)


def interrupt(pid: int) -> None:
    """PTRACE_INTERRUPT the seized `pid` once, now, without waiting (`stop` waits). Once
    only: an interrupt sent to a tracee already in its stop is a second trap, taken at the
    next resume, which an injected syscall would take for its own single-step."""
    state = _state(pid)
    if not (state.stopped or state.interrupted):
        pt.ptrace(pt.INTERRUPT, pid)
        state.interrupted = True


def keep(pid: int) -> None:
    """The caller keeps the stopped `pid` (parked as a ghost): forget our record of it."""
    _seized.pop(pid, None)


def release(pid: int) -> None:
    """Let `pid` go on exactly as it was: the signals `stop` took are sent again (pending,
    delivered first thing), then PTRACE_DETACH: its registers are as they were, and a syscall
    the stop interrupted is restarted by the kernel as after any stop. A process stopped by
    job control stays stopped."""
    state = _state(pid)
    stop(pid)   # PTRACE_DETACH needs a stopped tracee
    _seized.pop(pid, None)
    for sig in state.signals:
        os.kill(pid, sig)
    pt.detach(pid, 0)


def discard(pid: int) -> None:
    """SIGKILL a seized process that moved (its copy runs elsewhere) and forget it."""
    _seized.pop(pid, None)
    dump.kill(pid)


def _state(pid: int) -> _Seized:
    state = _seized.get(pid)
    if state is None:
        raise MigrateError(errno.EINVAL, f"process {pid} is not seized by this tracer", pid)
    return state


# ---- the dump ----

def dump_running(pid: int, links: AbstractSet[int] = frozenset(), lazy: bool = False
                 ) -> Image:
    """An Image of the seized `pid` at its stop point (stopped first if need be), with its
    open files but `links` (fds the caller carries itself, e.g. stdio sockets). The process
    stays stopped, its registers, mask and pending signals as they were. EBUSY for what
    cannot move (module docstring), EPERM for a set-ID or file-capability program.
    `lazy`: its big anonymous runs are read when they are sent (bpfs.migrate.lazyrun),
    so it must stay stopped until then."""
    state = _state(pid)
    stop(pid)
    if state.job_stop:
        raise MigrateError(errno.EBUSY, f"process {pid} is stopped by job control "
                           f"({signal.Signals(state.job_stop).name}): continue it first", pid)
    maps = procfs.parse_maps(procfs.read_text(pid, "maps"))
    frozen = _never_writable(pid) if any(m.shared for m in maps) else set()
    status = procfs.read_status(pid)
    _refuse(pid, status, maps, frozen)
    files = openfiles.collect(pid, links)
    regs = pt.getregs(pid)
    mask = pt.get_sigmask(pid)
    pt.set_sigmask(pid, ALL_SIGNALS)   # pending signals stay queued through the injections
    try:
        img = dump.dump(pid, frozen, lazy, (status, maps))   # stopped: both as they were
    finally:
        pt.set_sigmask(pid, mask)
        pt.setregs(pid, regs)
    img.regs, img.sigmask, img.open_files = image_registers(regs).pack(), mask, files
    img.pending = state.signals + [s for s in img.pending if s not in state.signals]
    return img


def _refuse(pid: int, status: dict[str, str], maps: list[procfs.Mapping],
            frozen: AbstractSet[int]) -> None:
    """EBUSY for threads, user or group ids that differ, shared mappings."""
    if status.get("Threads", "1") != "1":
        raise MigrateError(errno.EBUSY, f"process {pid} has {status['Threads']} threads: "
                           "only single-threaded processes can move", pid)
    for key in ("Uid", "Gid"):
        ids = status[key].split()
        if len(set(ids)) != 1:
            raise MigrateError(errno.EBUSY, f"process {pid} has {key.lower()}s that differ "
                               f"(real, effective, saved, fs: {', '.join(ids)})", pid)
    shared = [m for m in maps if m.shared and m.path not in procfs.SPECIAL
              and m.start not in frozen]
    if shared:
        names = ", ".join(f"{m.path or 'anonymous'} at {m.start:#x}" for m in shared)
        raise MigrateError(errno.EBUSY, f"process {pid} has shared mappings ({names}): "
                           "they cannot move", pid)


def _never_writable(pid: int) -> set[int]:
    """Starts of shared file mappings without VM_MAYWRITE ("mw" in smaps' VmFlags): opened
    read-only, nothing can ever write through them, so a private mapping of the same file
    is the same memory (glibc maps its gconv cache so)."""
    out, start, file_backed = set(), 0, False
    for line in procfs.read_text(pid, "smaps").splitlines():
        head = line.split(maxsplit=6)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            lo = head[0].split("-")[0]
            start = int(lo, 16) if head[1].endswith("s") else -1
            file_backed = head[4] != "0"
        elif line.startswith("VmFlags:") and start >= 0 and file_backed:
            if "mw" not in line.split()[1:]:
                out.add(start)
    return out


def image_registers(regs: pt.Regs) -> pt.Regs:
    """The registers to resume with on the node: a syscall the stop interrupted runs again
    from its start (the module docstring says why and what that means for sleeps)."""
    out = regs.copy()
    if out.orig_rax == NO_SYSCALL or out.orig_rax >= 2**63:
        return out
    err = 2**64 - out.rax if out.rax >= 2**63 else 0
    if err not in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
        return out
    if out.orig_rax == SYS_RESTART_SYSCALL:
        out.rax = 2**64 - errno.EINTR
    else:
        out.rax, out.rip = out.orig_rax, out.rip - SYSCALL_INSN_SIZE
    return out

"""Ghost surgery: what the tracer does to ONE stopped tracee (park it, wake it, end it).

`park` turns a process dumped at its entry point into a ghost asleep in pause() with only its
argument pages and the vdso left; `halt`, `settle`, `aim_exit`/`aim_signal` and `copy` stop,
step, end and fork it (docs/ghosts.md, "Parking", says how and on which kernel facts).

Every function runs in the tracer thread. Signals that arrive while a function waits for the
tracee are suppressed and appended to the caller's `signals` list (the tracer reports them).
A tracee that dies meanwhile raises `Gone` carrying its raw wait status (already consumed).
Other failures are `MigrateError` (errno and pid).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import struct

from bpfs.migrate import procfs
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.procfs import PAGE

SYS_PAUSE, SYS_CLONE, SYS_EXIT_GROUP, SYS_RSEQ = 34, 56, 231, 334
CLONE_PARENT, CLONE_PTRACE = 0x8000, 0x2000
# clone(2) flags for a copy of a ghost: a fork whose parent is the ghost's parent (the CSIGNAL
# byte is ignored with CLONE_PARENT: the child gets the caller's own exit_signal)
CLONE_FLAGS = CLONE_PARENT | signal.SIGCHLD
# fork(2): a child of the caller, whose end sends it SIGCHLD (a ghost's child, `Tracer.fork`)
FORK_FLAGS = signal.SIGCHLD
# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK: a signal came first
RESTART = frozenset({512, 513, 514, 516})
PR_SET_DUMPABLE, PR_SET_NAME = 4, 15
RSEQ_FLAG_UNREGISTER = 1
ROBUST_LIST_HEAD_SIZE = 24
NO_SYSCALL = 2**64 - 1  # orig_rax = -1: the kernel does not rewrite rip for a syscall restart
SIGSET_SIZE = 8

# Signals whose default action does not end a process: a ghost cannot "die" of them.
NOT_FATAL = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
                       signal.SIGCONT, signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH})


class Gone(Exception):
    """The tracee ended while we waited for it; `status` is its raw wait status (consumed)."""

    def __init__(self, pid: int, status: int) -> None:
        super().__init__(f"process {pid} ended (wait status {status:#x})")
        self.pid = pid
        self.status = status


# ---- waiting and injecting ----

def wait_stop(pid: int) -> int:
    """Consume the next event of `pid`: its raw status if a ptrace-stop, else raise Gone."""
    status = pt.wait(pid)
    if os.WIFSTOPPED(status):
        return status
    raise Gone(pid, status)


def stop_parts(status: int) -> tuple[int, int]:
    """(signal, ptrace event) of a stopped wait status."""
    return (status >> 8) & 0xFF, (status >> 16) & 0xFF


def inject(pid: int, base: pt.Regs, gadget: int, signals: list[int], nr: int, *args: int) -> int:
    """Run one syscall in the stopped `pid` by single-stepping the `syscall` at `gadget`.

    Unlike `ptrace.inject`, a signal that arrives first (a signal-delivery-stop before the step)
    is suppressed, recorded in `signals`, and the step is retried. Returns rax (-errno on error).
    """
    regs = base.copy()
    regs.rax, regs.orig_rax, regs.rip = nr, NO_SYSCALL, gadget
    for name, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, val & (2**64 - 1))
    pt.setregs(pid, regs)
    while True:
        pt.singlestep(pid)
        sig, event = stop_parts(wait_stop(pid))
        now = pt.getregs(pid)
        if now.rip != gadget:  # the instruction ran
            if sig != signal.SIGTRAP:
                signals.append(sig)
            return now.rax - 2**64 if now.rax >= 2**63 else now.rax
        if event == 0:
            signals.append(sig)


EXEC_STOP_CODE = signal.SIGTRAP | pt.EVENT_EXEC << 8


def settle(pid: int, signals: list[int]) -> None:
    """Get the stopped `pid` out of an in-syscall stop before its registers are changed.

    The exec event stop (PTRACE_EVENT_EXEC) lies inside execve: resumed from there, the
    syscall's return value would overwrite rax. A single-step from it traps at the syscall's
    exit, before any instruction of the program runs. Other stops (signal-delivery, interrupt,
    group-stop) are already outside any syscall: nothing to do.
    """
    info = ctypes.create_string_buffer(128)
    try:
        pt.ptrace(pt.GETSIGINFO, pid, 0, ctypes.addressof(info))
    except MigrateError as exc:
        if exc.errno == errno.EINVAL:  # a group-stop: outside any syscall
            return
        raise
    if struct.unpack_from("<i", info.raw, 8)[0] != EXEC_STOP_CODE:
        return
    pt.singlestep(pid)
    sig, event = stop_parts(wait_stop(pid))
    if event == 0 and sig != signal.SIGTRAP:
        signals.append(sig)  # it came first; its stop is outside the syscall too


def halt(pid: int, signals: list[int]) -> None:
    """Bring a running seized tracee into a ptrace-stop (PTRACE_INTERRUPT), catching signals."""
    pt.ptrace(pt.INTERRUPT, pid)
    while True:
        sig, event = stop_parts(wait_stop(pid))
        if event == pt.EVENT_STOP:
            return
        if event == 0:
            signals.append(sig)
        pt.cont(pid, 0)


# ---- the vdso: a syscall instruction and 32 zero bytes ----

SYSCALL_INSN = b"\x0f\x05"
_vdso_offsets: dict[bytes, tuple[int, int]] = {}


def vdso(pid: int) -> tuple[int, int, int]:
    """(start, syscall gadget, address of 32 zero bytes) in the vdso of `pid`.

    The vdso is the same image in every process of this kernel, so offsets are found once.
    The zero bytes serve as a `struct sigaction` meaning SIG_DFL (the kernel only reads it).
    """
    maps = procfs.parse_maps(procfs.read_text(pid, "maps"))
    found = [(m.start, m.end) for m in maps if m.path == "[vdso]"]
    if not found:
        raise MigrateError(errno.ENOEXEC, "process has no vdso", pid)
    start, end = found[0]
    data = pt.read_memory(pid, [(start, end - start)])
    key = data[:4096]
    if key not in _vdso_offsets:
        _vdso_offsets[key] = (data.find(SYSCALL_INSN), _zeros(data))
    gadget, zeros = _vdso_offsets[key]
    if gadget < 0 or zeros < 0:
        raise MigrateError(errno.ENOEXEC, "vdso lacks a syscall instruction or zero bytes", pid)
    return start, start + gadget, start + zeros


def sleeping_gadget(pid: int, regs: pt.Regs) -> int:
    """The `syscall` instruction where a parked ghost, now halted, was asleep in pause().

    Halted in pause() its rip is just after the instruction; halted on its way back in after a
    suppressed signal (the kernel rewound rip to restart pause), at it. Two bytes read, not the
    vdso scanned; `vdso` if neither holds (not a parked ghost).
    """
    try:
        code = pt.read_memory(pid, [(regs.rip - 2, 4)])
    except MigrateError:
        code = b""
    if code[:2] == SYSCALL_INSN:
        return regs.rip - 2
    if code[2:] == SYSCALL_INSN:
        return regs.rip
    return vdso(pid)[1]


def _zeros(data: bytes) -> int:
    off = data.find(bytes(32))
    while off >= 0 and off % 8:
        off = data.find(bytes(32), off + 1)
    return off


# ---- parking ----

def vm_rss_kb(pid: int) -> int:
    """VmRSS of `pid` in kB (0 if the line is missing, as for a zombie)."""
    status = procfs.read_status(pid)
    return int(status.get("VmRSS", "0 kB").split()[0])


def park(pid: int, signals: list[int], name: bytes | None = None) -> None:
    """Shrink the stopped `pid` to its argument pages and leave it asleep in pause().

    `name` (at most 15 bytes) renames the process first (PR_SET_NAME), for the tracer's own
    doorbell; ghosts keep their name.
    """
    settle(pid, signals)
    regs = pt.getregs(pid)
    _, gadget, _ = vdso(pid)
    pt.set_sigmask(pid, 0)
    rseq = pt.get_rseq(pid)
    if rseq:
        _check(pid, "rseq unregister", inject(pid, regs, gadget, signals, SYS_RSEQ, rseq[0],
                                               rseq[1], RSEQ_FLAG_UNREGISTER, rseq[2]))
    inject(pid, regs, gadget, signals, pt.SYS["set_robust_list"], 0, ROBUST_LIST_HEAD_SIZE)
    inject(pid, regs, gadget, signals, pt.SYS["set_tid_address"], 0)
    if name:
        _rename(pid, regs, gadget, signals, name)
    for lo, hi in unmap_ranges(pid):
        _check(pid, f"munmap {lo:#x}-{hi:#x}",
               inject(pid, regs, gadget, signals, pt.SYS["munmap"], lo, hi - lo))
    sleep_in_pause(pid, regs, gadget)


def copy(pid: int, base: pt.Regs, gadget: int, signals: list[int], children: list[int],
         flags: int) -> int:
    """Make a copy of the stopped, parked `pid`: inject clone(`flags` | CLONE_PTRACE).

    `flags` is CLONE_FLAGS (a sibling: its parent is the parent of `pid`, its exit_signal
    that of `pid`) or FORK_FLAGS (a child of `pid`, SIGCHLD at its end). CLONE_PTRACE: the
    kernel attaches the child to the tracer of `pid` (this thread) before it runs, with the
    same ptrace options, and the child starts with a ptrace-stop of its own (an EVENT_STOP,
    since `pid` was seized) that this function does NOT consume. No fork event stop is asked
    for (PTRACE_O_TRACEFORK): that is one stop and two requests fewer per copy.

    The child is a fork: a private copy of the parked memory (argument pages and vdso, so the
    same /proc/PID/cmdline and environ), the same name, signal dispositions, empty signal mask,
    process group and session, credentials; no rseq, robust list or clear-child-tid (rseq
    would be inherited, but is unregistered in a ghost; the other two never are).

    The new pid is appended to `children` once clone returned it. Returns it, or -errno if
    clone failed (EAGAIN: pid or process limits). `pid` is left stopped after the syscall.
    If `pid` is killed after the child was made and before clone returned, the pid never
    comes (Gone, or MigrateError ESRCH): the caller must look for its tracee by other means.
    """
    regs = base.copy()
    regs.rax, regs.orig_rax, regs.rip = SYS_CLONE, NO_SYSCALL, gadget
    regs.rdi = flags | CLONE_PTRACE
    regs.rsi = regs.rdx = regs.r10 = regs.r8 = 0  # same stack, no tids, no tls
    pt.setregs(pid, regs)
    while True:
        pt.singlestep(pid)
        sig, event = stop_parts(wait_stop(pid))
        if event:  # an event stop: the step's SIGTRAP still comes before any instruction
            continue
        now = pt.getregs(pid)
        if now.rip == gadget:  # a signal came before the instruction: suppressed, step again
            signals.append(sig)
            continue
        if sig != signal.SIGTRAP:
            signals.append(sig)
        res = now.rax - 2**64 if now.rax >= 2**63 else now.rax
        if -res in RESTART:  # a signal arrived during fork: it was undone
            pt.setregs(pid, regs)
            continue
        if res > 0:
            children.append(res)
        return res


def sleep_in_pause(pid: int, base: pt.Regs, gadget: int) -> None:
    regs = base.copy()
    regs.rip, regs.rax, regs.orig_rax = gadget, SYS_PAUSE, NO_SYSCALL
    pt.setregs(pid, regs)
    pt.cont(pid, 0)


def stop_again(pid: int, base: pt.Regs, gadget: int, signals: list[int]) -> bool:
    """Put a ghost halted out of its group-stop (set_stopped's, held with PTRACE_LISTEN) back
    into it, to sleep in pause() once continued. True if it is held stopped again.

    An interrupt trap taken while its group is still stopped is reported as a group-stop
    (with the stop signal: the kernel's SIGNAL_STOP_STOPPED outlives our resuming it), so
    PTRACE_INTERRUPT, then PTRACE_CONT: it traps before any instruction, and LISTEN holds it.
    If a SIGCONT ended the group-stop meanwhile, the trap says SIGTRAP: it goes on in pause().
    """
    regs = base.copy()
    regs.rip, regs.rax, regs.orig_rax = gadget, SYS_PAUSE, NO_SYSCALL
    pt.setregs(pid, regs)
    pt.ptrace(pt.INTERRUPT, pid)
    pt.cont(pid, 0)
    while True:
        sig, event = stop_parts(wait_stop(pid))
        if event == pt.EVENT_STOP:
            break
        if event == 0:
            signals.append(sig)
        pt.cont(pid, 0)
    if sig == signal.SIGTRAP:
        pt.cont(pid, 0)
        return False
    pt.ptrace(pt.LISTEN, pid)
    return True


def _rename(pid: int, regs: pt.Regs, gadget: int, signals: list[int], name: bytes) -> None:
    """PR_SET_NAME from a string written below the stack pointer (memory unmapped next)."""
    addr = (regs.rsp - 4096) & ~15
    pt.write_memory(pid, [(addr, name[:15] + b"\0")])
    _check(pid, "PR_SET_NAME", inject(pid, regs, gadget, signals, pt.SYS["prctl"],
                                      PR_SET_NAME, addr))


def _check(pid: int, what: str, res: int) -> int:
    if res < 0:
        raise MigrateError(-res, f"{what} in ghost: {os.strerror(-res)}", pid)
    return res


def unmap_ranges(pid: int) -> list[tuple[int, int]]:
    """The address ranges to munmap: all mappings but the kept ones, as few ranges as possible.

    Kept: the pages holding the argument and environment strings (mm->arg_start..env_end) and
    the kernel's special mappings. [vsyscall] lies above the user address space: untouched.
    """
    maps = procfs.parse_maps(procfs.read_text(pid, "maps"))
    mm = procfs.parse_stat(procfs.read_text(pid, "stat"))
    keep = [(m.start, m.end) for m in maps if m.path in procfs.SPECIAL and
            m.path != "[vsyscall]"]
    lo = min(mm["arg_start"], mm["env_start"]) & ~(PAGE - 1)
    hi = (max(mm["arg_end"], mm["env_end"]) + PAGE - 1) & ~(PAGE - 1)
    if hi > lo:
        keep.append((lo, hi))
    top = max(m.end for m in maps if m.path != "[vsyscall]")
    return _gaps(sorted(keep), maps[0].start, top)


def _gaps(keep: list[tuple[int, int]], bottom: int, top: int) -> list[tuple[int, int]]:
    out, pos = [], bottom
    for lo, hi in keep:
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if top > pos:
        out.append((pos, top))
    return out


# ---- ending ----

def aim_exit(pid: int, code: int, signals: list[int], gadget: int = 0) -> None:
    """Make the stopped `pid` call exit_group(code) when resumed, and resume it.
    `gadget`: where the parked ghost sleeps, known, and it is in an interrupt stop (its
    halt's: not inside an exec), so two requests fewer (`settle`, `sleeping_gadget`)."""
    if not gadget:
        settle(pid, signals)
    regs = pt.getregs(pid)
    if regs.rip - gadget not in (0, 2) or not gadget:
        gadget = sleeping_gadget(pid, regs)     # a parked ghost: no need to read its maps
    regs.rip, regs.rax, regs.orig_rax, regs.rdi = gadget, SYS_EXIT_GROUP, NO_SYSCALL, code
    pt.setregs(pid, regs)
    pt.cont(pid, 0)


def aim_signal(pid: int, sig: int, signals: list[int]) -> None:
    """Make the stopped `pid` die by `sig` with its default action, without a core dump.

    The disposition is reset to SIG_DFL if it is not the default; RLIMIT_CORE := 0 and
    PR_SET_DUMPABLE := 0 (the latter also stops a core_pattern pipe). Then `sig` is queued, the
    ghost resumed, and at its signal-delivery-stop the signal is let through.

    Every change is a syscall the ghost makes itself (injected), so none needs a capability:
    a process may always lower its own limits, while prlimit() on another user's process
    needs CAP_SYS_RESOURCE, which a master often lacks (Docker's default set; a root whose
    bounding set was trimmed). The 32 zero bytes of the vdso serve as the new
    `struct rlimit` {0, 0}. A failed step raises MigrateError: the ghost has not been
    resumed, and the caller must end it another way (the tracer kills it).
    """
    settle(pid, signals)
    _, gadget, zeros = vdso(pid)
    regs = pt.getregs(pid)
    pt.set_sigmask(pid, 0)
    if _not_default(pid, sig):
        _check(pid, "rt_sigaction", inject(pid, regs, gadget, signals, pt.SYS["rt_sigaction"],
                                           sig, zeros, 0, SIGSET_SIZE))
    _check(pid, "prlimit RLIMIT_CORE", inject(pid, regs, gadget, signals, pt.SYS["prlimit64"],
                                              0, resource.RLIMIT_CORE, zeros, 0))
    _check(pid, "PR_SET_DUMPABLE", inject(pid, regs, gadget, signals, pt.SYS["prctl"],
                                          PR_SET_DUMPABLE, 0))
    os.kill(pid, sig)
    sleep_in_pause(pid, regs, gadget)
    _let_through(pid, sig, signals)


def _let_through(pid: int, sig: int, signals: list[int]) -> None:
    """At the signal-delivery-stop for `sig`, deliver it; other signals are suppressed."""
    while True:
        got, event = stop_parts(wait_stop(pid))
        if event == 0 and got == sig:
            pt.cont(pid, sig)
            return
        if event == 0:
            signals.append(got)
        pt.cont(pid, 0)


def _not_default(pid: int, sig: int) -> bool:
    """Ignored (inherited SIG_IGN) or caught (a process finished before its exec)."""
    status = procfs.read_status(pid)
    mask = int(status["SigIgn"], 16) | int(status["SigCgt"], 16)
    return bool(mask >> (sig - 1) & 1)


def still_traced(pid: int) -> bool:
    """True if `pid` is still ours to wait for (not yet reaped or released)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT | pt.WALL)
    except ChildProcessError:
        return False
    return True


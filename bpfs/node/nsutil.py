"""Thin ctypes binding for the namespace and mount syscalls Python 3.11 lacks.

Constants come from <sched.h>, <sys/mount.h> and <sys/prctl.h>. Every wrapper
raises OSError with the errno and a message naming the call and its target, so
callers can tell EPERM (not root) from EINVAL (not a mount point) and report it.
This module imports nothing heavy: the node launcher runs it before the daemon
proper imports trio.
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Optional

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace open at `fd`; for CLONE_NEWPID only future children move."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: Optional[str], target: str, fstype: Optional[str] = None,
          flags: int = 0, data: Optional[str] = None) -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount {fstype or ''} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname {name}")


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send `sig` to us when our parent dies."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl(PDEATHSIG)")


def set_comm(name: str) -> None:
    """Set the name `ps -o comm`, `top` and pgrep show (15 bytes at most)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


# ---- command line, as ps shows it ---------------------------------------------

PR_SET_MM = 35
PR_SET_MM_MAP = 14


class _PrctlMmMap(ctypes.Structure):
    """struct prctl_mm_map of <linux/prctl.h>."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
        "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


_cmdline_buffers: list[ctypes.Array] = []    # must outlive the process's use of them


def set_cmdline(argv: list[str]) -> bool:
    """Make /proc/self/cmdline (what ps shows) read `argv`; False if the kernel said no.

    For node daemons forked (not exec'd) by `bpfs up`, which would otherwise show
    the command line of `bpfs up`. PR_SET_MM_MAP replaces the whole memory
    descriptor map, so every other field is copied from /proc/self/stat (proc(5)
    fields 26-28 and 45-51) and brk from sbrk(0). Unlike the single-field
    PR_SET_MM_ARG_START it needs no CAP_SYS_RESOURCE (which this machine's root
    lacks), only CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE.
    """
    raw = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    field = lambda n: int(fields[n - 3])  # noqa: E731  (proc(5) numbers from 1; ")" ends field 2)
    sbrk = _libc.sbrk
    sbrk.restype = ctypes.c_void_p
    start = ctypes.addressof(buf)
    mm = _PrctlMmMap(start_code=field(26), end_code=field(27), start_data=field(45),
                     end_data=field(46), start_brk=field(47), brk=sbrk(ctypes.c_long(0)) or 0,
                     start_stack=field(28), arg_start=start, arg_end=start + len(raw),
                     env_start=field(50), env_end=field(51), auxv=0, auxv_size=0,
                     exe_fd=0xFFFFFFFF)
    ret = _libc.prctl(PR_SET_MM, ctypes.c_ulong(PR_SET_MM_MAP),
                      ctypes.c_ulong(ctypes.addressof(mm)), ctypes.c_ulong(ctypes.sizeof(mm)),
                      ctypes.c_ulong(0))
    if ret != 0:
        return False
    _cmdline_buffers.append(buf)
    return True


# ---- SIGCHLD for exits only ---------------------------------------------------

SA_NOCLDSTOP = 1


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86_64 (handler, 1024-bit mask, flags, restorer)."""
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_uint64 * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


def sigchld_exits_only() -> None:
    """Add SA_NOCLDSTOP to the SIGCHLD handler Python (trio) installed.

    The node daemon's Restorer ptraces the processes it builds, and every
    ptrace stop of a child sends its process a SIGCHLD: half a dozen wake-ups of the
    event loop per restore, each for a reaper sweep that finds nothing (profiled:
    most of the main thread's loop iterations). With SA_NOCLDSTOP the kernel still
    wakes waitpid() but signals only exits, which are what the reaper is for.
    Python's signal module offers no sa_flags, hence sigaction through ctypes.
    """
    act = _Sigaction()
    _check(_libc.sigaction(signal.SIGCHLD, None, ctypes.byref(act)), "sigaction")
    if act.handler in (None, 0, 1):          # SIG_DFL, SIG_IGN: no handler to change
        return
    act.flags |= SA_NOCLDSTOP
    _check(_libc.sigaction(signal.SIGCHLD, ctypes.byref(act), None), "sigaction")


# ---- signals with their sender: signalfd -------------------------------------

SFD_CLOEXEC, SFD_NONBLOCK = 0o2000000, 0o4000
_SIGINFO = 128                           # sizeof(struct signalfd_siginfo)


def signalfd(sigs: "set[int] | tuple[int, ...]") -> int:
    """A non-blocking signalfd for `sigs`, which are blocked in the calling thread (and so
    in threads it starts later): they are read from the fd, never handled."""
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    mask = (ctypes.c_uint64 * 16)()
    for sig in sigs:
        mask[0] |= 1 << (sig - 1)
    return _check(_libc.signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC),
                  "signalfd")


def read_signals(fd: int) -> list[tuple[int, int]]:
    """(signal, sender's PID) of every signal queued on the signalfd; the PID is as our PID
    namespace sees it: 0 for a sender outside it (an ancestor namespace) or the kernel."""
    out = []
    while True:
        try:
            data = os.read(fd, _SIGINFO * 16)
        except (BlockingIOError, InterruptedError):
            return out
        for off in range(0, len(data) - _SIGINFO + 1, _SIGINFO):
            signo = int.from_bytes(data[off:off + 4], "little")
            pid = int.from_bytes(data[off + 12:off + 16], "little")
            out.append((signo, pid))

"""The seccomp filter every process on a node runs under, and its user notifications.

Why: a node's processes must live in the cluster's one PID space (issue "One PID space, both
ways"): a fork on a node takes a PID the master chose (the PID of a new ghost there), and
getppid, getpgid, getsid and kill must speak cluster PIDs. The kernel offers no hook for that
but seccomp's user notification: the restore installs this filter in each process it builds
(`FILTER`, with SECCOMP_FILTER_FLAG_NEW_LISTENER, while the process is still root), the
node daemon keeps the listener, every descendant inherits the filter, and the daemon's
supervisor (bpfs/node/supervisor.py) answers each notified call: CONTINUE (the kernel runs
it as asked), a value, or an errno.

Only the calls in `NOTIFIED` stop; everything else runs at full speed. x32 and 32-bit calls
are refused (ENOSYS): they would bypass the table (a 32-bit `fork` has another number).

Layouts are x86_64's (struct seccomp_notif, seccomp_notif_resp, pidfd_info).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 8
# Once the supervisor has received a call, only a fatal signal may interrupt its wait: a
# fork interrupted by a SIGCHLD would fail EINTR (a real fork restarts), and its shell
# would say "Cannot fork" (Linux 5.19).
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 32
RET_ALLOW, RET_NOTIFY = 0x7FFF0000, 0x7FC00000
RET_ENOSYS = 0x00050000 | errno.ENOSYS              # SECCOMP_RET_ERRNO | ENOSYS
FLAG_CONTINUE = 1                                   # SECCOMP_USER_NOTIF_FLAG_CONTINUE

# x86_64 numbers of the calls the supervisor sees.
SYSCALLS = {
    "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "kill": 62, "getppid": 110,
    "getpgrp": 111, "setpgid": 109, "getpgid": 121, "getsid": 124, "rt_sigqueueinfo": 129,
    "tkill": 200, "tgkill": 234, "rt_tgsigqueueinfo": 297, "execveat": 322, "clone3": 435,
    "pidfd_open": 434,
}
NAMES = {nr: name for name, nr in SYSCALLS.items()}
NOTIFIED = tuple(sorted(SYSCALLS.values()))
X32_BIT = 0x40000000
CLONE_THREAD, CLONE_PARENT, CLONE_VFORK = 0x10000, 0x8000, 0x4000

_BPF = struct.Struct("<HBBI")
LD_ABS_W, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06


def _program() -> bytes:
    """arch check; nr >= X32_BIT: ENOSYS; nr in NOTIFIED: notify; else allow."""
    n = len(NOTIFIED)
    ins = [(LD_ABS_W, 0, 0, 4),                     # A = arch
           (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),        # not x86_64: ENOSYS
           (RET_K, 0, 0, RET_ENOSYS),
           (LD_ABS_W, 0, 0, 0),                     # A = nr
           (JGE_K, n + 2, 0, X32_BIT)]              # x32: ENOSYS (the last instruction)
    for i, nr in enumerate(NOTIFIED):               # match: jump to RET_NOTIFY
        ins.append((JEQ_K, n - i, 0, nr))
    ins += [(RET_K, 0, 0, RET_ALLOW), (RET_K, 0, 0, RET_NOTIFY), (RET_K, 0, 0, RET_ENOSYS)]
    return b"".join(_BPF.pack(*i) for i in ins)


FILTER = _program()
FILTER_LEN = len(FILTER) // _BPF.size


def fprog(filter_addr: int) -> bytes:
    """struct sock_fprog for FILTER written at `filter_addr` in the target."""
    return struct.pack("<HxxxxxxQ", FILTER_LEN, filter_addr)


# ---- notifications ----

_NOTIF = struct.Struct("<QIIiIQ6Q")        # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("<QqiI")             # id, val, error, flags


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


IOCTL_RECV = _iowr(0, _NOTIF.size)
IOCTL_SEND = _iowr(1, _RESP.size)
IOCTL_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2
_ADDFD = struct.Struct("<QIIII")           # id, flags, srcfd, newfd, newfd_flags
IOCTL_ADDFD = (1 << 30) | (_ADDFD.size << 16) | (ord("!") << 8) | 3
ADDFD_FLAG_SEND = 2                        # install the fd and answer the call with it


class Notif:
    """One stopped call: `id` (to answer), `pid` (the caller's thread, in our namespace), `nr`,
    `args`."""

    __slots__ = ("id", "pid", "nr", "args")

    def __init__(self, raw: bytes) -> None:
        nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(raw)
        self.id, self.pid, self.nr, self.args = nid, pid, nr, args

    @property
    def name(self) -> str:
        return NAMES.get(self.nr, str(self.nr))


def recv(listener: int) -> Notif | None:
    """The next notification, or None if its caller is gone already (ENOENT) or none is
    pending (a non-blocking listener: EAGAIN)."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, IOCTL_RECV, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EAGAIN, errno.EINTR):
            return None
        raise
    return Notif(bytes(buf))


_libc_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int


def recv_blocking(listener: int) -> Notif | None:
    """Wait for the next notification *without the GIL* (a ctypes call), so the kernel
    hands it over the moment it stops, whatever Python's other threads do; None if its
    caller went away first (ENOENT). InterruptedError when a signal interrupts the wait."""
    buf = ctypes.create_string_buffer(_NOTIF.size)
    if _libc_ioctl(listener, IOCTL_RECV, buf) == 0:
        return Notif(buf.raw)
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        return None
    if err == errno.EINTR:
        raise InterruptedError(err, os.strerror(err))
    raise OSError(err, os.strerror(err))


def answer(listener: int, nid: int, *, val: int = 0, err: int = 0,
           cont: bool = False) -> bool:
    """Answer `nid`: CONTINUE, a value, or -err. False if the caller is gone (ENOENT), or
    the listener is (-1: its job has ended and it was closed; nobody waits any more)."""
    if listener < 0:
        return False
    resp = _RESP.pack(nid, 0 if cont else val, 0 if cont else -err,
                      FLAG_CONTINUE if cont else 0)
    try:
        fcntl.ioctl(listener, IOCTL_SEND, bytearray(resp), True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def answer_with_fd(listener: int, nid: int, fd: int, cloexec: bool) -> bool:
    """Answer `nid` with a copy of our `fd` installed in the caller (its number is the
    call's result: SECCOMP_ADDFD_FLAG_SEND). False if the caller is gone."""
    if listener < 0:
        return False
    req = _ADDFD.pack(nid, ADDFD_FLAG_SEND, fd, 0, os.O_CLOEXEC if cloexec else 0)
    try:
        fcntl.ioctl(listener, IOCTL_ADDFD, bytearray(req), True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def still_waiting(listener: int, nid: int) -> bool:
    """Whether the call `nid` still waits for its answer (its caller has not died since);
    what makes it safe to act on what was read from the caller's memory or /proc."""
    if listener < 0:
        return False
    try:
        fcntl.ioctl(listener, IOCTL_ID_VALID, bytearray(struct.pack("<Q", nid)), True)
    except OSError:
        return False
    return True


# ---- pidfd exit information (Linux 6.15) ----

PIDFD_INFO_EXIT = 8
_PIDFD_INFO = struct.Struct("<QQ11Ii")   # mask, cgroupid, pid..fsgid, exit_code (VER0: 64)
PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO.size << 16) | (0xFF << 8) | 11


PIDFD_INFO_PID = 1


def parent_of(pidfd: int) -> int | None:
    """The parent's PID (in our namespace) of the process behind `pidfd`, None if it has
    been reaped: one ioctl, not a read of /proc."""
    buf = bytearray(_PIDFD_INFO.pack(PIDFD_INFO_PID, 0, *([0] * 11), 0))
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf, True)
    except OSError:
        return None
    fields = _PIDFD_INFO.unpack(buf)
    return fields[4] if fields[0] & PIDFD_INFO_PID else None


def exit_status(pidfd: int) -> int | None:
    """The wait status of the process behind `pidfd` once it has been reaped, else None."""
    buf = bytearray(_PIDFD_INFO.pack(PIDFD_INFO_EXIT, 0, *([0] * 11), 0))
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf, True)
    except OSError:
        return None
    fields = _PIDFD_INFO.unpack(buf)
    if not fields[0] & PIDFD_INFO_EXIT:
        return None
    return fields[13] & 0xFFFF


_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_open(pid: int) -> int:
    fd = _libc.syscall(ctypes.c_long(434), ctypes.c_long(pid), ctypes.c_long(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd

"""Thin ctypes binding to ptrace(2) and its neighbours (x86_64 Linux only).

Policy lives in `dump` and `restore`; this module only knows constants, structures and how to turn
a failed call into a `MigrateError` carrying errno and pid. Every request on a tracee must come
from the thread that attached it (the kernel checks `child->parent == current`), so callers keep
one thread per tracee set.

Syscall injection: `inject()` points rip at a `syscall` instruction already present in the tracee
(the vdso has several; a restore helper has its own stub), single-steps it and reads rax. Nothing
in the tracee's memory is written, so a dump taken afterwards is unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from typing import Iterable, Sequence

from bpfs.migrate.errors import MigrateError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_libc.kill.restype = ctypes.c_int
_libc.kill.argtypes = [ctypes.c_int, ctypes.c_int]

# requests
TRACEME, PEEKDATA, POKEDATA, PEEKUSER, POKEUSER = 0, 2, 5, 3, 6
CONT, KILL, SINGLESTEP, GETREGS, SETREGS, ATTACH, DETACH = 7, 8, 9, 12, 13, 16, 17
SETOPTIONS, GETEVENTMSG, GETSIGINFO = 0x4200, 0x4201, 0x4202
GETREGSET, SETREGSET, SEIZE, INTERRUPT, LISTEN = 0x4204, 0x4205, 0x4206, 0x4207, 0x4208
GETSIGMASK, SETSIGMASK, GET_RSEQ_CONFIGURATION = 0x420A, 0x420B, 0x420F

# options and events
O_TRACESYSGOOD, O_TRACEFORK, O_TRACEVFORK, O_TRACECLONE = 0x1, 0x2, 0x4, 0x8
O_TRACEEXEC, O_TRACEEXIT, O_EXITKILL = 0x10, 0x40, 0x100000
EVENT_FORK, EVENT_VFORK, EVENT_CLONE, EVENT_EXEC, EVENT_EXIT, EVENT_STOP = 1, 2, 3, 4, 6, 128

NT_PRSTATUS, NT_X86_XSTATE = 1, 0x202
MADV_POPULATE_WRITE = 23
WALL = 0x40000000

# offsetof(struct user, u_debugreg) on x86_64: hardware breakpoints need no write to text.
DEBUGREG_OFFSET = 848

# syscall numbers (x86_64)
SYS = dict(
    read=0, write=1, close=3, lseek=8, mmap=9, mprotect=10, munmap=11, brk=12, rt_sigaction=13,
    rt_sigprocmask=14, access=21, mremap=25, getpid=39, sendto=44, recvmsg=47, socketpair=53,
    wait4=61, kill=62, fcntl=72, chdir=80, umask=95,
    setpgid=109, setsid=112,
    setgroups=116, setresuid=117, setresgid=119, sigaltstack=131, personality=135, setpriority=141, prctl=157,
    gettid=186, set_tid_address=218, set_robust_list=273, get_robust_list=274, dup3=292,
    prlimit64=302, process_vm_readv=310, process_vm_writev=311, seccomp=317, rseq=334,
    openat=257, pidfd_open=434, clone3=435,
    close_range=436, pidfd_getfd=438,
)


class Regs(ctypes.Structure):
    """struct user_regs_struct: the general registers, fs_base and gs_base included."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]

    def copy(self) -> "Regs":
        return Regs.from_buffer_copy(self)

    def pack(self) -> bytes:
        return bytes(self)

    @classmethod
    def unpack(cls, data: bytes) -> "Regs":
        return cls.from_buffer_copy(data)


REGS_SIZE = ctypes.sizeof(Regs)


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _fail(what: str, pid: int | None) -> MigrateError:
    code = ctypes.get_errno() or errno.EIO
    return MigrateError(code, f"{what} (pid {pid}): {os.strerror(code)}", pid)


def ptrace(request: int, pid: int, addr: int | None = 0, data: int | None = 0) -> int:
    """One ptrace request; raises MigrateError(errno, pid) when it fails."""
    ctypes.set_errno(0)
    res = _libc.ptrace(request, pid, addr, data)
    if res == -1 and ctypes.get_errno():
        raise _fail(f"ptrace request {request:#x}", pid)
    return res


def syscall(nr: int, *args: int) -> int:
    """A raw system call from this process (for calls Python's os module lacks)."""
    cargs = [ctypes.c_long(a) for a in args]
    res = _libc.syscall(ctypes.c_long(nr), *cargs)
    if res == -1:
        raise _fail(f"syscall {nr}", None)
    return res


def copy_fds(pid: int, numbers: Sequence[int]) -> list[int | None]:
    """Copies (pidfd_getfd, close-on-exec) of `pid`'s fds `numbers`, None for one that is
    not open; the caller closes them. Allowed to whoever may ptrace `pid` (root, or its
    tracer). MigrateError (ESRCH...) for anything else, nothing left open then."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise MigrateError(exc.errno or errno.ESRCH, f"process {pid}: {exc.strerror}",
                           pid) from None
    out: list[int | None] = []
    try:
        for n in numbers:
            try:
                out.append(syscall(SYS["pidfd_getfd"], pidfd, n, 0))
            except MigrateError as exc:
                if exc.errno != errno.EBADF:
                    raise
                out.append(None)
        return out
    except BaseException:
        for fd in out:
            if fd is not None:
                os.close(fd)
        raise
    finally:
        os.close(pidfd)


def kill(pid: int, sig: int) -> None:
    """kill(2), as os.kill (OSError: ProcessLookupError, PermissionError), but with the GIL
    released: os.kill holds it, and the signal wakes a tracee whose stop wakes the tracer
    thread, which then waited for the GIL of the thread still inside kill() (a quarter of
    the master's GIL held per fork on a node, in os.kill, by py-spy)."""
    if _libc.kill(pid, sig) == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def traceme() -> None:
    ptrace(TRACEME, 0)


def seize(pid: int, options: int) -> None:
    ptrace(SEIZE, pid, 0, options)


def setoptions(pid: int, options: int) -> None:
    ptrace(SETOPTIONS, pid, 0, options)


def cont(pid: int, sig: int = 0) -> None:
    ptrace(CONT, pid, 0, sig)


def singlestep(pid: int) -> None:
    ptrace(SINGLESTEP, pid, 0, 0)


def detach(pid: int, sig: int = 0) -> None:
    ptrace(DETACH, pid, 0, sig)


def geteventmsg(pid: int) -> int:
    out = ctypes.c_ulong()
    ptrace(GETEVENTMSG, pid, 0, ctypes.addressof(out))
    return out.value


def getregs(pid: int) -> Regs:
    regs = Regs()
    ptrace(GETREGS, pid, 0, ctypes.addressof(regs))
    return regs


def setregs(pid: int, regs: Regs) -> None:
    ptrace(SETREGS, pid, 0, ctypes.addressof(regs))


_XSTATE_MAX = 16384


def get_xstate(pid: int) -> bytes:
    """NT_X86_XSTATE in full: AVX/AVX-512 state is live at the entry point, FXSAVE is not enough."""
    buf = ctypes.create_string_buffer(_XSTATE_MAX)
    iov = IoVec(ctypes.addressof(buf), _XSTATE_MAX)
    ptrace(GETREGSET, pid, NT_X86_XSTATE, ctypes.addressof(iov))
    return buf.raw[:iov.len]


def set_xstate(pid: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = IoVec(ctypes.addressof(buf), len(data))
    ptrace(SETREGSET, pid, NT_X86_XSTATE, ctypes.addressof(iov))


def xstate_xcr0(xstate: bytes) -> int:
    """The XCR0 feature mask the kernel stores in the sw-reserved bytes (offset 464)."""
    return struct.unpack_from("<Q", xstate, 464)[0] if len(xstate) >= 472 else 0


def get_sigmask(pid: int) -> int:
    out = ctypes.c_ulonglong()
    ptrace(GETSIGMASK, pid, 8, ctypes.addressof(out))
    return out.value


def set_sigmask(pid: int, mask: int) -> None:
    val = ctypes.c_ulonglong(mask)
    ptrace(SETSIGMASK, pid, 8, ctypes.addressof(val))


def get_rseq(pid: int) -> tuple[int, int, int] | None:
    """(area address, size, signature) of the rseq registration, or None if none."""
    buf = ctypes.create_string_buffer(24)
    try:
        ptrace(GET_RSEQ_CONFIGURATION, pid, 24, ctypes.addressof(buf))
    except MigrateError as exc:
        if exc.errno == errno.EIO:  # kernel without the request
            return None
        raise
    addr, size, sig, _flags, _pad = struct.unpack("<QIIII", buf.raw)
    return (addr, size, sig) if addr else None


def get_robust_list(pid: int) -> tuple[int, int]:
    head, length = ctypes.c_ulong(), ctypes.c_size_t()
    syscall(SYS["get_robust_list"], pid, ctypes.addressof(head), ctypes.addressof(length))
    return head.value, length.value


def set_debugreg(pid: int, index: int, value: int) -> None:
    ptrace(POKEUSER, pid, DEBUGREG_OFFSET + 8 * index, value)


def wait(pid: int, flags: int = 0) -> int:
    """waitpid(pid, __WALL | flags) -> status; 0 if WNOHANG found nothing."""
    try:
        got, status = os.waitpid(pid, WALL | flags)
    except ChildProcessError as exc:
        raise MigrateError(errno.ECHILD, f"waitpid {pid}: no such child", pid) from exc
    return status if got else 0


def wait_stop(pid: int) -> int:
    """Wait until `pid` is in a ptrace stop; return the stop signal | (event << 8).

    A tracee that exits or is killed instead raises ESRCH with its status in the message.
    """
    status = wait(pid)
    if os.WIFSTOPPED(status):
        return status >> 8
    how = (f"exited with status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
           else f"killed by signal {os.WTERMSIG(status)}")
    raise MigrateError(errno.ESRCH, f"process {pid} {how} while being traced", pid)


def stop_signal(stop: int) -> int:
    return stop & 0xFF


def stop_event(stop: int) -> int:
    return (stop >> 8) & 0xFF


def inject(pid: int, base: Regs, gadget: int, nr: int, *args: int) -> int:
    """Run one syscall in a stopped tracee by single-stepping a `syscall` at `gadget`.

    `base` supplies the other registers (the caller restores the real ones afterwards).
    Returns the raw result: negative values are -errno.
    """
    regs = base.copy()
    regs.rax, regs.orig_rax, regs.rip = nr, 2**64 - 1, gadget
    for name, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, val & (2**64 - 1))
    setregs(pid, regs)
    singlestep(pid)
    stop = wait_stop(pid)
    if stop_signal(stop) != 5:
        raise MigrateError(errno.EIO, f"injected syscall {nr}: unexpected stop {stop:#x}", pid)
    res = getregs(pid).rax
    return res - 2**64 if res >= 2**63 else res


class _PyBuffer(ctypes.Structure):
    """Py_buffer (Include/pybuffer.h), to find where a read-only view's bytes lie."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def _address(data: bytes | memoryview) -> int:
    """Where the bytes of `data` (bytes, or a contiguous view such as a loaded image's runs)
    lie; valid while the caller holds `data`, which keeps its memory exported."""
    if type(data) is bytes:
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    view = _PyBuffer()
    if _get_buffer(data, ctypes.byref(view), 0) != 0:   # PyBUF_SIMPLE: contiguous bytes
        raise MigrateError(errno.EINVAL, "a page run is not a contiguous buffer")
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def _iovecs(items: Sequence[tuple[int, int]]) -> ctypes.Array:
    flat = [v for pair in items for v in pair]
    return (IoVec * len(items)).from_buffer_copy(struct.pack(f"<{len(flat)}Q", *flat))


_IOV_MAX = 1024


def read_memory(pid: int, ranges: Sequence[tuple[int, int]]) -> bytes:
    """process_vm_readv of (addr, size) ranges, concatenated; short reads raise EFAULT."""
    total = sum(size for _, size in ranges)
    buf = ctypes.create_string_buffer(total)
    _read_into(pid, ranges, ctypes.addressof(buf))
    return buf.raw


SMALL_READ = 4 << 20    # bytes read into the heap's memory, not a fresh mapping


def read_memory_buffer(pid: int, ranges: Sequence[tuple[int, int]]) -> mmap.mmap | bytearray:
    """As `read_memory`, returned without a copy: it has find() and slicing, as bytes have.
    A large read goes into an anonymous mapping populated at once (a fault a page cost as
    much as the copy); a small one (SMALL_READ at most: a 1 MB process's dump) into a
    bytearray, whose memory malloc hands back from its last free: no fault at all, where
    a fresh mapping cost 0.5-0.8 ms a MB to populate (this machine, a VM)."""
    total = sum(size for _, size in ranges)
    buf: mmap.mmap | bytearray = bytearray(total) if total <= SMALL_READ else populated(total)
    _read_into(pid, ranges, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    return buf


def populated(size: int) -> mmap.mmap:
    """`size` bytes of fresh anonymous memory, faulted in at once, in huge pages where the
    kernel has them: 100 MB cost 43 ms faulted a page at a time, 12 ms so (6.18, x86_64).
    A page more than asked: mmap.find() before CPython 3.11.5 reads a byte past its `end`
    (gh-105235), which at the end of a mapping is a segfault."""
    buf = mmap.mmap(-1, size + mmap.PAGESIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
        buf.madvise(MADV_POPULATE_WRITE)
    except OSError:   # no THP, or a kernel before 5.14: faulted on first touch instead
        pass
    return buf


def read_into(pid: int, ranges: Sequence[tuple[int, int]], base: int) -> None:
    """process_vm_readv of (addr, size) ranges into memory at address `base` (the caller
    holds it, large enough); short reads raise EFAULT."""
    _read_into(pid, ranges, base)


def _read_into(pid: int, ranges: Sequence[tuple[int, int]], base: int) -> None:
    done = 0
    for i in range(0, len(ranges), _IOV_MAX):
        chunk = ranges[i:i + _IOV_MAX]
        want = sum(size for _, size in chunk)
        local = IoVec(base + done, want)
        remote = _iovecs(chunk)
        got = _libc.syscall(ctypes.c_long(SYS["process_vm_readv"]), ctypes.c_long(pid),
                            ctypes.byref(local), ctypes.c_long(1), remote,
                            ctypes.c_long(len(chunk)), ctypes.c_long(0))
        if got != want:
            if got < 0:
                raise _fail("process_vm_readv", pid)
            raise MigrateError(errno.EFAULT, f"process_vm_readv (pid {pid}): short read", pid)
        done += want


def write_memory(pid: int, runs: Iterable[tuple[int, bytes]]) -> None:
    """process_vm_writev of (addr, data) runs into writable memory of `pid`.

    Each run's bytes are written from where they are (an iovec each side, no copy of the
    data: at a GB, a join cost as much as the write); at most IOV_MAX runs per call.
    """
    runs = list(runs)
    for i in range(0, len(runs), _IOV_MAX):
        chunk = runs[i:i + _IOV_MAX]
        want = sum(len(d) for _, d in chunk)
        local = _iovecs([(_address(d), len(d)) for _, d in chunk])
        remote = _iovecs([(addr, len(d)) for addr, d in chunk])
        got = _libc.syscall(ctypes.c_long(SYS["process_vm_writev"]), ctypes.c_long(pid),
                            local, ctypes.c_long(len(chunk)), remote,
                            ctypes.c_long(len(chunk)), ctypes.c_long(0))
        if got != want:
            if got < 0:
                raise _fail("process_vm_writev", pid)
            raise MigrateError(errno.EFAULT, f"process_vm_writev (pid {pid}): short write", pid)

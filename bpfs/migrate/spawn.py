"""Start a program traced, the way posix_spawn starts one: vfork-style, from native code.

`os.fork()` of a Python process copies its page tables and tears them down again at exec,
which costs milliseconds and grows with the process (a busy master daemon is large); it is
also unsafe in a threaded process. posix_spawn avoids both with clone(CLONE_VM|CLONE_VFORK),
but cannot make the child traceable. So this module carries a 210-byte x86_64 routine, called
through ctypes, that does what glibc's posix_spawn child does plus PTRACE_TRACEME:

    spawn(req):  clone(CLONE_VM | CLONE_VFORK | SIGCHLD, req.stack) -> parent returns the pid
    child:       ptrace(TRACEME); rt_sigaction(1..64 except KILL/STOP, SIG_DFL);
                 close_range(3, ~0); chdir(req.cwd) if given; sigprocmask(SETMASK, {});
                 execve(req.path, req.argv, req.envp)
                 on failure: req.err = -errno (shared memory); _exit(127)

The child runs on its own small stack, never touches the parent's, and the parent stays
suspended (CLONE_VFORK) until the exec, so `req.err` is final when spawn returns. The caller
blocks every signal around the call so no handler of ours can run in the child.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
from typing import Mapping, Sequence

from bpfs.migrate.errors import MigrateError

CODE = bytes.fromhex(
    "534889fbb838000000bf11410000488b732031d24531d24531c00f054885c074025bc3b86500000031ff31f6"
    "31d24531d20f054885c00f858500000041bc010000004183fc4174274183fc09741c4183fc137416b80d0000"
    "004489e7488d733031d241ba080000000f0541ffc4ebd3b8b4010000bf03000000beffffffff31d20f05488b"
    "7b184885ff740cb8500000000f054885c0752ab80e000000bf02000000488d735031d241ba080000000f05b8"
    "3b000000488b3b488b7308488b53100f0548894328b83c000000bf7f0000000f05f4")
# fork_stopped(): fork(); child: ptrace(TRACEME); kill(getpid(), SIGSTOP); _exit(127)
FORK_STOPPED = bytes.fromhex(
    "b8390000000f054885c07401c3b86500000031ff31f631d24531d20f05b8270000000f0589c7b83e000000"
    "be130000000f05b83c000000bf7f0000000f05f4")
FORK_OFFSET = 256
STACK = 1 << 16
_REQ = struct.Struct("<6Q32s8s")  # path argv envp cwd stack_top err | zero sigaction | zero mask

_code_map: mmap.mmap | None = None
_entries: dict[str, ctypes._CFuncPtr] = {}


def _routine(name: str = "spawn"):
    global _code_map
    if not _entries:
        _code_map = mmap.mmap(-1, mmap.PAGESIZE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        _code_map.write(CODE)
        _code_map.seek(FORK_OFFSET)
        _code_map.write(FORK_STOPPED)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(_code_map))
        _entries["spawn"] = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p)(addr)
        _entries["fork"] = ctypes.CFUNCTYPE(ctypes.c_long)(addr + FORK_OFFSET)
    return _entries[name]


def fork_stopped() -> int:
    """fork() from native code; the child makes itself traced by us and stops (SIGSTOP).

    No Python runs in the child, so this is safe in a threaded process. At the stop, rip - 2
    is the child's `syscall` instruction (kill), usable for injections.
    """
    fn = _routine("fork")
    old = signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    try:
        pid = fn()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if pid < 0:
        raise MigrateError(-pid, f"fork: {os.strerror(-pid)}")
    return pid


def _strings(items: Sequence[bytes]) -> ctypes.Array:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def spawn_traced(argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> int:
    """Start argv[0] (a path) with `env`, traced by the calling thread; returns its pid.

    The child stops with SIGTRAP after its execve; exec failures raise MigrateError with the
    execve (or chdir) errno and leave no process behind.
    """
    fn = _routine("spawn")
    args = [os.fsencode(a) for a in argv]
    envs = [os.fsencode(f"{k}={v}") for k, v in env.items()]
    argv_arr, env_arr = _strings(args), _strings(envs)
    path = ctypes.c_char_p(args[0])
    cwd_p = ctypes.c_char_p(os.fsencode(cwd)) if cwd is not None else None
    stack = ctypes.create_string_buffer(STACK)
    top = (ctypes.addressof(stack) + STACK - 64) & ~15
    ptr = lambda p: ctypes.cast(p, ctypes.c_void_p).value or 0  # noqa: E731
    req = ctypes.create_string_buffer(_REQ.pack(ptr(path), ctypes.addressof(argv_arr),
                                                 ctypes.addressof(env_arr), ptr(cwd_p), top, 0,
                                                 bytes(32), bytes(8)), _REQ.size)
    old = signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    try:
        pid = fn(ctypes.addressof(req))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if pid < 0:
        raise MigrateError(-pid, f"clone: {os.strerror(-pid)}")
    err = struct.unpack_from("<q", req.raw, 40)[0]
    if err:
        try:
            os.waitpid(pid, 0x40000000)
        except ChildProcessError:
            pass
        code = -err if err < 0 else errno.EIO
        raise MigrateError(code, f"cannot execute {argv[0]}: {os.strerror(code)}")
    return pid

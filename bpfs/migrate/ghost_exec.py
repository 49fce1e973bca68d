"""An exec in a parked ghost (`Tracer.exec_in`: a process on a node execs a program that is
to run on another node; the master, which has every binary, execs it in the ghost, and
`capture` then dumps it at its entry point as it does a bpsh child's).

A ghost keeps only its argument pages and the vdso (`ghost_park.park`), so the strings and
pointer arrays go into a fresh anonymous mapping, and the halted ghost makes every call
itself (so the exec is its own: its credentials, its file permissions):

```
    addr := mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    addr: path | cwd | "." | "/" | argv strings | envp strings | argv[] NULL | envp[] NULL
                                        (one process_vm_writev)
    old := openat(AT_FDCWD, ".", O_PATH | O_DIRECTORY | O_CLOEXEC)
                                        the cwd to go back to (closed by a successful exec)
    chdir(cwd), or chdir("/") if that fails (as a node's restore does)
    execve(path, argv, envp)            single-stepped: PTRACE_EVENT_EXEC if it took
    on failure: fchdir(old), close(old), munmap(addr, size); the ghost sleeps as before
```

A successful exec discards the mapping with the old memory; what the kernel resets at exec
needs nothing from us: the ghost has no rseq area, robust list or clear-child-tid (`park`
cleared them), and the new program's loader registers its own before the entry point, where
the dump reads them. A failed execve (before its point of no return) changes none of them.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
from dataclasses import dataclass

from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.dump import TRACE_OPTIONS
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.procfs import PAGE

MAX_TOTAL = 2 * 1024 * 1024   # bytes of strings and pointers; E2BIG beyond
SYS_FCHDIR, SYS_EXECVE, SYS_OPENAT = 81, 59, 257
AT_FDCWD = -100
O_PATH, O_DIRECTORY, O_CLOEXEC = 0o10000000, 0o200000, 0o2000000
PROT_RW, MAP_PRIVATE_ANON = 0x3, 0x22
MAX_TRIES = 1000   # execve steps overtaken by a signal (each one reported); EINTR beyond


@dataclass
class Request:
    """What to exec: checked before the ghost is touched (`check`)."""

    path: bytes
    argv: list[bytes]
    envp: list[bytes]
    cwd: bytes


def check(path: bytes, argv: list[bytes], envp: list[bytes], cwd: bytes) -> Request:
    """EINVAL: an empty argv or path or cwd, a word that is not bytes or holds a NUL;
    E2BIG: more than MAX_TOTAL bytes of strings and pointers in all."""
    if not isinstance(argv, list) or not isinstance(envp, list) or not argv:
        raise MigrateError(errno.EINVAL, "exec needs a non-empty argv list and an envp list")
    words = [path, cwd, *argv, *envp]
    if any(not isinstance(w, bytes) or b"\0" in w for w in words):
        raise MigrateError(errno.EINVAL, "exec: every word must be bytes without NUL")
    if not path or not cwd:
        raise MigrateError(errno.EINVAL, "exec: an empty path or cwd")
    total = sum(len(w) + 1 for w in words) + 8 * (len(argv) + len(envp) + 2)
    if total > MAX_TOTAL:
        raise MigrateError(errno.E2BIG, f"exec: {total} bytes of arguments (at most "
                                        f"{MAX_TOTAL})")
    return Request(path, argv, envp, cwd)


def _layout(req: Request, addr: int) -> tuple[bytes, dict[str, int]]:
    """The mapping's bytes at `addr`, and where each part lies."""
    blob = bytearray()

    def put(word: bytes) -> int:
        here = addr + len(blob)
        blob.extend(word + b"\0")
        return here
    at = {"path": put(req.path), "cwd": put(req.cwd), "dot": put(b"."), "root": put(b"/")}
    argv = [put(w) for w in req.argv]
    envp = [put(w) for w in req.envp]
    blob.extend(bytes(-len(blob) % 8))
    at["argv"] = addr + len(blob)
    blob.extend(struct.pack(f"<{len(argv) + 1}Q", *argv, 0))
    at["envp"] = addr + len(blob)
    blob.extend(struct.pack(f"<{len(envp) + 1}Q", *envp, 0))
    return bytes(blob), at


def size_of(req: Request) -> int:
    return (len(_layout(req, 0)[0]) + PAGE - 1) & ~(PAGE - 1)


def exec_in(pid: int, regs: pt.Regs, gadget: int, signals: list[int], req: Request) -> int:
    """Make the halted ghost `pid` exec `req` (see the module doc).

    Returns 0 once the exec took: `pid` is then stopped in its PTRACE_EVENT_EXEC stop,
    consumed (the caller's `capture` dumps it from there). Returns -errno of execve (ENOENT,
    EACCES, ENOEXEC, E2BIG...) after putting cwd and memory back: the caller parks the
    ghost again. Raises MigrateError if a step before the exec fails (the mapping unmapped,
    the cwd as it was), or if undoing fails (the caller then kills the ghost).
    """
    size = size_of(req)
    addr = _check(pid, "mmap", gp.inject(pid, regs, gadget, signals, pt.SYS["mmap"], 0, size,
                                          PROT_RW, MAP_PRIVATE_ANON, -1, 0))
    old = -1
    try:
        blob, at = _layout(req, addr)
        pt.write_memory(pid, [(addr, blob)])
        old = _check(pid, "openat .", gp.inject(pid, regs, gadget, signals, SYS_OPENAT,
                                                 AT_FDCWD, at["dot"],
                                                 O_PATH | O_DIRECTORY | O_CLOEXEC, 0))
        if gp.inject(pid, regs, gadget, signals, pt.SYS["chdir"], at["cwd"]) < 0:
            _check(pid, "chdir /", gp.inject(pid, regs, gadget, signals, pt.SYS["chdir"],
                                              at["root"]))
        # every ghost is traced so (`dump.seize_for_exec`; copies inherit it): TRACEEXEC
        # makes the exec stop where `capture` begins. Set again for the step (there is no
        # PTRACE_GETOPTIONS to look): the same value, so nothing to restore.
        pt.setoptions(pid, TRACE_OPTIONS)
        res = _execve(pid, regs, gadget, signals, at)
        if res == 0:
            return 0
    except BaseException:
        _undo(pid, regs, gadget, signals, addr, size, old, strict=False)
        raise
    _undo(pid, regs, gadget, signals, addr, size, old, strict=True)
    return res if res < 0 else -errno.EIO


def _execve(pid: int, base: pt.Regs, gadget: int, signals: list[int], at: dict[str, int]
            ) -> int:
    """Single-step execve at `gadget`: 0 at its exec event stop, else -errno.

    A signal that comes before the instruction is suppressed and recorded (the ghost's, for
    its real process), and the step retried (MAX_TRIES times at most: a flood of signals
    cannot hold the tracer thread for ever); one that comes as the failed call returns is
    recorded too. A signal after the exec's point of no return stays pending in the new
    program (the dump's `run_to_entry` holds it for the node).

    The tracer thread waits for the execve itself (the kernel opening and reading the
    program and its interpreter), as `capture` waits for the loader's run to the entry
    point: milliseconds for a local file.
    """
    regs = base.copy()
    regs.rax, regs.orig_rax, regs.rip = SYS_EXECVE, gp.NO_SYSCALL, gadget
    regs.rdi, regs.rsi, regs.rdx = at["path"], at["argv"], at["envp"]
    pt.setregs(pid, regs)
    for _ in range(MAX_TRIES):
        pt.singlestep(pid)
        sig, event = gp.stop_parts(gp.wait_stop(pid))
        if event == pt.EVENT_EXEC:
            return 0
        if event:
            continue
        now = pt.getregs(pid)
        if now.rip == gadget:
            signals.append(sig)
            continue
        if sig != signal.SIGTRAP:
            signals.append(sig)
        res = now.rax - 2**64 if now.rax >= 2**63 else now.rax
        if -res in gp.RESTART:
            pt.setregs(pid, regs)
            continue
        return res
    raise MigrateError(errno.EINTR, f"execve in ghost overtaken by {MAX_TRIES} signals", pid)


def _undo(pid: int, regs: pt.Regs, gadget: int, signals: list[int], addr: int, size: int,
          old: int, strict: bool) -> None:
    """Back to the cwd `old` (an O_PATH fd; -1: never left) and unmap the mapping. With
    `strict`, a failure raises (the ghost would not be as it was); otherwise it is passed
    over (a failure is already on its way up)."""
    steps = ([] if old < 0 else [("fchdir", SYS_FCHDIR, (old,)),
                                  ("close", pt.SYS["close"], (old,))])
    steps.append(("munmap", pt.SYS["munmap"], (addr, size)))
    for what, nr, args in steps:
        try:
            _check(pid, what, gp.inject(pid, regs, gadget, signals, nr, *args))
        except MigrateError:
            if strict:
                raise


def _check(pid: int, what: str, res: int) -> int:
    if res < 0:
        raise MigrateError(-res, f"{what} in ghost: {os.strerror(-res)}", pid)
    return res

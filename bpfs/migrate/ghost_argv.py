"""A new name and command line for a parked ghost (`Tracer.rename`: its real process exec'd).

What `ps` shows of a process is read from it: its name (comm) from the task, its command line
(/proc/PID/cmdline) from its memory between mm->arg_start and mm->arg_end. A ghost keeps only
its argument pages (`ghost_park.park`), so the new argv goes into a fresh anonymous mapping,
and the mm's bounds are pointed there, all by syscalls the halted ghost makes itself:

```
    addr := mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    addr: struct prctl_mm_map | name (16 bytes) | argv, NUL-terminated strings
                                        (one process_vm_writev)
    brk(0)                              the one bound /proc/PID/stat does not show
    prctl(PR_SET_MM, PR_SET_MM_MAP, addr, sizeof, 0)
                                        every bound as it was (stat fields 26-28, 45-51,
                                        brk), but arg_start/arg_end; auxv_size 0 and
                                        exe_fd -1: both left as they are
    prctl(PR_SET_NAME, addr + sizeof)   basename of argv[0], 15 bytes at most
    munmap(the previous rename's mapping)
```

PR_SET_MM_MAP, not PR_SET_MM_ARG_START/END: those need CAP_SYS_RESOURCE in the ghost, which
no user's ghost has; PR_SET_MM_MAP asks for none unless exe_fd changes (the kernel checks
only that the bounds lie in the user address space and are ordered, and RLIMIT_DATA).
The struct and name stay in the mapping (a page or so); nobody reads them again.
"""

from __future__ import annotations

import errno
import os
import struct

from bpfs.migrate import ghost_park as gp
from bpfs.migrate import procfs
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.procfs import PAGE

MAX_ARGV = 128 * 1024       # bytes of the NUL-terminated strings; EINVAL beyond
PR_SET_NAME, PR_SET_MM, PR_SET_MM_MAP = 15, 35, 14
PROT_RW, MAP_PRIVATE_ANON = 0x3, 0x22
# struct prctl_mm_map (include/uapi/linux/prctl.h): start_code, end_code, start_data,
# end_data, start_brk, brk, start_stack, arg_start, arg_end, env_start, env_end, auxv,
# auxv_size, exe_fd
MM_MAP = struct.Struct("<12QII")
NAME_SIZE = 16
KEEP_EXE = 0xFFFFFFFF


def encode(argv: list[bytes]) -> bytes:
    """`argv` as /proc/PID/cmdline holds it; EINVAL if empty, too long, or a word has a NUL."""
    if not argv:
        raise MigrateError(errno.EINVAL, "an empty argv")
    if any(not isinstance(word, bytes) or b"\0" in word for word in argv):
        raise MigrateError(errno.EINVAL, "argv words must be bytes without NUL")
    data = b"".join(word + b"\0" for word in argv)
    if len(data) > MAX_ARGV:
        raise MigrateError(errno.EINVAL, f"argv of {len(data)} bytes (at most {MAX_ARGV})")
    return data


def comm_of(argv: list[bytes]) -> bytes:
    """The name exec gives a process: the basename of argv[0], 15 bytes at most."""
    return os.path.basename(argv[0])[:NAME_SIZE - 1]


def set_argv(pid: int, regs: pt.Regs, gadget: int, signals: list[int], argv: list[bytes],
             old: tuple[int, int] | None) -> tuple[int, int]:
    """Give the halted ghost `pid` the name and command line `argv` (see the module doc).

    Returns the new mapping (address, size), which the next rename unmaps (`old` is the
    previous one's). If a step fails, the new mapping is unmapped again and the ghost keeps
    its name and command line (MigrateError with the kernel's errno).
    """
    data = encode(argv)
    size = (MM_MAP.size + NAME_SIZE + len(data) + PAGE - 1) & ~(PAGE - 1)
    addr = _check(pid, "mmap", gp.inject(pid, regs, gadget, signals, pt.SYS["mmap"], 0, size,
                                          PROT_RW, MAP_PRIVATE_ANON, -1, 0))
    try:
        brk = _check(pid, "brk", gp.inject(pid, regs, gadget, signals, pt.SYS["brk"], 0))
        mm = procfs.parse_stat(procfs.read_text(pid, "stat"))
        arg_start = addr + MM_MAP.size + NAME_SIZE
        mm_map = MM_MAP.pack(mm["start_code"], mm["end_code"], mm["start_data"],
                             mm["end_data"], mm["start_brk"], brk, mm["start_stack"],
                             arg_start, arg_start + len(data), mm["env_start"],
                             mm["env_end"], 0, 0, KEEP_EXE)
        name = comm_of(argv).ljust(NAME_SIZE, b"\0")
        pt.write_memory(pid, [(addr, mm_map + name + data)])
        _check(pid, "PR_SET_MM_MAP", gp.inject(pid, regs, gadget, signals, pt.SYS["prctl"],
                                                PR_SET_MM, PR_SET_MM_MAP, addr, MM_MAP.size,
                                                0))
        _check(pid, "PR_SET_NAME", gp.inject(pid, regs, gadget, signals, pt.SYS["prctl"],
                                              PR_SET_NAME, addr + MM_MAP.size))
    except BaseException:
        try:
            gp.inject(pid, regs, gadget, signals, pt.SYS["munmap"], addr, size)
        except MigrateError:
            pass  # the ghost is put back to sleep or killed all the same (the caller's)
        raise
    if old is not None:
        gp.inject(pid, regs, gadget, signals, pt.SYS["munmap"], *old)
    return addr, size


def _check(pid: int, what: str, res: int) -> int:
    if res < 0:
        raise MigrateError(-res, f"{what} in ghost: {os.strerror(-res)}", pid)
    return res

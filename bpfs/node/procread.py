"""Small readers of /proc (the node's own PID namespace's), and of a stopped caller's memory,
for the node's supervisor (bpfs/node/supervisor.py). Each returns None (or raises OSError,
where it says) for a process that has gone: the caller decides what that means."""

from __future__ import annotations

import errno
import os
import struct

from bpfs.migrate import seccomp
from bpfs.migrate.seccomp import SYSCALLS as NR

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
MAX_WORDS = 65536            # argv + envp words of one exec elsewhere
MAX_EXEC_BYTES = 2 << 20     # and their bytes (E2BIG beyond)



_last_fd = -1                # ns_last_pid, kept open: a fork reads and writes it often


def _last() -> int:
    global _last_fd
    if _last_fd < 0:
        _last_fd = os.open(NS_LAST_PID, os.O_RDWR | os.O_CLOEXEC)
    return _last_fd


def read_last() -> int:
    """The namespace's counter (the reader's PID namespace: the daemon's)."""
    return int(os.pread(_last(), 32, 0))


def write_last(value: int) -> None:
    os.pwrite(_last(), b"%d" % value, 0)


def pid_arg(raw: int) -> int:
    """A pid_t argument (the low 32 bits, signed)."""
    v = int(raw) & 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def state(pid: int) -> str | None:
    fields = stat_fields(pid)
    return fields[0].decode() if fields else None


def run_state(tid: int) -> tuple[str, int] | None:
    """A task's state letter (R, S, D, T...) and the CPU it has used: user and system
    clock ticks."""
    fields = stat_fields(tid)
    if not fields or len(fields) < 13:
        return None
    return fields[0].decode(), int(fields[11]) + int(fields[12])


def syscall_nr(tid: int) -> int | None:
    """The system call a blocked task is in (-1: none, a fault or a stop); None if it is
    runnable (the kernel cannot say) or gone."""
    try:
        with open(f"/proc/{tid}/syscall", "rb") as f:
            word = f.read(24).split(maxsplit=1)
    except OSError:
        return None
    if not word or word[0] == b"running":
        return None
    return int(word[0])


def ppid(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def tgid(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def uids(tid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    real, eff = line.split()[1:3]
                    return int(real), int(eff)
    except OSError:
        return None
    return None


def ids(tid: int) -> tuple[int, int, int] | None:
    """(real uid, effective uid, real gid) of `tid`."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = {line.split(b":")[0]: line.split()[1:3] for line in text.splitlines()
              if line.startswith((b"Uid:", b"Gid:"))}
    try:
        return int(fields[b"Uid"][0]), int(fields[b"Uid"][1]), int(fields[b"Gid"][0])
    except (KeyError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(65536)
    except OSError:
        return b""


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_here(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clone3_flags(n: seccomp.Notif) -> int | None:
    """clone3's flags, from the caller's struct clone_args (None if unreadable)."""
    try:
        fd = os.open(f"/proc/{n.pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 8, n.args[0])
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack("<Q", data)[0] if len(data) == 8 else None


def exec_args(n: seccomp.Notif) -> tuple[bytes, list[bytes], list[bytes]] | None:
    """(path, argv, envp) of an execve (or execveat from the cwd) stopped in `n`, read
    from the caller's memory; None if over MAX_WORDS or MAX_EXEC_BYTES; OSError if
    unreadable (EFAULT), or an execveat this cannot follow (EOPNOTSUPP)."""
    args = n.args
    if n.nr == NR["execveat"]:
        if pid_arg(args[0]) != -100 or args[4]:       # AT_FDCWD, no flags
            raise OSError(errno.EOPNOTSUPP, "execveat from another directory")
        args = args[1:]
    fd = os.open(f"/proc/{n.pid}/mem", os.O_RDONLY)
    try:
        budget = [MAX_EXEC_BYTES]
        path = cstring(fd, args[0], budget)
        argv = cstrings(fd, args[1], budget)
        envp = cstrings(fd, args[2], budget)
    except ValueError:
        return None
    finally:
        os.close(fd)
    return path, argv, envp


def cstring(fd: int, addr: int, budget: list[int]) -> bytes:
    out = b""
    while True:
        chunk = os.pread(fd, 4096 - addr % 4096, addr)
        if not chunk:
            raise OSError(errno.EFAULT, "unreadable string")
        end = chunk.find(b"\0")
        out += chunk if end < 0 else chunk[:end]
        budget[0] -= len(chunk) if end < 0 else end + 1
        if budget[0] < 0:
            raise ValueError("too long")
        if end >= 0:
            return out
        addr += len(chunk)


def cstrings(fd: int, addr: int, budget: list[int]) -> list[bytes]:
    out: list[bytes] = []
    if not addr:
        return out
    while True:
        if len(out) >= MAX_WORDS:
            raise ValueError("too many")
        (ptr,) = struct.unpack("<Q", os.pread(fd, 8, addr + 8 * len(out)).ljust(8, b"\0"))
        if not ptr:
            return out
        out.append(cstring(fd, ptr, budget))

"""Master side: start or catch a program at its entry point and dump it into an `Image`.

All functions here issue ptrace requests, so one thread must make every call for a given tracee
(the kernel only accepts requests from the tracer thread). Errors are `MigrateError` with errno:
EPERM for set-user-ID, set-group-ID and file-capability executables, ETIMEDOUT when no exec
came, ESRCH when the process died, EOPNOTSUPP for state that cannot migrate (shared mappings).

Stop point: AT_ENTRY, after the dynamic loader mapped the master's libraries, so the node needs
none of them. A hardware breakpoint (DR0) stops it there without writing to its text, so no code
page turns into a private copy that would have to travel.

Dumpability: the image carries whether the kernel made the process dumpable at its exec
(PR_GET_DUMPABLE, injected): a program its user may run but not read (mode 0711) is not,
so that user cannot read its memory or attach to it, and the node restores it so.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import signal
import stat
import struct
import time
from typing import AbstractSet, Callable, Mapping as TMapping, Sequence

from bpfs.migrate.lazyrun import LAZY_MIN, LazyRun
from bpfs.migrate import hostinfo, procfs
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError, from_oserror
from bpfs.migrate.filecache import HashCache, hash_bytes
from bpfs.migrate.image import FileRef, Image, Region
from bpfs.migrate.procfs import PAGE, Mapping
from bpfs.migrate.spawn import spawn_traced

SIGTRAP = signal.SIGTRAP
TRACE_OPTIONS = pt.O_EXITKILL | pt.O_TRACEEXEC
GLIBC_TID_OFFSET = 0x2D0  # offsetof(struct pthread, tid) in glibc 2.3x on x86_64
PR_GET_DUMPABLE, SUID_DUMP_USER = 3, 1

hashes = HashCache()  # shared by every dump of this process: libc is hashed once
_held: dict[int, list[int]] = {}  # pid -> signals that arrived before its entry point


# ---- starting and catching ----

def launch(argv: Sequence[str], env: TMapping[str, str] | None = None,
           cwd: str | None = None) -> int:
    """Start `argv` (argv[0] a path) traced and leave it stopped at its entry point.

    The child gets default signal dispositions, an empty signal mask and only fds 0-2 before
    execve (see `spawn`). Exec failures raise MigrateError with the execve errno.
    """
    if not argv:
        raise MigrateError(errno.EINVAL, "empty argv")
    pid = spawn_traced(argv, dict(os.environ if env is None else env), cwd)
    try:
        stop = pt.wait_stop(pid)
        if pt.stop_signal(stop) != SIGTRAP:
            raise MigrateError(errno.EIO, f"unexpected stop {stop:#x} after exec", pid)
        pt.setoptions(pid, TRACE_OPTIONS)
        run_to_entry(pid)
    except BaseException:
        kill(pid)
        raise
    return pid


def seize_for_exec(pid: int) -> None:
    """PTRACE_SEIZE a running process that is about to execve (a bpsh child)."""
    pt.seize(pid, TRACE_OPTIONS)


def wait_exec_and_dump(pid: int, timeout: float,
                       drop: Callable[[int], bool] | None = None) -> Image:
    """Wait for the seized `pid` to exec, run it to its entry point and dump it.

    The process is left stopped under ptrace (the ghost); it never runs the program here.
    Signals that arrive before the exec are passed on. EPERM for set-ID or file-capability
    executables (the process is left stopped: the caller kills it); ETIMEDOUT if no exec came.
    `drop`: see `dump_at_exec`.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while True:
        status = pt.wait(pid, os.WNOHANG)
        if status == 0:
            if time.monotonic() > deadline:
                raise MigrateError(errno.ETIMEDOUT, f"process {pid} did not exec in time", pid)
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
            continue
        if not os.WIFSTOPPED(status):
            raise MigrateError(errno.ESRCH, f"process {pid} ended before exec", pid)
        stop = status >> 8
        if pt.stop_event(stop) == pt.EVENT_EXEC:
            break
        sig = pt.stop_signal(stop)
        # a group-stop (EVENT_STOP) or a signal-delivery-stop: let it go on, signal included
        pt.cont(pid, 0 if pt.stop_event(stop) or sig == SIGTRAP else sig)
    return dump_at_exec(pid, drop)


def dump_at_exec(pid: int, drop: Callable[[int], bool] | None = None) -> Image:
    """`pid`, stopped in its exec event stop (consumed), run to its entry point and dumped.

    EPERM for set-ID or file-capability programs, before any of their code runs. Signals
    that come on the way are held for the image (`run_to_entry`), but those `drop(sig)`
    says are not the program's (a ghost's child ghost's SIGCHLD, `Tracer.exec_in`).
    """
    check_executable(pid)
    run_to_entry(pid, drop)
    return dump(pid)


def check_executable(pid: int) -> None:
    """Refuse set-user-ID, set-group-ID and file-capability programs (EPERM)."""
    exe = f"/proc/{pid}/exe"
    try:
        st = os.stat(exe)
        caps = _has_file_caps(exe)
    except OSError as exc:
        raise from_oserror(exc, f"checking the executable of {pid}", pid) from exc
    what = ("set-user-ID" if st.st_mode & stat.S_ISUID else
            "set-group-ID" if st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP else
            "file-capability" if caps else None)
    if what:
        name = os.readlink(exe)
        raise MigrateError(errno.EPERM, f"{name}: {what} programs cannot migrate", pid)


def _has_file_caps(path: str) -> bool:
    try:
        os.getxattr(path, "security.capability")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise
    return True


def run_to_entry(pid: int, drop: Callable[[int], bool] | None = None) -> None:
    """From the exec stop, run `pid` until rip == AT_ENTRY, by a hardware breakpoint.
    Signals met on the way are held for the image, but those `drop(sig)` says to drop
    (asked in their signal-delivery-stop, so their siginfo can be read)."""
    entry = procfs.parse_auxv(procfs.read_bytes(pid, "auxv"))[procfs.AT_ENTRY]
    pt.set_debugreg(pid, 0, entry)
    pt.set_debugreg(pid, 7, 1)  # L0: local enable, execute, length 1
    try:
        while True:
            pt.cont(pid)
            stop = pt.wait_stop(pid)
            sig = pt.stop_signal(stop)
            if sig == SIGTRAP and pt.getregs(pid).rip == entry:
                break
            if sig != SIGTRAP and pt.stop_event(stop) == 0 and not (drop and drop(sig)):
                _held.setdefault(pid, []).append(sig)  # the program's: sent again after migration
    finally:
        pt.set_debugreg(pid, 7, 0)
        pt.set_debugreg(pid, 0, 0)


def kill(pid: int) -> None:
    """SIGKILL a tracee and reap it if it is our child."""
    _held.pop(pid, None)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        while True:
            _, status = os.waitpid(pid, pt.WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                return
    except ChildProcessError:
        pass


# ---- dumping ----

def dump(pid: int, frozen: AbstractSet[int] = frozenset(), lazy: bool = False,
         seen: tuple[dict[str, str], list[Mapping]] | None = None) -> Image:
    """Dump a process stopped under our ptrace (at its entry point) into an Image.

    `frozen`: start addresses of shared file mappings that can never be written (no
    VM_MAYWRITE: glibc's gconv cache), carried as private mappings of the same file
    (`running`); any other shared mapping is refused. `lazy`: big anonymous runs are
    LazyRuns, read when they are sent (bpfs.migrate.lazyrun): the process must stay
    stopped until then. `seen`: its status and maps as the caller read them since it
    stopped (they cannot have changed), not read again."""
    check_executable(pid)
    regs = pt.getregs(pid)
    xstate = pt.get_xstate(pid)
    status = procfs.read_status(pid) if seen is None else seen[0]
    if status.get("Threads", "1") != "1":
        raise MigrateError(errno.EOPNOTSUPP, "multi-threaded processes cannot migrate yet", pid)
    maps = procfs.parse_maps(procfs.read_text(pid, "maps")) if seen is None else seen[1]
    mm = procfs.parse_stat(procfs.read_text(pid, "stat"))
    special = {m.path.strip("[]"): (m.start, m.end) for m in maps if m.path in procfs.SPECIAL}
    gadget = _vdso_gadget(pid, special)
    mm["brk"] = _brk(pid, regs, gadget, maps, mm["start_brk"])
    dumpable = _dumpable(pid, regs, gadget)
    files, regions = _regions(pid, maps, frozen, lazy)
    exe = _exe_index(pid, files)
    pt.setregs(pid, regs)
    ids = lambda key: [int(x) for x in status[key].split()]  # noqa: E731
    return Image(
        pid=pid, argv=_argv(pid), comm=procfs.read_text(pid, "comm").rstrip("\n"), exe=exe,
        cwd=_readlink(pid, "cwd"), uid=ids("Uid")[0], gid=ids("Gid")[0], groups=ids("Groups"),
        dumpable=dumpable,
        umask=int(status.get("Umask", "0022"), 8),
        personality=int(procfs.read_text(pid, "personality"), 16),
        regs=regs.pack(), xstate=xstate, auxv=procfs.auxv_bytes(procfs.read_bytes(pid, "auxv")),
        mm=mm, sigmask=pt.get_sigmask(pid),
        sigactions=_sigactions(pid, regs, gadget, status), pending=_pending(pid, status),
        rseq=pt.get_rseq(pid), robust=_robust(pid), tid_address=_tid_address(pid, regs),
        rlimits=_rlimits(pid),
        special=special, host=hostinfo.host(pt.xstate_xcr0(xstate), len(xstate)),
        files=files, regions=regions, nice=os.getpriority(os.PRIO_PROCESS, pid))


def _readlink(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError as exc:
        raise from_oserror(exc, f"reading /proc/{pid}/{name}", pid) from exc


def _argv(pid: int) -> list[str]:
    raw = procfs.read_bytes(pid, "cmdline")
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


_gadget_offset: int | None = None


def _vdso_gadget(pid: int, special: dict[str, tuple[int, int]]) -> int:
    """Address of a `syscall` instruction (0f 05) in the tracee's vdso, for injections."""
    global _gadget_offset
    start, end = special["vdso"]
    if _gadget_offset is None:
        off = pt.read_memory(pid, [(start, end - start)]).find(b"\x0f\x05")
        if off < 0:
            raise MigrateError(errno.ENOEXEC, "no syscall instruction in the vdso", pid)
        _gadget_offset = off
    return start + _gadget_offset


def syscall_gadget(pid: int) -> int:
    """`_vdso_gadget` of a stopped tracee, its vdso found in its maps (injections after
    the dump: bpfs.migrate.sendpages)."""
    for m in procfs.parse_maps(procfs.read_text(pid, "maps")):
        if m.path == "[vdso]":
            return _vdso_gadget(pid, {"vdso": (m.start, m.end)})
    raise MigrateError(errno.ENOEXEC, "no vdso to inject calls through", pid)


def _brk(pid: int, regs: pt.Regs, gadget: int, maps: list[Mapping], start_brk: int) -> int:
    if not any(m.path == "[heap]" for m in maps):
        return start_brk
    return pt.inject(pid, regs, gadget, pt.SYS["brk"], 0)


def _dumpable(pid: int, regs: pt.Regs, gadget: int) -> bool:
    """Whether the kernel lets the process's user read and trace it: PR_GET_DUMPABLE is 1.

    The exec decided it (would_dump in fs/exec.c): 0 (or 2, fs.suid_dumpable) when the user
    may not read the executable or its ELF interpreter, or the exec changed credentials. The
    libraries the loader mapped since were opened by the process itself, so its user could
    read them. Asked of the process rather than worked out from file modes, so ACLs, LSMs,
    capabilities and user namespaces count exactly as the kernel counted them. Only 1 counts
    as dumpable: the node sets 0 for anything else (prctl cannot set 2, and 0 is stricter).
    """
    res = pt.inject(pid, regs, gadget, pt.SYS["prctl"], PR_GET_DUMPABLE)
    if res < 0:
        raise MigrateError(-res, "reading whether the process is dumpable", pid)
    return res == SUID_DUMP_USER


def _pending(pid: int, status: dict[str, str]) -> list[int]:
    """Signals held on the way to the entry point, then those queued (blocked) in the process."""
    mask = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    held = _held.pop(pid, [])
    return held + [s for s in range(1, 65) if mask >> (s - 1) & 1 and s not in held]


def _rlimits(pid: int) -> list[tuple[int, int, int]]:
    """Resource limits (the user's ulimits go with the process), RLIM_INFINITY as 2**64 - 1.

    Read from /proc/PID/limits: prlimit() would need CAP_SYS_RESOURCE for another user's
    process, and without it every limit was silently left behind."""
    return procfs.parse_limits(procfs.read_text(pid, "limits"))


def _robust(pid: int) -> tuple[int, int] | None:
    head, length = pt.get_robust_list(pid)
    return (head, length) if head else None


def _tid_address(pid: int, regs: pt.Regs) -> int | None:
    """glibc's set_tid_address target (&THREAD_SELF->tid), if the TCB holds our pid there."""
    if not regs.fs_base:
        return None
    addr = regs.fs_base + GLIBC_TID_OFFSET
    try:
        tid = struct.unpack("<i", pt.read_memory(pid, [(addr, 4)]))[0]
    except MigrateError:
        return None
    return addr if tid == pid else None


def _sigactions(pid: int, regs: pt.Regs, gadget: int,
                status: dict[str, str]) -> list[tuple[int, int, int, int, int]]:
    """Non-default dispositions; handlers are read by injecting rt_sigaction(sig, NULL, buf)."""
    ign, cgt = int(status["SigIgn"], 16), int(status["SigCgt"], 16)
    out = []
    buf = ((regs.rsp - 4096) & ~15)  # below the red zone: dead stack space
    for sig in range(1, 65):
        bit = 1 << (sig - 1)
        if ign & bit:
            out.append((sig, 1, 0, 0, 0))
        elif cgt & bit:
            res = pt.inject(pid, regs, gadget, pt.SYS["rt_sigaction"], sig, 0, buf, 8)
            if res < 0:
                raise MigrateError(-res, f"reading the handler of signal {sig}", pid)
            out.append((sig, *struct.unpack("<QQQQ", pt.read_memory(pid, [(buf, 32)]))))
    return out


def _regions(pid: int, maps: list[Mapping], frozen: AbstractSet[int] = frozenset(),
             lazy: bool = False) -> tuple[list[FileRef], list[Region]]:
    files: list[FileRef] = []
    by_inode: dict[tuple[str, int], int] = {}
    regions: list[Region] = []
    wanted: list[tuple[Region, list[tuple[int, int]], bool]] = []
    pm = procfs.open_pagemap(pid)
    try:
        for m in maps:
            if m.path in procfs.SPECIAL:
                continue
            if m.shared and m.start not in frozen:
                raise MigrateError(errno.EOPNOTSUPP,
                                   f"shared mapping {m.path or 'anonymous'} cannot migrate", pid)
            region = Region(m.start, m.end, m.prot, "file" if m.file_backed else "anon",
                            growsdown=m.path == "[stack]")
            if m.file_backed:
                key = (m.dev, m.inode)
                if key not in by_inode:
                    by_inode[key] = _add_file(pid, files, m)
                region.file, region.offset = by_inode[key], m.offset
            if m.prot:
                runs = procfs.page_runs(procfs.read_pagemap(pm, m.start, m.end), m.start,
                                        anon=not m.file_backed)
                if lazy and not m.file_backed:
                    region.pages.extend((a, LazyRun(pid, a, n)) for a, n in runs  # type: ignore[misc]
                                        if n >= LAZY_MIN)
                    runs = [(a, n) for a, n in runs if n < LAZY_MIN]
                if runs:
                    wanted.append((region, runs, not m.file_backed))
            regions.append(region)
    finally:
        os.close(pm)
    _read_pages(pid, wanted, files)
    if lazy:
        for region in regions:
            region.pages.sort(key=lambda run: run[0])
    return files, regions


def _add_file(pid: int, files: list[FileRef], m: Mapping) -> int:
    path = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, f"opening the file mapped at {m.start:#x}", pid) from exc
    try:
        digest, size = hashes.hash_fd(fd)
    finally:
        os.close(fd)
    name = m.path.removesuffix(" (deleted)")
    for i, f in enumerate(files):
        if f.hash == digest and f.path == name:
            return i
    files.append(FileRef(digest, size, name))
    return len(files) - 1


def _exe_index(pid: int, files: list[FileRef]) -> int:
    name = _readlink(pid, "exe").removesuffix(" (deleted)")
    for i, f in enumerate(files):
        if f.path == name:
            return i
    digest, size = hashes.hash_path(f"/proc/{pid}/exe")
    files.append(FileRef(digest, size, name))
    return len(files) - 1


def _read_pages(pid: int, wanted: list[tuple[Region, list[tuple[int, int]], bool]],
                files: list[FileRef]) -> None:
    """Read every wanted run in one process_vm_readv and keep only the bytes that matter:
    in anonymous memory the non-zero ones, in a file's private copy those that differ from
    the file (the node maps the identical file, so the rest is already there)."""
    ranges = [r for _, runs, _ in wanted for r in runs]
    if not ranges:
        return
    data = pt.read_memory_buffer(pid, ranges)   # anonymous runs stay views of it: no copy
    pos = 0
    for region, runs, anon in wanted:
        for addr, size in runs:
            if anon:
                region.pages.extend(nonzero(data, pos, size, addr))
            else:
                base = _original(pid, region, files[region.file].hash,
                                 region.offset + addr - region.start, size)
                region.pages.extend(differing(addr, data[pos:pos + size], base))
            pos += size


_originals: dict[tuple[str, int, int], bytes] = {}    # (file hash, offset, size) -> bytes
ORIGINAL_MAX = 1 << 20          # bytes of one kept (a program's data: a few pages)
ORIGINALS_MAX = 16 << 20        # bytes kept in all (the oldest go first)
_kept = [0]                     # bytes in _originals


def _original(pid: int, region: Region, digest: str, offset: int, size: int) -> bytes:
    """The file's bytes under a private file mapping's written pages, as the node maps
    them: read once per file content (`digest`, what the node maps by) and kept, so a
    process moving again (or another of the same program) costs no open and read of
    /proc/PID/map_files each region (0.03-0.07 ms each, 6 for a small C program). A
    bigger run (a private file mapping written all over) is read each time, not kept."""
    key = (digest, offset, size)
    data = _originals.get(key)
    if data is None:
        src = _open_mapped(pid, region)
        try:
            data = _file_bytes(src, offset, size)
        finally:
            os.close(src)
        if size <= ORIGINAL_MAX:
            while _originals and _kept[0] + size > ORIGINALS_MAX:
                _kept[0] -= len(_originals.pop(next(iter(_originals))))
            _originals[key] = data
            _kept[0] += size
    return data


BLOCK = 128  # granularity of what travels: a run costs ~13 bytes of framing, a compare ~60 ns


def sparse(addr: int, chunk: bytes, base: bytes | None) -> list[tuple[int, bytes]]:
    """(addr, bytes) runs of BLOCK-sized blocks where `chunk` differs from `base` (or zeros)."""
    ref = base if base is not None else bytes(len(chunk))
    out: list[tuple[int, bytes]] = []
    start = -1
    for off in range(0, len(chunk), BLOCK):
        differs = chunk[off:off + BLOCK] != ref[off:off + BLOCK]
        if differs and start < 0:
            start = off
        elif not differs and start >= 0:
            out.append((addr + start, chunk[start:off]))
            start = -1
    if start >= 0:
        out.append((addr + start, chunk[start:]))
    return out


ZERO_BLOCK = bytes(BLOCK)
ZEROS = bytes(1 << 20)
ZEROS_VIEW = memoryview(ZEROS)


def differing(addr: int, chunk: bytes, base: bytes) -> list[tuple[int, memoryview]]:
    """What `sparse(addr, chunk, base)` gives, at C speed: the blocks where the XOR of the
    two (one big-integer operation) is not zero."""
    size = len(chunk)
    diff = (int.from_bytes(chunk, "little") ^ int.from_bytes(base, "little")).to_bytes(
        size, "little")
    return nonzero(diff, 0, size, addr, chunk)


def nonzero(data: mmap.mmap | bytes | bytearray, lo: int, size: int, addr: int,
            source: bytes | None = None) -> list[tuple[int, memoryview]]:
    """What `sparse(addr, data[lo:lo + size], None)` gives, at C speed and as views of `data`
    (of `source` instead, if given: where the caller's bytes are): zero blocks are found with
    find() (then aligned), zero stretches measured in doubling steps, so Python loops once a
    stretch, not once a block (1 GB is 8 million blocks). `size` is whole pages."""
    view = memoryview(data if source is None else source)
    out: list[tuple[int, memoryview]] = []
    hi, start, pos = lo + size, lo, lo
    while True:
        at = data.find(ZERO_BLOCK, pos, hi)
        if at < 0:
            break
        block = lo + -(-(at - lo) // BLOCK) * BLOCK     # the first block boundary from `at`
        if block + BLOCK > hi:
            break
        if data[block:block + BLOCK] != ZERO_BLOCK:
            pos = block + 1
            continue
        end = _zeros_end(data, block + BLOCK, hi)
        if block > start:
            out.append((addr + start - lo, view[start:block]))
        start = pos = end
    if start < hi:
        out.append((addr + start - lo, view[start:hi]))
    return out


def _zeros_end(data: mmap.mmap | bytes | bytearray, pos: int, hi: int) -> int:
    """Where the zero blocks from `pos` (a block boundary) end, by doubling and halving.
    Compared where they are (startswith: no copy of either side) when `data` can; an
    mmap's slices are copies (1 MB of zeros took 1.1 ms so, 0.06 ms in place)."""
    step = BLOCK
    same = getattr(data, "startswith", None)
    while pos < hi:
        n = min(step, hi - pos)
        if same(ZEROS_VIEW[:n], pos) if same is not None else data[pos:pos + n] == ZEROS[:n]:
            pos += n
            step = min(step * 2, len(ZEROS))
        elif step > BLOCK:
            step //= 2
        else:
            break
    return pos


def _open_mapped(pid: int, region: Region) -> int:
    path = f"/proc/{pid}/map_files/{region.start:x}-{region.end:x}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, f"opening the file mapped at {region.start:#x}", pid) from exc


def _file_bytes(fd: int, offset: int, size: int) -> bytes:
    """The file's bytes behind a mapping; past the end of the file a mapping reads zeros."""
    data = os.pread(fd, size, offset)
    return data + bytes(size - len(data))


def read_contents(image: Image, wanted: Sequence[str], pid: int | None = None
                  ) -> dict[str, bytes]:
    """Contents of the image's files named by hash in `wanted`, read on the master.

    With `pid` (the ghost, still stopped) files are found among its mappings by hash, so the
    content is the very file that was mapped even if its path was replaced since; otherwise,
    or if not mapped, by path. ESTALE if what is read no longer has the dumped hash.
    """
    sources = _mapped_sources(pid, set(wanted)) if pid is not None else {}
    out = {}
    for ref in image.files:
        if ref.hash in wanted and ref.hash not in out:
            path = sources.get(ref.hash, ref.path)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise from_oserror(exc, f"reading {ref.path}") from exc
            if hash_bytes(data) != ref.hash:
                raise MigrateError(errno.ESTALE, f"{ref.path} changed since the dump")
            out[ref.hash] = data
    return out


def _mapped_sources(pid: int, wanted: set[str]) -> dict[str, str]:
    """hash -> /proc/PID/map_files/... for the wanted files `pid` maps."""
    out: dict[str, str] = {}
    seen: set[tuple[str, int]] = set()
    for m in procfs.parse_maps(procfs.read_text(pid, "maps")):
        if not m.file_backed or (m.dev, m.inode) in seen:
            continue
        seen.add((m.dev, m.inode))
        path = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
        digest = hashes.hash_path(path)[0]
        if digest in wanted:
            out.setdefault(digest, path)
    return out

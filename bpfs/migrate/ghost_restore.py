"""Back into the ghost (`Tracer.restore_in`): a parked ghost becomes the process of an
`Image` and runs on the master again, a normal process, detached.

The ghost keeps what makes it the same process to everyone else: its PID, parent, process
group, session, credentials, mm->exe_file, and its fds but those the caller installs and
the image's open files (all of them with `close_others`: the image's fd table exactly).
The rest comes from the image, rebuilt by the same batches as a node's restore
(`bpfs.migrate.rebuild`), run by the ghost itself, so none needs a capability in it:

```
    prepare (the ghost untouched): the image's uid/gid are the ghost's real ones (EPERM);
        no region in the scratch area (EOPNOTSUPP); the ghost's RLIMIT_AS/RLIMIT_DATA
        hold it (ENOMEM);
        the files, opened and hashed by the tracer (ESTALE; EPERM set-ID; EPERM an
        executable mapping from a noexec mount); the fds to install (EINVAL, EBADF)
    halt; the image fits this kernel and CPU (ENOEXEC, EOPNOTSUPP)
    scratch := mmap(SCRATCH, 1 MiB, rwx, MAP_FIXED_NOREPLACE); the stub loop
    access(path, R_OK) in the ghost, X_OK for the executable: its user's right (EACCES)
    the image's open files opened by the ghost, as its user (openat; ENOENT, EACCES...)
    the mapped files and the caller's fds into the ghost over a socket pair (`ghost_files`)
    ---- point of no return: before it, a failure closes what came in, unmaps the scratch
         area and the ghost sleeps in pause() as before ----
    batch A: munmap the ghost's pages (argument pages, a rename's) but vvar/vdso/scratch;
        PR_SET_MM_MAP (the image's bounds and auxv, exe_fd -1: no capability);
        mremap vvar/vdso to the image's addresses; mmap every region; close the files;
        dispositions (the ghost's non-default ones reset first), personality, umask,
        name, robust list, clear-child-tid; the fds placed (`ghost_files.place`: the
        others closed with `close_others`, the open files and the caller's fds dup3'd to
        their numbers, the open files lseek'd to their offsets); resource limits
        (clamped to the ghost's hard ones: raising one would need CAP_SYS_RESOURCE);
        nice (if the user may); not dumpable if the image says so; chdir(cwd) (if that
        fails the ghost's own cwd stays)
    the page runs written (process_vm_writev)
    batch B: mprotect to the final protections; rseq registered
    munmap(scratch) at the moved vdso's `syscall`; registers, xstate; every signal
        blocked while the image's pending ones (and those that came meanwhile) are
        queued by the process itself (kill(getpid(), sig): no CAP_KILL needed; SIGSTOP
        from the tracer); the image's mask; detach
```

A failure after the point of no return raises `PastReturn`: the caller kills the process
(its parent sees SIGKILL). The batches run with the ghost's signals suppressed and kept
(`run`): a user's signal that comes meanwhile is delivered to the restored process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
from dataclasses import dataclass, field
from typing import Any

from bpfs.migrate import ghost_files, hostinfo, procfs, rebuild, stub
from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.lazyrun import page_runs
from bpfs.migrate.helper import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE,
                                 PR_SET_DUMPABLE, PROT_RWX, PROT_WRITE, SCRATCH, SCRATCH_SIZE)
from bpfs.migrate.image import OPEN_FLAGS, Image, OpenFile
from bpfs.migrate.openfiles import NEVER
from bpfs.migrate.tracee import send_signal

CHANNEL = 0x400                   # the socket pair's buffer: between the stub and its table
PROT_EXEC = 4
R_OK, X_OK = 4, 1
O_CLOEXEC = 0o2000000
AT_FDCWD = -100
RLIMIT_AS, RLIMIT_DATA = 9, 2
INFINITY = procfs.RLIM_INFINITY


class PastReturn(MigrateError):
    """A step after the point of no return failed: the process can be neither the ghost
    nor the image's; the caller kills it."""


@dataclass
class Plan:
    """What `prepare` checked and opened, before the ghost is touched; `close()` after."""

    image: Image
    files: list[int]                       # ours, one per image file
    installs: dict[int, int]               # fd in the ghost -> ours
    limits: dict[int, tuple[int, int]] = field(default_factory=dict)  # the ghost's
    reopen: list[OpenFile] = field(default_factory=list)   # the image's, but `installs`
    close_others: bool = False

    def close(self) -> None:
        ghost_files.close_all(self.files)
        self.files = []


def prepare(pid: int, image: Image, fds: object, close_others: bool = False,
            files: bool = True) -> Plan:
    """Every check that needs no change to the halted ghost (module doc); MigrateError.
    Not `files`: the image's files are in the ghost already (`ghost_stream.begin`)."""
    if not isinstance(image, Image):
        raise MigrateError(errno.EINVAL, "restore_in needs an Image", pid)
    installs = ghost_files.check_installs(fds)
    status = procfs.read_status(pid)
    uid, gid = (int(status[k].split()[0]) for k in ("Uid", "Gid"))
    if (uid, gid) != (image.uid, image.gid):
        raise MigrateError(errno.EPERM, f"image of uid {image.uid} gid {image.gid} cannot "
                           f"become ghost {pid} (uid {uid} gid {gid})", pid)
    rebuild.check_reserved(image)
    limits = {res: (soft, hard) for res, soft, hard in
              procfs.parse_limits(procfs.read_text(pid, "limits"))}
    _check_room(pid, image, limits)
    ours = ghost_files.open_files(image) if files else []
    try:
        if files:
            _check_exec_mounts(image, ours)
    except BaseException:
        ghost_files.close_all(ours)
        raise
    reopen = [f for f in image.open_files if f.fd not in installs]
    return Plan(image, ours, installs, limits, reopen, bool(close_others))


def _check_room(pid: int, image: Image, limits: dict[int, tuple[int, int]]) -> None:
    """ENOMEM if the ghost's limits would refuse the image's mappings (its address space;
    its private writable memory, RLIMIT_DATA, counted as mmap counts it)."""
    total = sum(r.end - r.start for r in image.regions) + SCRATCH_SIZE
    data = sum(r.end - r.start for r in image.regions
               if (r.prot & PROT_WRITE or r.pages) and not r.growsdown) + SCRATCH_SIZE
    for res, need in ((RLIMIT_AS, total), (RLIMIT_DATA, data)):
        soft = limits.get(res, (INFINITY, INFINITY))[0]
        if soft != INFINITY and need > soft:
            raise MigrateError(errno.ENOMEM, f"the image needs {need} bytes, more than "
                               f"ghost {pid}'s limit {res} ({soft})", pid)


def _check_exec_mounts(image: Image, files: list[int]) -> None:
    for r in image.regions:
        if r.kind == "file" and r.prot & PROT_EXEC and \
                os.fstatvfs(files[r.file]).f_flag & os.ST_NOEXEC:
            raise MigrateError(errno.EPERM, f"{image.files[r.file].path} is on a noexec "
                               "mount here: its code cannot be mapped")


def restore_in(pid: int, regs: pt.Regs, gadget: int, signals: list[int], plan: Plan,
               built: Any = None) -> int:
    """Make the halted ghost `pid` the process of `plan.image` (module doc); it is left
    stopped, ready to `go`, and the `syscall` of its moved vdso is returned. Before the
    point of no return a failure leaves the ghost as it was (halted, for the caller to
    put back to sleep; what `built` made is the caller's to undo) and raises MigrateError
    (or gp.Gone); after it, PastReturn. `built`: a ghost_stream.Built, the image's
    regions mapped and written already, its files in the ghost, its access checked."""
    xstate = pt.get_xstate(pid)     # (the halted ghost's: what this CPU saves)
    hostinfo.check_compatible(plan.image.host, plan.image.special,
                              hostinfo.host(pt.xstate_xcr0(xstate), len(xstate)))
    maps = procfs.parse_maps(procfs.read_text(pid, "maps"))
    special = {m.path.strip("[]"): (m.start, m.end) for m in maps if m.path in procfs.SPECIAL}
    _check(pid, "mapping the scratch area", gp.inject(
        pid, regs, gadget, signals, pt.SYS["mmap"], SCRATCH, SCRATCH_SIZE, PROT_RWX,
        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0))
    got: list[int] = []
    try:
        stub.install(pid, SCRATCH)
        if built is None:
            _check_access(pid, regs, signals, plan.image)
        got = _open_in(pid, regs, gadget, signals, plan.reopen)
        got[:0] = ghost_files.send_into(pid, regs, gadget, signals, SCRATCH + CHANNEL,
                                        plan.files + list(plan.installs.values()))
    except gp.Gone:
        raise
    except BaseException:
        ghost_files.close_in(pid, regs, gadget, signals, got)
        try:
            gp.inject(pid, regs, gadget, signals, pt.SYS["munmap"], SCRATCH, SCRATCH_SIZE)
        except MigrateError:
            pass    # a stale scratch mapping is no harm to a ghost; the failure goes up
        raise
    if built is not None:
        got[:0] = built.inside
    try:
        _rebuild(pid, regs, signals, plan, got, maps, special, built)
        moved = gadget - special["vdso"][0] + plan.image.special["vdso"][0]
        _finish(pid, regs, moved, signals, plan.image)
        return moved
    except gp.Gone:
        raise
    except BaseException as exc:
        err = exc.errno if isinstance(exc, MigrateError) else errno.EIO
        raise PastReturn(err, f"restore into ghost {pid} failed past its point of no "
                         f"return: {exc}", pid) from exc


def _check_access(pid: int, regs: pt.Regs, signals: list[int], image: Image) -> None:
    """The ghost's user may read each file (execute the executable) by its path: EACCES
    (or the error access(2) gives) naming the first file refused. One batch."""
    b = stub.Batch(SCRATCH)
    for i, ref in enumerate(image.files):
        b.call("access", b.cstr(ref.path), X_OK if i == image.exe else R_OK)
    pt.write_memory(pid, b.writes())
    stub.start(pid, regs, SCRATCH, b.count())
    try:
        run(pid, b, signals)
    except MigrateError as exc:
        i = b.entry_at(pt.getregs(pid).rbx)
        if i < 0:
            raise
        what = "execute" if i == image.exe else "read"
        raise MigrateError(exc.errno, f"{image.files[i].path}: ghost {pid}'s user may not "
                           f"{what} it here ({os.strerror(exc.errno)})", pid) from None


def _open_in(pid: int, regs: pt.Regs, gadget: int, signals: list[int],
             files: list[OpenFile]) -> list[int]:
    """The ghost opens the image's open files itself, as its user (openat, one batch):
    their temporary fds, in order; the error of the first refused (ENOENT, EACCES...)
    naming its path, those opened before it closed again."""
    if not files:
        return []
    b = stub.Batch(SCRATCH)
    for f in files:
        b.call("openat", AT_FDCWD, b.cstr(f.path), f.flags & OPEN_FLAGS & ~NEVER, 0,
               what=f"opening {f.path} (fd {f.fd} of the image)")
    pt.write_memory(pid, b.writes())
    stub.start(pid, regs, SCRATCH, b.count())
    table = SCRATCH + stub.TABLE_OFFSET
    try:
        run(pid, b, signals)
    except MigrateError:
        done = max(b.entry_at(pt.getregs(pid).rbx), 0)
        ghost_files.close_in(pid, regs, gadget, signals, _results(pid, table, done))
        raise
    return _results(pid, table, len(files))


def _results(pid: int, table: int, count: int) -> list[int]:
    """The results of the first `count` entries of a one-part batch at `table`."""
    raw = pt.read_memory(pid, [(table, count * stub.ENTRY)]) if count else b""
    return [struct.unpack_from("<q", raw, i * stub.ENTRY + 56)[0] for i in range(count)]


def _rebuild(pid: int, regs: pt.Regs, signals: list[int], plan: Plan, got: list[int],
             maps: list[procfs.Mapping], special: dict[str, tuple[int, int]],
             built: Any = None) -> None:
    """Batches A and B (module doc), the page runs written between them (with `built`:
    only the regions it could not map yet mapped, and their runs written)."""
    image = plan.image
    n, m = len(image.files), len(image.files) + len(plan.installs)
    files, temps, opened = got[:n], got[n:m], got[m:]
    a = stub.Batch(SCRATCH)
    for lo, hi in own_unmaps(maps, built.mapped if built is not None else []):
        a.call("munmap", lo, hi - lo)
    rebuild.mm_map(a, image, rebuild.KEEP_EXE)
    rebuild.move_special(a, special, image)
    if built is None:
        writable = rebuild.map_regions(a, image, files)
    else:
        writable = built.writable + rebuild.map_regions(a, image, files, built.later)
    for fd in files:
        a.call("close", fd)
    _default_dispositions(a, pid)
    rebuild.process_state(a, image)
    moves = [(t, f.fd, f.flags & O_CLOEXEC) for t, f in zip(opened, plan.reopen)]
    moves += [(t, fd, 0) for t, fd in zip(temps, plan.installs)]
    table = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")} - set(files)
    ghost_files.place(a, table, moves, plan.close_others)
    for f in plan.reopen:
        if f.offset:
            a.call("lseek", f.fd, f.offset, os.SEEK_SET, what=f"seeking in {f.path}")
    _limits(a, image, plan.limits)
    a.call("setpriority", os.PRIO_PROCESS, 0, image.nice, may_fail=True)
    if not image.dumpable:
        a.call("prctl", PR_SET_DUMPABLE, 0)
    a.call("chdir", a.cstr(image.cwd), may_fail=True)
    a.pause()
    rebuild.protect(a, image, writable)
    pt.write_memory(pid, a.writes())
    stub.start(pid, regs, SCRATCH, a.count())
    run(pid, a, signals)
    pt.write_memory(pid, page_runs(image) if built is None else built.kept)  # type: ignore[arg-type]
    pt.cont(pid)
    run(pid, a, signals)


def own_unmaps(maps: list[procfs.Mapping], built: list[Any]) -> list[tuple[int, int]]:
    """What batch A unmaps: the ghost's own mappings, but vvar/vdso, the scratch area
    and the regions `built` (a stream mapped them already; a line of /proc/PID/maps
    may be one of them merged with a neighbour)."""
    keep = sorted([(r.start, r.end) for r in built] + [(SCRATCH, SCRATCH + SCRATCH_SIZE)])
    out: list[tuple[int, int]] = []
    for m in maps:
        if m.path in procfs.SPECIAL:
            continue
        pos = m.start
        for lo, hi in keep:
            if hi <= pos or lo >= m.end:
                continue
            if lo > pos:
                out.append((pos, lo))
            pos = max(pos, hi)
        if pos < m.end:
            out.append((pos, m.end))
    return out


def run(pid: int, batch: stub.Batch, signals: list[int]) -> None:
    """Wait for the end of the batch part just started in `pid`: its int3 (or ud2, a
    failed entry: raised), the kernel's own traps; a signal sent to the process meanwhile
    (a user's SIGTRAP too) is suppressed and kept in `signals`."""
    while True:
        sig, event = gp.stop_parts(gp.wait_stop(pid))
        if event == 0 and sig in (signal.SIGTRAP, signal.SIGILL) and _from_kernel(pid):
            stub.finish(pid, batch, sig)
            return
        if event == 0:
            signals.append(sig)
        pt.cont(pid, 0)


def _from_kernel(pid: int) -> bool:
    info = ctypes.create_string_buffer(128)
    pt.ptrace(pt.GETSIGINFO, pid, 0, ctypes.addressof(info))
    return struct.unpack_from("<i", info.raw, 8)[0] > 0   # SI_USER, SI_TKILL... are <= 0


def _default_dispositions(a: stub.Batch, pid: int) -> None:
    """SIG_DFL for every signal the ghost ignores or catches (the program's dispositions at
    its entry point): the image's own are set afterwards."""
    status = procfs.read_status(pid)
    mask = int(status["SigIgn"], 16) | int(status["SigCgt"], 16)
    dfl = a.data(bytes(32))
    for sig in range(1, 65):
        if mask >> (sig - 1) & 1:
            a.call("rt_sigaction", sig, dfl, 0, 8)


def _limits(a: stub.Batch, image: Image, have: dict[int, tuple[int, int]]) -> None:
    for res, soft, hard in image.rlimits:
        if res not in have:
            continue
        want = rebuild.rlimit_wanted(soft, hard, have[res][1])
        if want != have[res]:
            a.call("prlimit64", 0, res, a.data(struct.pack("<QQ", *want)), 0)


def _finish(pid: int, regs: pt.Regs, gadget: int, signals: list[int], image: Image) -> None:
    """Scratch unmapped; the image's registers and xstate."""
    _check(pid, "unmapping the scratch area", gp.inject(
        pid, regs, gadget, signals, pt.SYS["munmap"], SCRATCH, SCRATCH_SIZE))
    final = image.registers()
    final.orig_rax = gp.NO_SYSCALL  # no syscall restart on resume
    pt.setregs(pid, final)
    pt.set_xstate(pid, image.xstate)


def go(pid: int, image: Image, gadget: int, signals: list[int]) -> None:
    """Let the rebuilt `pid` run: the image's pending signals and those that came during
    the restore (`signals`) queued, the image's mask, detached. Failures are PastReturn.

    The process sends them itself (kill(getpid()), injected at `gadget`, the moved vdso's
    `syscall`) while it blocks every signal, so none is delivered to a tracer and the
    tracer needs no CAP_KILL; SIGSTOP and SIGKILL cannot be blocked (delivered during a
    step they would be swallowed): they are sent from here, last, to go off at the detach.
    """
    wanted = list(dict.fromkeys([*image.pending, *signals]))
    last = [sig for sig in wanted if sig in (signal.SIGKILL, signal.SIGSTOP)]
    try:
        pt.set_sigmask(pid, 2**64 - 1)
        regs = pt.getregs(pid)
        for sig in wanted:
            if sig not in last:
                _check(pid, "kill", gp.inject(pid, regs, gadget, last, pt.SYS["kill"], pid,
                                              sig))
        pt.setregs(pid, regs)
        pt.set_sigmask(pid, image.sigmask)
        for sig in dict.fromkeys(last):
            send_signal(pid, sig)
        pt.detach(pid)
    except MigrateError as exc:
        raise PastReturn(exc.errno, f"letting restored {pid} go: {exc}", pid) from exc


def _check(pid: int, what: str, res: int) -> int:
    if res < 0:
        raise MigrateError(-res, f"{what} in ghost: {os.strerror(-res)}", pid)
    return res

"""Node side: rebuild an `Image` as a running child of the calling process (`Restorer`).

A clean traced helper, forked once, clones each process with the wanted PID (with `jobs_fd`,
through a `Keeper` that makes it a job of its own) and two syscall batches rebuild its memory
and state; a failure kills it before it ever ran. One thread per Restorer (ptrace), and no
wait for "any child" meanwhile. How and why: docs/engine.md ("Restoring on a node").
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
import struct
import threading
from typing import Mapping, Sequence

from bpfs.migrate import hostinfo, image as imagefmt, procfs, stub
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.filecache import PRIVATE, PUBLIC, FileCache, HashCache, hash_bytes
from bpfs.migrate.image import Image, Region
from bpfs.migrate.spawn import fork_stopped

SCRATCH = 0x2000_0000_0000
SCRATCH_SIZE = 0x10_0000
BOUNCE = SCRATCH + SCRATCH_SIZE  # free address space to move vvar/vdso through
RESERVED = (SCRATCH, SCRATCH + 2 * SCRATCH_SIZE)

PROT_RWX, PROT_WRITE = 7, 2
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_FIXED_NOREPLACE = 0x100, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_MM, PR_SET_MM_MAP = 4, 15, 35, 14
CLONE_PARENT = 0x8000
F_SETFD = 2
SS_DISABLE = 2
RSEQ_FLAG_UNREGISTER = 1
HELPER_OPTIONS = pt.O_EXITKILL | pt.O_TRACECLONE | pt.O_TRACEFORK | pt.O_TRACEVFORK
RLIMITS = 16  # RLIMIT_CPU .. RLIMIT_RTTIME
PIDFD_SLOT = 1000  # where the pidfd waits while fds 0-2 are installed
MOVABLE = ("vvar", "vvar_vclock", "vdso")


# A job's keeper (see the module docstring) runs this once the process it keeps runs:
#   loop:  wait4(r12, rbx + 4, WUNTRACED | WCONTINUED, 0); EINTR: again; error: out
#   write: write(r13, rbx, 8) (EINTR: again)      the record: [pid, wait status] (int32s)
#          status continued (0xffff) or stopped (low byte 0x7f): loop
#   out:   exit_group(0)
KEEPER = bytes.fromhex(
    "b83d0000004489e7488d7304ba0a0000004531d20f054883f8fc74e44885c07826b8010000004489ef4889de"
    "ba080000000f054883f8fc74e88b43043dffff000074bd3c7f74b9b8e700000031ff0f05cc")
KEEPER_OFFSET, RECORD_OFFSET = 0x100, 0x180   # in the scratch area, below the batch table
KEEPER_FD = 1
SIG_SETMASK = 2
JOB_RECORD = struct.Struct("<ii")               # pid, wait status: what a keeper writes


class CloneRefused(MigrateError):
    """clone3 itself failed (PID taken, pid_max...): the helper is fine and stays."""


class Helper:
    """A forked, traced, emptied process parked at int3 in its scratch area."""

    def __init__(self) -> None:
        self.pid = fork_stopped()
        try:
            self._clean()
            self._clone_batch, self._tid_addr = self._write_clone_batch()
        except BaseException:
            self.kill()
            raise

    def _clean(self) -> None:
        pid = self.pid
        if pt.stop_signal(pt.wait_stop(pid)) != signal.SIGSTOP:
            raise MigrateError(errno.EIO, "restore helper did not stop", pid)
        pt.setoptions(pid, HELPER_OPTIONS)
        regs = pt.getregs(pid)
        gadget = regs.rip - 2
        if pt.read_memory(pid, [(gadget, 2)]) != b"\x0f\x05":
            raise MigrateError(errno.EIO, "restore helper stopped outside a syscall", pid)
        rseq = pt.get_rseq(pid)
        if rseq:  # else the kernel writes into TLS that is about to vanish: SIGSEGV
            _check(pt.inject(pid, regs, gadget, pt.SYS["rseq"], rseq[0], rseq[1],
                             RSEQ_FLAG_UNREGISTER, rseq[2]), "rseq unregister", pid)
        res = pt.inject(pid, regs, gadget, pt.SYS["mmap"], SCRATCH, SCRATCH_SIZE, PROT_RWX,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        _check(res, "mapping the scratch area", pid)
        stub.install(pid, SCRATCH)
        maps = procfs.parse_maps(procfs.read_text(pid, "maps"))
        self.special = {m.path.strip("[]"): (m.start, m.end) for m in maps
                        if m.path in procfs.SPECIAL}
        vdso = pt.read_memory(pid, [(self.special["vdso"][0],
                                     self.special["vdso"][1] - self.special["vdso"][0])])
        self.vdso_gadget = vdso.find(b"\x0f\x05")
        xstate = pt.get_xstate(pid)
        self.host = hostinfo.host(pt.xstate_xcr0(xstate), len(xstate))
        self.regs = regs
        # what every clone inherits (forked from us now): a restore sets only other limits
        self.rlimits = [_rlimit64(resource.getrlimit(res)) for res in range(RLIMITS)]
        b = stub.Batch(SCRATCH)
        b.call("close_range", 0, 2**32 - 1, 0)
        b.call("set_tid_address", 0)
        b.call("sigaltstack", b.data(struct.pack("<QiiQ", 0, SS_DISABLE, 0, 0)), 0)
        dfl = b.data(bytes(32))
        for sig in range(1, 65):
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                b.call("rt_sigaction", sig, dfl, 0, 8)
        b.call("prctl", PR_SET_NAME, b.cstr("bpfs-helper"))
        for m in maps:
            if m.path not in procfs.SPECIAL and m.start != SCRATCH:
                b.call("munmap", m.start, m.end - m.start)
        pt.set_sigmask(pid, 0)
        b.run(pid, regs)

    def _write_clone_batch(self) -> tuple[stub.Batch, int]:
        """The clone3 batch, written once: each clone only writes its PID into set_tid, and
        whether there is one (the clones run their own batches in their copies of the
        scratch area)."""
        b = stub.Batch(SCRATCH)
        tids = b.data(bytes(8))
        args = b.data(struct.pack("<11Q", CLONE_PARENT, 0, 0, 0, 0, 0, 0, 0, tids, 1, 0))
        b.call("clone3", args, 88)
        pt.write_memory(self.pid, b.writes())
        assert args == tids + 16
        return b, tids

    def clone(self, target_pid: int | None) -> int:
        """clone3(CLONE_PARENT, set_tid=[target_pid]): a clean process, stopped, traced.
        With None, the PID is whatever the kernel gives (a job's keeper)."""
        tids = self._tid_addr
        set_tid = struct.pack("<QQ", tids, 1) if target_pid is not None else bytes(16)
        pt.write_memory(self.pid, [(tids, struct.pack("<i", target_pid or 0)),
                                   (tids + 16 + 64, set_tid)])    # args.set_tid, set_tid_size
        return _clone_in(self.pid, self._clone_batch, target_pid, self.regs)

    def kill(self) -> None:
        _kill(self.pid)


def _clone_in(pid: int, batch: stub.Batch, target_pid: int | None,
              regs: pt.Regs | None = None) -> int:
    """Run `batch` (written in stopped `pid`'s scratch area, one clone3 among its calls;
    from its start with `regs`, else its next part): the new process, stopped at its first
    stop, traced by us. CloneRefused if the clone3 failed (PID taken, process limits)."""
    if regs is not None:
        stub.start(pid, regs, SCRATCH, batch.count())
    else:
        pt.cont(pid)
    stop = pt.wait_stop(pid)
    if pt.stop_event(stop) not in (pt.EVENT_CLONE, pt.EVENT_FORK):  # exit signal SIGCHLD: fork
        try:
            stub.finish(pid, batch, stop)
        except MigrateError as exc:
            taken = " (PID taken)" if exc.errno == errno.EEXIST else ""
            what = f"process {target_pid}" if target_pid is not None else "a process"
            raise CloneRefused(exc.errno, f"cannot create {what}: "
                               f"{os.strerror(exc.errno)}{taken}") from exc
        raise MigrateError(errno.EIO, f"process {pid} stopped by {stop:#x} instead of clone",
                           pid)
    child = pt.geteventmsg(pid)
    pt.cont(pid)
    stub.finish(pid, batch, pt.wait_stop(pid))
    if pt.stop_signal(pt.wait_stop(child)) != signal.SIGSTOP:
        raise MigrateError(errno.EIO, "new process did not stop", child)
    return child


class Keeper:
    """A job's keeper, made ahead of its job: a clean clone of the helper (a child of the
    caller), leader of a new session, holding `jobs_fd` as its fd 1, every signal blocked,
    stopped between the two parts of its batch; the second part clones the job's process
    (`clone`), which is then its child in its session, and names the keeper bpfs-job."""

    def __init__(self, pid: int, regs: pt.Regs, jobs_fd: int) -> None:
        self.pid, self.regs = pid, regs        # a fresh clone of the helper, and its regs
        try:
            _scheduling(pid, os.SCHED_FIFO, 1)  # the build's latency: see _scheduling
            b = self.batch = stub.Batch(SCRATCH)
            b.call("setsid")
            b.call("pidfd_open", os.getpid(), 0)            # fd 0: the table starts empty
            b.call("pidfd_getfd", 0, jobs_fd, 0)            # fd 1 = KEEPER_FD
            b.call("close", 0)
            b.call("rt_sigprocmask", SIG_SETMASK, b.data(b"\xff" * 8), 0, 8)
            b.pause()
            self._tid = b.data(bytes(8))
            b.call("clone3", b.data(struct.pack("<11Q", 0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0,
                                                self._tid, 1, 0)), 88)
            b.call("prctl", PR_SET_NAME, b.cstr("bpfs-job"))  # a spare is still bpfs-helper
            pt.write_memory(self.pid, [*b.writes(), (SCRATCH + KEEPER_OFFSET, KEEPER)])
            stub.start(self.pid, self.regs, SCRATCH, b.count())
            stub.finish(self.pid, b, pt.wait_stop(self.pid))
        except BaseException:
            self.kill()
            raise

    def clone(self, target_pid: int) -> int:
        """The job's process: our tracee, stopped, with PID `target_pid`. The keeper can
        clone only once; CloneRefused (PID taken...) leaves it unusable: kill it."""
        pt.write_memory(self.pid, [(self._tid, struct.pack("<i", target_pid)),
                                   (SCRATCH + RECORD_OFFSET, JOB_RECORD.pack(target_pid, 0))])
        return _clone_in(self.pid, self.batch, target_pid)

    def keep(self, child: int) -> None:
        """Set the keeper running its loop over `child` (see KEEPER), detached."""
        r = self.regs.copy()
        r.rip, r.rbx, r.r12, r.r13 = (SCRATCH + KEEPER_OFFSET, SCRATCH + RECORD_OFFSET, child,
                                      KEEPER_FD)
        r.orig_rax = 2**64 - 1
        pt.setregs(self.pid, r)
        _scheduling(self.pid, os.SCHED_OTHER, 0)
        pt.detach(self.pid)

    def kill(self) -> None:
        _kill(self.pid)


def _scheduling(pid: int, policy: int, priority: int) -> None:
    """Set `pid`'s scheduling policy; where the kernel refuses (no CAP_SYS_NICE, no RT
    time for our cgroup), it stays as it was.

    Why: a keeper's setsid() also gives its session a scheduler group of its own (autogroup),
    so the job's process is built in a group that has to wait for its turn each time it
    wakes, and a restore under load took four times as long (bench/results-engine.md). The
    keeper and the job's process (which inherits it) are SCHED_FIFO while we build them, so
    each of the build's stops comes back at once, and SCHED_OTHER before they are let go."""
    try:
        os.sched_setscheduler(pid, policy, os.sched_param(priority))
    except OSError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, pt.WALL)
    except (ProcessLookupError, ChildProcessError):
        pass


def _check(res: int, what: str, pid: int) -> int:
    if res < 0:
        raise MigrateError(-res, f"{what} in process {pid}: {os.strerror(-res)}", pid)
    return res


class Restorer:
    """Restores images as children of the calling process (see the module docstring).

    `cache_dir`: where received file contents are kept by hash (on a filesystem that allows
    exec); None keeps them in memory files for the restore only.
    """

    def __init__(self, cache_dir: str | None = None, jobs_fd: int | None = None) -> None:
        self.cache = FileCache(cache_dir) if cache_dir else None
        self.hashes = HashCache()
        self.jobs_fd = jobs_fd
        self.last_keeper: int | None = None     # the keeper of the last restore (jobs_fd)
        self._thread = threading.get_ident()
        self._spare: Keeper | None = None
        self._helper: Helper | None = Helper()

    @property
    def helper(self) -> Helper:
        """The clean helper; a new one if the last one broke (killed, or a clone went wrong)."""
        if self._helper is None:
            self._helper = Helper()
        return self._helper

    @property
    def host(self) -> imagefmt.Host:
        return self.helper.host

    def close(self) -> None:
        if self._spare is not None:
            self._spare.kill()
            self._spare = None
        if self._helper is not None:
            self._helper.kill()
            self._helper = None

    def __enter__(self) -> "Restorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- files ----

    def missing(self, image: Image) -> list[str]:
        """Hashes of the image's files this node has neither identical on disk nor cached."""
        out = []
        for ref in image.files:
            if ref.hash in image.contents or ref.hash in out:
                continue
            fd = self._open_file(ref.path, ref.hash, {})
            if fd is None:
                out.append(ref.hash)
            else:
                os.close(fd)
        return out

    def _open_file(self, path: str, digest: str, content: Mapping[str, bytes],
                   public: bool = False) -> int | None:
        """An fd of a file with content `digest`: the node's own file, cached or supplied.
        A cached or supplied copy is readable by users only if `public` (the process that
        maps it is dumpable: see bpfs.migrate.filecache)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                if self.hashes.hash_fd(fd)[0] == digest:
                    return fd
            except MigrateError:
                pass
            os.close(fd)
        if self.cache is not None:
            if digest in content:
                self.cache.put(digest, content[digest])
            return self.cache.open(digest, public)
        if digest in content:
            return _memfd(digest, content[digest], public)
        return None

    def _open_files(self, image: Image, content: Mapping[str, bytes]) -> list[int]:
        fds: list[int] = []
        try:
            for ref in image.files:
                fd = self._open_file(ref.path, ref.hash, content, image.dumpable)
                if fd is None:
                    raise MigrateError(errno.ENOENT, f"{ref.path}: this node lacks the "
                                       f"master's file ({ref.hash[:19]}...) and it was not sent")
                fds.append(fd)
            _refuse_setid(fds[image.exe], image.exe_path)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    # ---- restore ----

    def restore(self, image: Image, *, pid: int | None = None, uid: int, gid: int,
                groups: Sequence[int] = (), fds: Sequence[int] = (0, 1, 2),
                file_content: Mapping[str, bytes] | None = None) -> int:
        """Create `image` as process `pid` (default image.pid), running as uid/gid/groups with
        `fds` as its 0, 1, 2; returns its pid. It is our child, running, not traced."""
        pid = image.pid if pid is None else pid
        if threading.get_ident() != self._thread:
            raise MigrateError(errno.EINVAL, "a Restorer must be used from the thread that "
                               "created it (ptrace only answers the tracer thread)")
        hostinfo.check_compatible(image.host, image.special, self.host)
        _check_reserved(image)
        content = {**image.contents, **(file_content or {})}
        for h, data in content.items():
            if hash_bytes(data) != h:
                raise MigrateError(errno.EINVAL, f"supplied content does not match {h}")
        files = self._open_files(image, content)
        self.last_keeper = None
        keeper: Keeper | None = None
        try:
            if self.jobs_fd is None:
                child = self._clone(pid)
            else:
                keeper, child = self._clone_job(pid)
            try:
                self._build(child, image, files, list(fds), uid, gid, list(groups),
                            keeper is not None)
                if keeper is not None:
                    keeper.keep(child)
            except BaseException:
                _kill(child)
                if keeper is not None:
                    keeper.kill()
                raise
        finally:
            for fd in files:
                os.close(fd)
        self.last_keeper = keeper.pid if keeper is not None else None
        return child

    def _clone(self, pid: int | None) -> int:
        try:
            return self.helper.clone(pid)
        except MigrateError as exc:
            if not isinstance(exc, CloneRefused):  # the helper itself is in doubt
                self.close()
            raise

    def prepare(self) -> None:
        """Make the next restore's keeper now (jobs_fd only), off that restore's path."""
        if self.jobs_fd is not None and self._spare is None:
            self._spare = Keeper(self._clone(None), self.helper.regs, self.jobs_fd)

    def _clone_job(self, pid: int) -> tuple[Keeper, int]:
        """A keeper (the spare, else a new one), then process `pid` as its child."""
        keeper, self._spare = self._spare, None
        if keeper is None:
            keeper = Keeper(self._clone(None), self.helper.regs, self.jobs_fd)  # type: ignore[arg-type]
        try:
            return keeper, keeper.clone(pid)
        except BaseException:
            keeper.kill()
            raise

    def _build(self, child: int, image: Image, files: list[int], fds: list[int], uid: int,
               gid: int, groups: list[int], job: bool = False) -> None:
        if len(fds) != 3:
            raise MigrateError(errno.EINVAL, "fds must be three descriptors for 0, 1, 2")
        a = stub.Batch(SCRATCH)
        if job:
            a.call("setpgid", 0, 0)  # its own group in the keeper's session: not orphaned
            a.call("close_range", 0, 2**32 - 1, 0)  # the keeper's fds
        a.call("pidfd_open", os.getpid(), 0)  # becomes fd 0: the table starts empty
        for fd in files:
            a.call("pidfd_getfd", 0, fd, 0)  # file i lands on fd i + 1
        self._mm_map(a, image)
        self._move_special(a, image)
        writable = self._map_regions(a, image)
        a.call("close_range", 1, 2**32 - 1, 0)
        self._process_state(a, image)
        self._stdio(a, fds)
        self._credentials(a, image, uid, gid, groups)
        a.pause()  # the byte runs are written here
        self._protect(a, image, writable)
        a.run(child, self.helper.regs)
        pt.write_memory(child, [run for r in image.regions for run in r.pages])
        a.resume(child)
        self._finish(child, image, job)

    def _stdio(self, a: stub.Batch, fds: list[int]) -> None:
        """fds 0-2 from the restorer's `fds`, through the pidfd parked at PIDFD_SLOT."""
        a.call("dup3", 0, PIDFD_SLOT, 0)
        a.call("close", 0)
        for fd in fds:
            a.call("pidfd_getfd", PIDFD_SLOT, fd, 0)  # lands on 0, 1, 2 in turn
        a.call("close", PIDFD_SLOT)
        for fd in range(3):
            a.call("fcntl", fd, F_SETFD, 0)  # pidfd_getfd set close-on-exec

    def _credentials(self, a: stub.Batch, image: Image, uid: int, gid: int,
                     groups: list[int]) -> None:
        """Resource limits and nice (while still root: a user may not lower their nice,
        and the master's process had it), the user's ids (root's capabilities go with
        uid 0), then the cwd."""
        have = self.helper.rlimits
        for res, soft, hard in image.rlimits:
            want = _rlimit_wanted(soft, hard, have[res][1])
            if want != have[res]:
                a.call("prlimit64", 0, res, a.data(struct.pack("<QQ", *want)), 0)
        a.call("setpriority", os.PRIO_PROCESS, 0, image.nice)
        a.call("setgroups", len(groups), a.data(struct.pack(f"<{len(groups)}I", *groups)))
        a.call("setresgid", gid, gid, gid)
        a.call("setresuid", uid, uid, uid)
        # The kernel's rule for an exec, kept across the move. commit_creds has just set it
        # to fs.suid_dumpable (a uid change), or left the helper's 1 (root): neither is the
        # process's own. Not dumpable (the master's kernel found its executable or interpreter
        # unreadable by its user): 0, and nothing after this turns it back on.
        a.call("prctl", PR_SET_DUMPABLE, 1 if image.dumpable else 0)
        a.call("chdir", a.cstr("/"))
        a.call("chdir", a.cstr(image.cwd), may_fail=True)  # missing or not allowed: stay at /

    def _protect(self, a: stub.Batch, image: Image, writable: list[Region]) -> None:
        """The part after the page writes: final protections, then rseq (after the writes, so
        the kernel's cpu_id update stays)."""
        for r in writable:
            a.call("mprotect", r.start, r.end - r.start, r.prot)
        if image.rseq:
            a.call("rseq", image.rseq[0], image.rseq[1], 0, image.rseq[2])

    def _finish(self, child: int, image: Image, job: bool = False) -> None:
        """Scratch gone, registers and mask set, detached: running."""
        gadget = image.special["vdso"][0] + self.helper.vdso_gadget
        _check(pt.inject(child, self.helper.regs, gadget, pt.SYS["munmap"], SCRATCH,
                         SCRATCH_SIZE), "unmapping the scratch area", child)
        final = image.registers()
        final.orig_rax = 2**64 - 1  # no syscall restart on resume
        pt.setregs(child, final)
        pt.set_xstate(child, image.xstate)
        pt.set_sigmask(child, image.sigmask)
        for sig in image.pending:  # queued while stopped: seen first thing after the detach
            os.kill(child, sig)
        if job:
            _scheduling(child, os.SCHED_OTHER, 0)  # SCHED_FIFO from its keeper, for the build
        pt.detach(child)

    def _mm_map(self, a: stub.Batch, image: Image) -> None:
        mm = image.mm
        auxv = a.data(image.auxv)
        fields = [mm[k] for k in imagefmt.MM_KEYS]
        prctl_map = struct.pack("<12QII", *fields, auxv, len(image.auxv), image.exe + 1)
        a.call("prctl", PR_SET_MM, PR_SET_MM_MAP, a.data(prctl_map), len(prctl_map), 0)

    def _move_special(self, a: stub.Batch, image: Image) -> None:
        """mremap vvar/vvar_vclock/vdso to the image's addresses, via BOUNCE if ranges meet."""
        have = self.helper.special
        moves = [(have[n], image.special[n]) for n in MOVABLE if n in have and n in image.special]
        if all(src == dst for src, dst in moves):
            return
        clash = any(d[0] < s[1] and s[0] < d[1] for _, d in moves for s, _ in moves)
        if clash:
            base = min(s[0] for s, _ in moves)
            bounced = []
            for src, dst in moves:
                tmp = BOUNCE + src[0] - base
                a.call("mremap", src[0], src[1] - src[0], src[1] - src[0],
                       MREMAP_MAYMOVE | MREMAP_FIXED, tmp)
                bounced.append(((tmp, tmp + src[1] - src[0]), dst))
            moves = bounced
        for src, dst in moves:
            a.call("mremap", src[0], src[1] - src[0], src[1] - src[0],
                   MREMAP_MAYMOVE | MREMAP_FIXED, dst[0])

    def _map_regions(self, a: stub.Batch, image: Image) -> list[Region]:
        """mmap every region; those with pages to write get PROT_WRITE until batch B."""
        writable = []
        for r in image.regions:
            prot = r.prot
            if r.pages and not prot & PROT_WRITE:
                prot |= PROT_WRITE
                writable.append(r)
            if r.kind == "anon":
                flags = MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS | (MAP_GROWSDOWN if r.growsdown
                                                                   else 0)
                a.call("mmap", r.start, r.end - r.start, prot, flags, -1, 0)
            else:
                a.call("mmap", r.start, r.end - r.start, prot, MAP_PRIVATE | MAP_FIXED,
                       r.file + 1, r.offset)
        return writable

    def _process_state(self, a: stub.Batch, image: Image) -> None:
        for sig, handler, flags, restorer, mask in image.sigactions:
            a.call("rt_sigaction", sig, a.data(struct.pack("<4Q", handler, flags, restorer,
                                                           mask)), 0, 8)
        a.call("personality", image.personality)
        a.call("umask", image.umask)
        a.call("prctl", PR_SET_NAME, a.cstr(image.comm))
        if image.robust:
            a.call("set_robust_list", image.robust[0], image.robust[1])
        if image.tid_address:
            a.call("set_tid_address", image.tid_address)


def _check_reserved(image: Image) -> None:
    lo, hi = RESERVED
    for r in image.regions:
        if r.start < hi and lo < r.end:
            raise MigrateError(errno.EOPNOTSUPP, f"image maps {r.start:#x}-{r.end:#x}, which "
                               "this restorer reserves for its scratch area")


def _rlimit64(lim: tuple[int, int]) -> tuple[int, int]:
    """(soft, hard) as the kernel's struct rlimit64 has them (RLIM_INFINITY is 2**64 - 1)."""
    return tuple(2**64 - 1 if v == resource.RLIM_INFINITY else v for v in lim)  # type: ignore


def _rlimit_wanted(soft: int, hard: int, own_hard: int) -> tuple[int, int]:
    """The image's limit clamped to what the target may raise to.

    A hard limit can only be raised with CAP_SYS_RESOURCE (root in a container may lack it),
    so limits above the hard limit the target inherited from the helper are lowered to it.
    """
    hard = min(hard, own_hard)
    return min(soft, hard), hard


def _refuse_setid(fd: int, name: str) -> None:
    """EPERM for a set-user-ID, set-group-ID or file-capability executable (as on the master)."""
    mode = os.fstat(fd).st_mode
    try:
        os.getxattr(fd, "security.capability")
        caps = True
    except OSError:
        caps = False
    if mode & stat.S_ISUID or (mode & stat.S_ISGID and mode & stat.S_IXGRP) or caps:
        raise MigrateError(errno.EPERM, f"{name}: set-ID or file-capability programs cannot "
                           "migrate")


def _memfd(digest: str, data: bytes, public: bool) -> int:
    """The content in a memory file, with the mode a cached copy would have (not 0777)."""
    fd = os.memfd_create(digest[:40], os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, PUBLIC if public else PRIVATE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd

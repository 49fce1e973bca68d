"""Node side: rebuild an `Image` as a running child of the calling process (`Restorer`).

A clean traced helper, forked once, clones each process with the wanted PID (with `jobs_fd`,
through a `Keeper` that makes it a job of its own) and two syscall batches rebuild its memory
and state; a failure kills it before it ever ran. One thread per Restorer (ptrace), and no
wait for "any child" meanwhile. How and why: docs/engine.md ("Restoring on a node").
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
from typing import Callable, ContextManager, Mapping, Sequence

from bpfs.migrate import hostinfo, image as imagefmt, openfiles, rebuild, seccomp, stub
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.filecache import PRIVATE, PUBLIC, FileCache, HashCache, hash_bytes
from bpfs.migrate.helper import (
    F_SETFD, PIDFD_SLOT, PR_SET_DUMPABLE, SCRATCH, SCRATCH_SIZE, CloneRefused, Helper, Keeper,
    check_res, kill_reap, set_scheduling)
from bpfs.migrate.image import Image, Region
from bpfs.migrate.imageframe import Buffer
from bpfs.migrate.lazyrun import page_runs
from bpfs.migrate.rebuild import check_reserved as _check_reserved
from bpfs.migrate.rebuild import refuse_setid as _refuse_setid
from bpfs.migrate.rebuild import rlimit_wanted as _rlimit_wanted

LISTENER_FD = 3      # seccomp's listener in a supervised process: the first fd after 0-2


def _take_listener(child: int) -> int:
    """Our copy of the seccomp listener the child's batch just made (its fd 3)."""
    pidfd = seccomp.pidfd_open(child)
    try:
        fd = pt.syscall(pt.SYS["pidfd_getfd"], pidfd, LISTENER_FD, 0)
    finally:
        os.close(pidfd)
    if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:seccomp notify":
        os.close(fd)
        raise MigrateError(errno.EIO, "fd 3 of the restored process is not its listener", child)
    os.set_inheritable(fd, False)
    return fd






MAX_ORIGINS = 1 << 16


class Restorer:
    """Restores images as children of the calling process (see the module docstring).

    `cache_dir`: where received file contents are kept by hash (on a filesystem that allows
    exec); None keeps them in memory files for the restore only.
    """

    def __init__(self, cache_dir: str | None = None, jobs_fd: int | None = None,
                 supervised: bool = False) -> None:
        self.cache = FileCache(cache_dir) if cache_dir else None
        self.hashes = HashCache()
        # content hash -> the master's path of a file a restored process maps: a move's
        # dump names the master's path, not where this node keeps its copy (the cache)
        self.origin: dict[str, str] = {}
        self.jobs_fd = jobs_fd
        self.supervised = supervised            # install bpfs.migrate.seccomp's filter
        self.last_keeper: int | None = None     # the keeper of the last restore (jobs_fd)
        self.last_listener: int | None = None   # its listener (supervised), ours to close
        self._thread = threading.get_ident()
        # around a clone the kernel numbers (a keeper): a node's PID counter held still
        # meanwhile (bpfs/node/pidcounter.py `guard`)
        self.numbering: Callable[[], ContextManager[None]] = contextlib.nullcontext
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
                if len(self.origin) < MAX_ORIGINS:
                    self.origin[ref.hash] = ref.path
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
        `fds` as its 0, 1, 2, then the image's open files opened as that user at their own
        numbers (`openfiles`; a carried 0-2 replaces the given one); returns its pid. It is
        our child, running, not traced."""
        build = self.begin(image, pid=pid, uid=uid, gid=gid, groups=groups, fds=fds,
                           file_content=file_content)
        try:
            build.write(page_runs(image))  # type: ignore[arg-type]
        except BaseException:
            build.abort()
            raise
        return build.finish()

    def begin(self, image: Image, *, pid: int | None = None, uid: int, gid: int,
              groups: Sequence[int] = (), fds: Sequence[int] = (0, 1, 2),
              file_content: Mapping[str, bytes] | None = None) -> "Build":
        """`restore` up to the page writes: the process exists, stopped, its memory mapped
        and writable, its credentials set; the caller writes the pages (`Build.write`, as
        they arrive) and then `finish`es it, or `abort`s it (nothing ever ran). Every
        call from this Restorer's thread; other restores may run meanwhile."""
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
        build = Build(self, image, self._open_files(image, content))
        try:
            if self.jobs_fd is None:
                build.child = self._clone(pid)
            else:
                build.keeper, build.child = self._clone_job(pid)
            build.batch = self._build(build.child, image, build.files, list(fds), uid, gid,
                                      list(groups), build.keeper is not None)
        except BaseException:
            build.abort()
            raise
        return build

    def _clone(self, pid: int | None) -> int:
        try:
            if pid is None:         # numbered by the kernel: under the caller's guard
                with self.numbering():
                    return self.helper.clone(pid)
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
               gid: int, groups: list[int], job: bool = False) -> stub.Batch:
        """The batch's first part run in `child`: it waits, stopped, for its pages."""
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
        if self.supervised:   # while still root: no no_new_privs needed (set-id stays refused)
            prog = a.data(seccomp.FILTER, align=8)
            a.call("seccomp", seccomp.SECCOMP_SET_MODE_FILTER,
                   seccomp.SECCOMP_FILTER_FLAG_NEW_LISTENER
                   | seccomp.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, a.data(seccomp.fprog(prog), 8))
        self._credentials(a, image, uid, gid, groups)
        a.pause()  # the byte runs are written here
        if self.supervised:
            a.call("close", LISTENER_FD)
        openfiles.reopen(a, image.open_files, taken={0, 1, 2})  # as the user: creds are set
        self._protect(a, image, writable)
        a.run(child, self.helper.regs)
        return a

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
        rebuild.protect(a, image, writable)

    def _finish(self, child: int, image: Image, job: bool = False) -> None:
        """Scratch gone, registers and mask set, detached: running."""
        gadget = image.special["vdso"][0] + self.helper.vdso_gadget
        check_res(pt.inject(child, self.helper.regs, gadget, pt.SYS["munmap"], SCRATCH,
                         SCRATCH_SIZE), "unmapping the scratch area", child)
        final = image.registers()
        final.orig_rax = 2**64 - 1  # no syscall restart on resume
        pt.setregs(child, final)
        pt.set_xstate(child, image.xstate)
        pt.set_sigmask(child, image.sigmask)
        for sig in image.pending:  # queued while stopped: seen first thing after the detach
            os.kill(child, sig)
        if job:
            set_scheduling(child, os.SCHED_OTHER, 0)  # SCHED_FIFO from its keeper, for the build
        pt.detach(child)

    def _mm_map(self, a: stub.Batch, image: Image) -> None:
        rebuild.mm_map(a, image, image.exe + 1)

    def _move_special(self, a: stub.Batch, image: Image) -> None:
        rebuild.move_special(a, self.helper.special, image)

    def _map_regions(self, a: stub.Batch, image: Image) -> list[Region]:
        return rebuild.map_regions(a, image, range(1, len(image.files) + 1))

    def _process_state(self, a: stub.Batch, image: Image) -> None:
        rebuild.process_state(a, image)


class Build:
    """A process being restored (`Restorer.begin`): stopped where its pages are written."""

    def __init__(self, restorer: Restorer, image: Image, files: list[int]) -> None:
        self.restorer, self.image, self.files = restorer, image, files
        self.child: int | None = None
        self.keeper: Keeper | None = None
        self.batch: stub.Batch | None = None
        self.listener: int | None = None
        # writes from other threads (bpfs/node/streamin.py), several at once, against
        # `abort`: a write never reaches a PID that was freed meanwhile and taken again
        self._writing = threading.Condition()
        self._writes = 0

    def write(self, runs: Sequence[tuple[int, Buffer]]) -> None:
        """(address, bytes) into its memory (process_vm_writev from where they are). Any
        thread, several at once (each faults in its own fresh pages: on two cores two
        writes go nearly twice as fast); ESRCH once aborted."""
        with self._writing:
            child = self.child
            if child is None or self.batch is None:
                raise MigrateError(errno.ESRCH, "the process being restored is gone")
            self._writes += 1
        try:
            pt.write_memory(child, runs)
        finally:
            with self._writing:
                self._writes -= 1
                self._writing.notify_all()

    def finish(self) -> int:
        """The rest of the restore: its open files, protections, registers; it runs.
        Its pid; on any failure it is killed first (nothing ran)."""
        r = self.restorer
        assert self.child is not None and self.batch is not None
        child, job = self.child, self.keeper is not None
        try:
            if r.supervised:
                self.listener = _take_listener(child)
            self.batch.resume(child)
            r._finish(child, self.image, job)
            if self.keeper is not None:
                if self.listener is not None:
                    self.keeper.hold(self.listener)
                self.keeper.keep(child)
        except BaseException:
            self.abort()
            raise
        self._close_files()
        r.last_keeper = self.keeper.pid if self.keeper is not None else None
        r.last_listener, self.listener, self.child = self.listener, None, None
        return child

    def abort(self) -> None:
        """Kill what was built (it never ran) and close what it held; again: nothing. A
        write under way in another thread ends first."""
        with self._writing:
            child, self.child = self.child, None
            self._writing.wait_for(lambda: self._writes == 0)
        if child is not None:
            kill_reap(child)
        if self.keeper is not None:
            self.keeper.kill()
            self.keeper = None
        if self.listener is not None:
            os.close(self.listener)
            self.listener = None
        self._close_files()

    def _close_files(self) -> None:
        files, self.files = self.files, []
        for fd in files:
            os.close(fd)


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

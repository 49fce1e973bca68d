"""The restore's helper and a job's keeper: clean processes that clone others.

A `Helper` is forked once per Restorer, traced, emptied and parked at int3 in its scratch
area; it clones each process a restore builds with the PID wanted (clone3 with set_tid), or,
for a job, a `Keeper`: a session leader that clones the job's process as its own child and
then reports its stops and end (KEEPER). How and why: docs/engine.md ("Restoring on a node").
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import struct

from bpfs.migrate import hostinfo, procfs, stub
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
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
            check_res(pt.inject(pid, regs, gadget, pt.SYS["rseq"], rseq[0], rseq[1],
                             RSEQ_FLAG_UNREGISTER, rseq[2]), "rseq unregister", pid)
        res = pt.inject(pid, regs, gadget, pt.SYS["mmap"], SCRATCH, SCRATCH_SIZE, PROT_RWX,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        check_res(res, "mapping the scratch area", pid)
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
        kill_reap(self.pid)


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
            set_scheduling(pid, os.SCHED_FIFO, 1)  # the build's latency: see set_scheduling
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

    def hold(self, fd: int) -> None:
        """Keep a copy of our `fd` (the job's seccomp listener) in the keeper while it lives.

        Why: were the node daemon killed, its fds close before the kernel kills the rest of
        its PID namespace, and a call waiting on a listener nobody holds fails (ENOSYS) in
        that moment: a job's `fork` would print "Cannot fork" on its way out. With the
        keeper holding it too, the waiting call stays waiting until the process is killed."""
        gadget = SCRATCH + stub.SYSCALL_OFFSET
        pidfd = check_res(pt.inject(self.pid, self.regs, gadget, pt.SYS["pidfd_open"],
                                    os.getpid(), 0), "pidfd_open in the keeper", self.pid)
        try:
            check_res(pt.inject(self.pid, self.regs, gadget, pt.SYS["pidfd_getfd"], pidfd, fd,
                                0), "taking the listener into the keeper", self.pid)
        finally:
            pt.inject(self.pid, self.regs, gadget, pt.SYS["close"], pidfd)

    def keep(self, child: int) -> None:
        """Set the keeper running its loop over `child` (see KEEPER), detached."""
        r = self.regs.copy()
        r.rip, r.rbx, r.r12, r.r13 = (SCRATCH + KEEPER_OFFSET, SCRATCH + RECORD_OFFSET, child,
                                      KEEPER_FD)
        r.orig_rax = 2**64 - 1
        pt.setregs(self.pid, r)
        set_scheduling(self.pid, os.SCHED_OTHER, 0)
        pt.detach(self.pid)

    def kill(self) -> None:
        kill_reap(self.pid)


def set_scheduling(pid: int, policy: int, priority: int) -> None:
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


def kill_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, pt.WALL)
    except (ProcessLookupError, ChildProcessError):
        pass


def check_res(res: int, what: str, pid: int) -> int:
    if res < 0:
        raise MigrateError(-res, f"{what} in process {pid}: {os.strerror(-res)}", pid)
    return res


def _rlimit64(lim: tuple[int, int]) -> tuple[int, int]:
    """(soft, hard) as the kernel's struct rlimit64 has them (RLIM_INFINITY is 2**64 - 1)."""
    return tuple(2**64 - 1 if v == resource.RLIM_INFINITY else v for v in lim)  # type: ignore

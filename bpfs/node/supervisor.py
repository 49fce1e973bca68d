"""The node's half of the one PID space: forks, exec, ends, parentage and signals.

Every process the node restores runs under bpfs.migrate.seccomp's filter, and the daemon
holds each job's listener. The supervisor answers the calls the filter stops:

- **fork, vfork, clone, clone3** (a new process, not a thread): the master makes a ghost
  child of the caller's ghost and answers with its PID (`fork` -> `forked`); the node gives
  that same PID to the child by pointing its PID namespace's counter (ns_last_pid) just
  before it, lets the call run (CONTINUE), waits until the kernel has taken the number, and
  puts the counter back where it parks: above the master's pid_max, so whatever the kernel
  numbers on its own (threads, keepers, the daemon's helpers) can never take a PID the
  master may hand out. The master's refusal is the fork's errno (EAGAIN: process limits).
  Only one directed fork is ever in flight: the critical part has no await in it.
- **execve**: let through; a moment later, if the command line changed, the ghost takes it
  (`execed`).
- the child's **end**: a pidfd per child; once it has been reaped on the node (by its
  parent, or by us as PID 1 for orphans) its wait status goes to the master (`exited`),
  which ends the ghost the same way and has the ghost's parent reap it.
- **getppid, getpgid, getpgrp, getsid**: a job's process is the child of its keeper, in
  the keeper's session and a group of its own (bpfs/migrate/restore.py): those numbers
  are the node's alone, so they are answered with the master's (the ghost's parent, group
  and session, sent with the restore); every other answer the kernel gives is already a
  cluster PID.
- **kill, tkill, tgkill, rt_(tg)sigqueueinfo** of a PID (or group) that is not on this
  node: the master delivers it with the caller's real and effective uid, and kill(2)'s
  errno comes back (`kill` -> `killed`). Local signals run as they are.

Ghosts are made by the master's tracer thread (bpfs/migrate/tracer.py `fork`), so forks
on all nodes queue there; the node waits only for its own. Errors: a job whose listener
fails is logged and dropped (its calls then fail with ENOSYS: the kernel's answer when
nobody listens); nothing here raises into the session.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from bpfs.migrate import seccomp
from bpfs.migrate.seccomp import SYSCALLS as NR
from bpfs.node import procread
from bpfs.node.pidproxy import PidfdCalls, Proxies
from bpfs.node.session import Session
from bpfs.standin import LAUNCHED, WAIT_ARG
from bpfs.wire import messages

log = logging.getLogger("bpslave")

PID_MAX_LIMIT = 1 << 22
MAX_ARMED = 4096             # launches from this node waiting for their exec or end
WAKE_SIGNAL = signal.SIGUSR2  # ends a receiver's wait once its job is over
SWEEP = 5.0                  # forget calls whose caller died while the master answered
TAKE_TIMEOUT = 0.05          # the kernel taking the directed PID after CONTINUE
EXEC_CHECKS = (0.005, 0.02, 0.1, 0.5, 2.0, 5.0)   # after an execve: when to look at the
                                   # cmdline (a program done sooner costs its ghost no rename;
                                   # a loaded node may take long to load one)
REAP_POLL = (0.001, 0.1)     # an ended child not reaped yet: look again (first, at most)


@dataclass(eq=False)
class Job:
    """One restored process and everything forked under it: one listener."""
    session: Session
    id: int                           # the restore's (its messages carry it)
    leader: int
    listener: int
    keeper: int | None
    ppid: int | None                  # the master's answers for the leader
    pgid: int | None
    sid: int | None
    done: bool = False                # every process of the job has ended
    threads: list[threading.Thread] = field(default_factory=list)   # its receivers
    receivers: int = 2


@dataclass(eq=False)
class Child:
    """A process forked on this node: its ghost is `pid` on the master too."""
    pid: int
    id: int
    pidfd: int
    job: Job
    cmdline: bytes = b""


class Supervisor(PidfdCalls):
    """The jobs' listeners and the children forked under them (one per node daemon)."""

    def __init__(self, park_at: int, on_child: Callable[[Child], None] | None = None,
                 on_end: Callable[[int], None] | None = None) -> None:
        self.park_at = park_at        # the master's pid_max: our own PIDs go above it
        self.jobs: dict[int, Job] = {}          # by leader
        self.children: dict[int, Child] = {}    # by pid
        self.on_child = on_child or (lambda c: None)
        self.on_end = on_end or (lambda pid: None)
        self._seq = itertools.count(1)
        # Calls waiting for the master (seq -> what to finish them with):
        # no task waits, the answer's handler finishes them (one trip through trio fewer).
        self._forks: dict[int, tuple[Job, seccomp.Notif, int]] = {}
        self._kills: dict[int, tuple[Job, seccomp.Notif]] = {}
        self._execs: dict[int, tuple[Job, seccomp.Notif, int]] = {}
        self._watches: dict[int, tuple[Job, seccomp.Notif, int, tuple[int, int, int],
                                       int]] = {}
        self.proxies = Proxies()
        # Launches from this node (bpfs/standin.py): who may exec elsewhere (the master
        # said `armed`), and the stand-ins: the wait status once known, their waiting call.
        self.armed: set[int] = set()
        self._ends: dict[int, int] = {}
        self._waiting: dict[int, tuple[Job, seccomp.Notif]] = {}
        self._nursery: trio.Nursery | None = None
        self._pending: int | None = None        # a directed fork's PID, not yet settled
        self._token: trio.lowlevel.TrioToken | None = None
        self._epoll = select.epoll()            # the listeners (the receiver thread's)
        self._by_fd: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._parked = park_at
        self.park()

    # ---- the counter ----

    def park(self) -> None:
        """Point the namespace's counter above every cluster PID (see the docstring)."""
        self.settle()
        self._parked = max(self.park_at, procread.read_last())
        procread.write_last(self._parked)

    # ---- jobs ----

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the jobs' listeners (the receiver thread) and watch the children until
        cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        signal.signal(WAKE_SIGNAL, lambda *_: None)     # interrupts a receiver's wait
        thread = threading.Thread(target=self._watch_listeners, name="listeners",
                                  daemon=True)
        thread.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(SWEEP)
                    self._sweep()
        finally:
            os.write(self._wake_w, b"x")
            thread.join(timeout=5)

    def _sweep(self) -> None:
        """Forget calls whose caller died meanwhile. A call is never given up on while its
        caller waits: the master answers every question on a live connection, and when the
        connection goes the node kills every process it holds (bproc), waiting ones too,
        so a fork never fails for a master that was only slow."""
        for table in (self._forks, self._kills, self._execs, self._watches):
            for seq, (job, n, *_rest) in list(table.items()):
                if not seccomp.still_waiting(job.listener, n.id):
                    del table[seq]

    def add_job(self, session: Session, mid: int, leader: int, listener: int,
                keeper: int | None, ppid: int | None, pgid: int | None,
                sid: int | None) -> None:
        job = Job(session, mid, leader, listener, keeper, ppid, pgid, sid)
        self.jobs[leader] = job
        if self._nursery is None:
            os.close(listener)
            return
        self._by_fd[listener] = job
        self._epoll.register(listener, 0)
        # Two receivers: one is always waiting in the kernel while the other hands its call
        # to trio (it needs the GIL for that, which may take a moment).
        job.threads = [threading.Thread(target=self._receive, args=(job,),
                                        name=f"job-{leader}-{k}", daemon=True) for k in (0, 1)]
        for t in job.threads:
            t.start()

    def answered(self, msg: messages.Forked | messages.Killed | messages.Execd) -> None:
        """The master's answer to a `fork`, `kill` or `exec`: finish that call (a late or
        unknown answer is dropped; a ghost made for a fork given up on is undone). Never
        raises: whatever goes wrong with one call is that call's (the session goes on)."""
        try:
            self._answered(msg)
        except OSError as exc:
            log.warning("answering a %s: %s", messages.tag(type(msg)), exc)

    def _answered(self, msg: messages.Forked | messages.Killed | messages.Execd) -> None:
        if isinstance(msg, messages.Forked):
            fork = self._forks.pop(msg.seq, None)
            if fork is not None:
                self._forked(fork[0], fork[1], fork[2], msg)
            elif msg.pid is not None and msg.id is not None:
                for job in self.jobs.values():
                    job.session.report(messages.Unforked(pid=msg.pid, id=msg.id))
                    break
            return
        if isinstance(msg, messages.Execd):
            ex = self._execs.pop(msg.seq, None)
            if ex is not None:
                if not msg.errno:
                    self.armed.discard(ex[2])
                seccomp.answer(ex[0].listener, ex[1].id, err=msg.errno or LAUNCHED)
            return
        watch = self._watches.pop(msg.seq, None)
        if watch is not None:
            self._watched(*watch, msg.errno)
            return
        kill = self._kills.pop(msg.seq, None)
        if kill is not None:
            seccomp.answer(kill[0].listener, kill[1].id, err=msg.errno or 0)

    def next_seq(self) -> int:
        """A sequence number no call of ours waits on (a stand-in's `kill`: its `killed`
        finds nothing to finish)."""
        return next(self._seq)

    def arm(self, pid: int) -> None:
        """The master took an execmove of `pid` (`armed`): its next execve goes there."""
        if len(self.armed) < MAX_ARMED:
            self.armed.add(pid)

    def ended(self, pid: int, status: int) -> None:
        """`pid` elsewhere has ended (`ended`): answer its stand-in's wait, end its pidfd
        proxies."""
        self.proxies.ended(pid)
        waiting = self._waiting.pop(pid, None)
        if waiting is not None and seccomp.answer(waiting[0].listener, waiting[1].id,
                                                  val=status):
            return
        if len(self._ends) < MAX_ARMED:
            self._ends[pid] = status

    def _receive(self, job: Job) -> None:
        """A job's receiver thread: takes each call off its listener the moment it stops.

        Why: until a call is received its caller may be interrupted by any signal, and an
        interrupted fork fails with EINTR (a shell's SIGCHLD from the child it forked just
        before: "Cannot fork"); once received, only a fatal signal may interrupt it
        (SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV). The receive is a blocking ioctl made
        without the GIL (seccomp.recv_blocking), so the kernel completes it at once,
        however busy the event loop is; the answers are made in trio's thread
        (`_dispatch`). The watcher thread wakes it (SIGUSR2) once the job has ended."""
        while not job.done:
            try:
                n = seccomp.recv_blocking(job.listener)
            except InterruptedError:
                continue
            except OSError as exc:
                log.error("job %d: its listener failed: %s", job.leader, exc)
                break
            if n is not None:
                self._post(self._dispatch, job, n)
        with self._lock:
            job.receivers -= 1
            last = job.receivers == 0
        if last:                                # the listener is closed once nobody waits
            self._post(self._job_over, job)     # on it: its number may be reused

    def _watch_listeners(self) -> None:
        """The watcher thread: a job's listener hangs up once every process of the job has
        ended (each is registered for no event: only EPOLLHUP/EPOLLERR come)."""
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except OSError:
                return
            for fd, _mask in events:
                if fd == self._wake_r:
                    return
                job = self._by_fd.pop(fd, None)
                if job is None:
                    continue
                self._epoll.unregister(fd)
                job.done = True
                for t in job.threads:
                    if t.ident is not None and t.is_alive():
                        try:
                            signal.pthread_kill(t.ident, WAKE_SIGNAL)
                        except (ProcessLookupError, OSError):
                            pass

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)    # type: ignore[union-attr]
        except trio.RunFinishedError:
            pass

    def _job_over(self, job: Job) -> None:
        if self.jobs.get(job.leader) is job:    # not a new job of the same PID (moved back)
            del self.jobs[job.leader]
        fd, job.listener = job.listener, -1     # answers still on their way find nobody
        if fd >= 0:
            os.close(fd)

    def _dispatch(self, job: Job, n: seccomp.Notif) -> None:
        handler = HANDLERS.get(n.nr)
        try:
            if handler is None:
                seccomp.answer(job.listener, n.id, cont=True)
            else:
                handler(self, job, n)
        except OSError as exc:      # the caller died meanwhile, most likely
            log.debug("pid %d: %s: %s", n.pid, n.name, exc)
            seccomp.answer(job.listener, n.id, err=errno.EAGAIN)

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _go(self, job: Job, n: seccomp.Notif) -> None:
        seccomp.answer(job.listener, n.id, cont=True)

    # ---- fork ----

    def _on_clone(self, job: Job, n: seccomp.Notif) -> None:
        flags = n.args[0] if n.nr == NR["clone"] else procread.clone3_flags(n)
        if flags is None or flags & seccomp.CLONE_THREAD:
            self.settle()
            self._go(job, n)        # a thread: numbered above park_at by the kernel
        else:
            self._on_fork(job, n)

    def _on_fork(self, job: Job, n: seccomp.Notif) -> None:
        parent = procread.tgid(n.pid)
        if parent is None:          # the caller is gone
            return
        seq = next(self._seq)
        self._forks[seq] = (job, n, parent)
        job.session.report(messages.Fork(seq=seq, parent=parent))

    def _forked(self, job: Job, n: seccomp.Notif, parent: int,
                reply: messages.Forked) -> None:
        """The master's answer: let the fork happen with its PID (or fail with its errno)."""
        if reply.pid is None or reply.id is None:
            seccomp.answer(job.listener, n.id, err=reply.errno or errno.EAGAIN)
            return
        pid, mid = reply.pid, reply.id
        if procread.exists(pid) or not seccomp.still_waiting(job.listener, n.id):
            if procread.exists(pid):
                log.warning("the master's PID %d is taken on this node: fork refused", pid)
            seccomp.answer(job.listener, n.id, err=errno.EAGAIN)
            job.session.report(messages.Unforked(pid=pid, id=mid))
            return
        if not self._directed(job, n, pid):
            job.session.report(messages.Unforked(pid=pid, id=mid))
            return
        child = Child(pid, mid, -1, job)
        self.children[pid] = child
        self.on_child(child)            # the master's signals for it reach it from now on
        self._start(self._watch, child, parent)

    def _directed(self, job: Job, n: seccomp.Notif, pid: int) -> bool:
        """Let the fork run with the counter just below `pid`; False if its caller is gone.
        The counter is parked again once the kernel has taken the number (`settle`)."""
        self.settle()
        procread.write_last(pid - 1)
        if not seccomp.answer(job.listener, n.id, cont=True):
            procread.write_last(self._parked)
            return False
        self._pending = pid
        return True

    def settle(self) -> None:
        """Before anything else may take a PID here: the last directed fork has taken its
        number (spin for it if not yet, at most TAKE_TIMEOUT), and the counter is parked.

        Why not at once after CONTINUE: the forking process must run to take its number,
        and on a busy node waiting for that in the answer's path cost more than the rest
        of the node's part of a fork; the child's watcher settles as soon as it runs, and
        whatever else numbers a process here (a thread's clone, a restore) settles first."""
        pid, self._pending = self._pending, None
        if pid is None:
            return
        deadline = time.perf_counter() + TAKE_TIMEOUT
        while procread.read_last() == pid - 1 and time.perf_counter() < deadline:
            os.sched_yield()
        procread.write_last(self._parked)

    async def _watch(self, child: Child, parent: int) -> None:
        """The child's number taken and checked, then its end and its reaping: tell the
        master (its ghost goes if the fork did not happen as asked)."""
        pid = child.pid
        for _ in range(50):
            if self._pending != pid or procread.read_last() != pid - 1:
                break
            await trio.sleep(0)
        if self._pending == pid:
            self.settle()
        try:
            child.pidfd = seccomp.pidfd_open(pid)
        except OSError:           # the fork failed, or the child has come and gone already
            child.pidfd = -1
        ppid = procread.ppid(pid) if child.pidfd >= 0 else None
        # None: reaped since the open; 1: its parent has ended and we adopted it
        if child.pidfd < 0 or ppid not in (parent, None, 1):
            self.children.pop(pid, None)
            self.on_end(pid)
            if child.pidfd >= 0:
                os.close(child.pidfd)
                log.warning("fork of %d: PID %d is not its child; it has no ghost", parent,
                            pid)
            child.job.session.report(messages.Unforked(pid=pid, id=child.id))
            return
        try:
            await trio.lowlevel.wait_readable(child.pidfd)
            delay = REAP_POLL[0]
            while (status := seccomp.exit_status(child.pidfd)) is None:
                await trio.sleep(delay)           # a zombie: its parent reaps it soon
                delay = min(delay * 2, REAP_POLL[1])
        finally:
            self.children.pop(pid, None)
            trio.lowlevel.notify_closing(child.pidfd)
            os.close(child.pidfd)
            self.on_end(pid)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        child.job.session.report(messages.Exited(pid=pid, code=code, signal=sig, id=child.id))

    # ---- exec ----

    def _on_exec(self, job: Job, n: seccomp.Notif) -> None:
        pid = procread.tgid(n.pid)
        if pid is not None and pid in self.armed:
            return self._exec_elsewhere(job, n, pid)
        before = procread.cmdline(pid) if pid is not None else b""
        self._go(job, n)
        if pid is not None and (pid in self.children or pid in self.jobs):
            self._start(self._execed, job, pid, before)

    async def _execed(self, job: Job, pid: int, before: bytes) -> None:
        for delay in EXEC_CHECKS:
            await trio.sleep(delay)
            now = procread.cmdline(pid)
            if not now or procread.state(pid) in (None, "Z"):
                return              # gone, or ended: its ghost ends too, unrenamed
            if now != before:
                child = self.children.get(pid)
                if child is not None:
                    child.cmdline = now
                    mid = child.id
                else:
                    mid = job.id
                job.session.report(messages.Execed(pid=pid, id=mid, cmdline=now))
                return

    # ---- parentage ----

    def _on_getppid(self, job: Job, n: seccomp.Notif) -> None:
        tgid = procread.tgid(n.pid)
        lead = self.jobs.get(tgid) if tgid is not None else None
        if lead is not None and lead.ppid is not None and procread.ppid(tgid) == lead.keeper:
            seccomp.answer(job.listener, n.id, val=lead.ppid)
        else:
            self._go(job, n)

    def _exec_elsewhere(self, job: Job, n: seccomp.Notif, pid: int) -> None:
        """An armed process's execve: the master runs it in its ghost and migrates it; the
        answer (0, or the execve's errno) waits for the master's `execd`."""
        try:
            words = procread.exec_args(n)
            cwd = os.readlink(f"/proc/{pid}/cwd").encode()
        except OSError as exc:
            seccomp.answer(job.listener, n.id, err=exc.errno or errno.EFAULT)
            return
        if words is None:
            seccomp.answer(job.listener, n.id, err=errno.E2BIG)
            return
        path, argv, envp = words
        seq = next(self._seq)
        self._execs[seq] = (job, n, pid)
        job.session.report(messages.Exec(seq=seq, pid=pid, path=path, argv=argv, envp=envp,
                                         cwd=cwd))

    def _stand_in_waits(self, job: Job, n: seccomp.Notif, pid: int) -> None:
        """A stand-in asks how its program ended (bpfs/standin.py): now, or once known."""
        status = self._ends.pop(pid, None)
        if status is not None:
            seccomp.answer(job.listener, n.id, val=status)
        else:
            self._waiting[pid] = (job, n)

    def _on_getpgid(self, job: Job, n: seccomp.Notif) -> None:
        if n.nr == NR["getpgid"] and procread.pid_arg(n.args[0]) == WAIT_ARG:
            pid = procread.tgid(n.pid)
            if pid is not None:
                return self._stand_in_waits(job, n, pid)
        target = procread.pid_arg(n.args[0]) if n.nr == NR["getpgid"] else 0
        self._translate(job, n, os.getpgid, target, self._group_of)

    def _on_getsid(self, job: Job, n: seccomp.Notif) -> None:
        self._translate(job, n, os.getsid, procread.pid_arg(n.args[0]), self._session_of)

    def _translate(self, job: Job, n: seccomp.Notif, get: Callable[[int], int], target: int,
                   master: Callable[[int], int | None]) -> None:
        if target < 0:
            return self._go(job, n)
        try:
            local = get(target or n.pid)
        except OSError:
            return self._go(job, n)         # the kernel says ESRCH itself
        value = master(local)
        if value is None:
            self._go(job, n)
        else:
            seccomp.answer(job.listener, n.id, val=value)

    def _group_of(self, pgid: int) -> int | None:
        """The master's group for a job leader's own group on the node."""
        job = self.jobs.get(pgid)
        return job.pgid if job is not None and job.pgid is not None else None

    def _session_of(self, sid: int) -> int | None:
        """The master's session for a keeper's session on the node."""
        for job in self.jobs.values():
            if job.keeper == sid and job.sid is not None:
                return job.sid
        return None

    def _on_setpgid(self, job: Job, n: seccomp.Notif) -> None:
        """setpgid to the master's number of a job's group (what getpgid told): the job's
        group here, which the process may only already be in."""
        pgid = procread.pid_arg(n.args[1])
        other = next((j for j in self.jobs.values()
                      if pgid > 0 and j.pgid == pgid and j.leader != pgid), None)
        if other is None:
            self._go(job, n)
            return
        try:
            now_in = os.getpgid(procread.pid_arg(n.args[0]) or n.pid)
        except OSError:
            seccomp.answer(job.listener, n.id, err=errno.ESRCH)
            return
        seccomp.answer(job.listener, n.id, err=0 if now_in == other.leader else errno.EPERM)

    # ---- signals ----

    def _on_kill(self, job: Job, n: seccomp.Notif) -> None:
        pid, sig = procread.pid_arg(n.args[0]), int(n.args[1]) & 0xFFFFFFFF
        if n.nr in (NR["tgkill"], NR["rt_tgsigqueueinfo"]):
            pid, sig = procread.pid_arg(n.args[1]), int(n.args[2]) & 0xFFFFFFFF
        if pid in (0, -1) or procread.here(pid) or (pid < -1 and procread.group_here(-pid)):
            self._go(job, n)        # on this node: the kernel checks and delivers
            return
        creds = procread.uids(n.pid)
        if creds is None:
            return                  # the caller is gone
        seq = next(self._seq)
        self._kills[seq] = (job, n)
        job.session.report(messages.Kill(seq=seq, pid=pid, sig=sig, ruid=creds[0],
                                         euid=creds[1]))



HANDLERS: dict[int, Callable[[Supervisor, Job, seccomp.Notif], None]] = {
    NR["clone"]: Supervisor._on_clone, NR["clone3"]: Supervisor._on_clone,
    NR["fork"]: Supervisor._on_fork, NR["vfork"]: Supervisor._on_fork,
    NR["execve"]: Supervisor._on_exec, NR["execveat"]: Supervisor._on_exec,
    NR["getppid"]: Supervisor._on_getppid,
    NR["getpgid"]: Supervisor._on_getpgid, NR["getpgrp"]: Supervisor._on_getpgid,
    NR["getsid"]: Supervisor._on_getsid, NR["setpgid"]: Supervisor._on_setpgid,
    **{NR[k]: Supervisor._on_kill for k in ("kill", "tkill", "tgkill", "rt_sigqueueinfo",
                                             "rt_tgsigqueueinfo")},
    NR["pidfd_open"]: Supervisor._on_pidfd_open,
}

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
  Only one directed fork is ever in flight (the counter's lock). A process that forks in
  a burst has a spare PID from the master ahead of its next fork, taken in the receiver
  thread with no round trip (bpfs/node/spares.py).
- **execve**: let through; a moment later, if the command line changed, the ghost takes it
  (`execed`; bpfs/node/execnames.py, one task for all).
- the child's **end**: a pidfd per child, opened as soon as the child exists (the answer
  waits a moment for it); once the child has been reaped on the node (by its parent, or
  by us as PID 1 for orphans) the pidfd hangs up (the watcher thread's epoll, which also
  watches the listeners), and its wait status goes to the master (`exited`), which ends
  the ghost the same way and has the ghost's parent reap it.
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
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from bpfs.migrate import seccomp
from bpfs.migrate.seccomp import SYSCALLS as NR
from bpfs.node import procread
from bpfs.node.adoption import TAKE_POLL, Adoption
from bpfs.node.execcalls import ExecCalls
from bpfs.node.execnames import ExecNames
from bpfs.node.oneshot import OneShot
from bpfs.node.groups import GroupCalls
from bpfs.node.pidcounter import Counter
from bpfs.node.pidproxy import PidfdCalls, Proxies
from bpfs.node.session import Session
from bpfs.node.spares import Spares
from bpfs.standin import LAUNCHED
from bpfs.wire import messages

log = logging.getLogger("bpslave")

PID_MAX_LIMIT = 1 << 22
MAX_ARMED = 4096             # launches from this node waiting for their exec or end
WAKE_SIGNAL = signal.SIGUSR2  # ends a receiver's wait once its job is over
SWEEP = 5.0                  # forget calls whose caller died while the master answered


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
    cmdline: bytes | None = None      # what the leader's ghost shows (None: not read yet)
    threads: list[threading.Thread] = field(default_factory=list)   # its receivers
    receivers: int = 2


@dataclass(eq=False)
class Child:
    """A process forked on this node: its ghost is `pid` on the master too."""
    pid: int
    id: int
    pidfd: int
    job: Job
    parent: int = 0                   # its parent's pid, here (and its ghost's parent's)
    cmdline: bytes | None = None      # what its ghost shows: its parent's at the fork


class Supervisor(PidfdCalls, GroupCalls, ExecCalls, Adoption, Spares):
    """The jobs' listeners and the children forked under them (one per node daemon)."""

    _child_class = Child

    def __init__(self, park_at: int, on_child: Callable[[Child], None] | None = None,
                 on_end: Callable[[int], None] | None = None) -> None:
        self.jobs: dict[int, Job] = {}          # by leader
        self.children: dict[int, Child] = {}    # by pid
        hold = on_child or (lambda c: None)

        def on_child_made(child: Child) -> None:    # (any thread) every path that makes one
            child.cmdline = self._shown(child.parent)
            hold(child)
        self.on_child = on_child_made
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
        self._token: trio.lowlevel.TrioToken | None = None
        self._epoll = select.epoll()            # the listeners (the receiver thread's)
        self._by_fd: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._pidfds: dict[int, Child] = {}     # the children's pidfds, in that epoll too
        self._unadopted: list[tuple[Child, Any, int]] = []   # forked, not there yet
        self._adopt_timer = OneShot()           # a look for those, when due
        self._epoll.register(self._adopt_timer.fd, select.EPOLLIN)
        self.names = ExecNames(self._renamed)
        self.counter = Counter(park_at, self._asking)
        Spares.__init__(self)

    # ---- the counter (bpfs/node/pidcounter.py) ----

    def park(self, at: int) -> None:
        """Point the namespace's counter above every cluster PID, `at` (the master's
        pid_max) and up (see the docstring)."""
        self.counter.park_at = at
        self.counter.park()

    def settle(self) -> None:
        """Before anything else may take a PID here: the last directed fork has settled
        and the counter is parked."""
        self.counter.settle()

    def _asking(self, tid: int) -> bool:
        """(Any thread) `tid` waits for the master's answer to a fork: a fork of its
        that was let through did not happen (a signal restarted it)."""
        return any(n.pid == tid for _job, n, _parent in list(self._forks.values()))

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
                nursery.start_soon(self.names.run)
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
        self.give_back_idle()

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
        however busy the event loop is. A fork is asked of the master, and an execve let
        through, from here (`HERE`: no trip through the event loop on a fork's path);
        the other answers are made in trio's thread (`_dispatch`). The watcher thread
        wakes it (SIGUSR2) once the job has ended."""
        while not job.done:
            try:
                n = seccomp.recv_blocking(job.listener)
            except InterruptedError:
                continue
            except OSError as exc:
                log.error("job %d: its listener failed: %s", job.leader, exc)
                break
            if n is not None and not self._here(job, n):
                self._post(self._dispatch, job, n)
        with self._lock:
            job.receivers -= 1
            last = job.receivers == 0
        if last:                                # the listener is closed once nobody waits
            self._post(self._job_over, job)     # on it: its number may be reused

    def _watch_listeners(self) -> None:
        """The watcher thread: a job's listener hangs up once every process of the job has
        ended, a child's pidfd once the child has been reaped (each is registered for no
        event: only EPOLLHUP/EPOLLERR come). The ends of the children reaped are told to
        the master from here (`_ended`): no wake-up of the event loop for them. While
        some forked children are not there yet, it looks for them every TAKE_POLL
        (`look_for`, when the timer says so)."""
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except OSError:
                return
            reaped = []
            looking = False
            for fd, _mask in events:
                if fd == self._wake_r:
                    return
                if fd == self._adopt_timer.fd:
                    self._adopt_timer.drain()
                    looking = True
                    continue
                child = self._pidfds.pop(fd, None)
                if child is not None:
                    self._epoll.unregister(fd)
                    reaped.append((child, seccomp.exit_status(fd)))
                    continue
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
            try:
                if reaped:
                    self._ended(reaped)
                if self._unadopted and (looking or reaped):
                    self.look_for()
                if looking:
                    with self._lock:
                        if self._unadopted:
                            self._adopt_timer.arm(TAKE_POLL)
            except Exception:   # noqa: BLE001 - the watcher must go on
                log.exception("the watcher thread")

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)    # type: ignore[union-attr]
        except trio.RunFinishedError:
            pass

    def _job_over(self, job: Job) -> None:
        if self.jobs.get(job.leader) is job:    # not a new job of the same PID (moved back)
            del self.jobs[job.leader]
            self.give_back(job.leader)
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

    def _here(self, job: Job, n: seccomp.Notif) -> bool:
        """(A receiver thread) answer `n` here if it is one of HERE's; False: trio's."""
        handler = HERE.get(n.nr)
        try:
            return handler is not None and handler(self, job, n)
        except OSError as exc:      # the caller died meanwhile, most likely
            log.debug("pid %d: %s: %s", n.pid, n.name, exc)
            seccomp.answer(job.listener, n.id, err=errno.EAGAIN)
            return True

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _go(self, job: Job, n: seccomp.Notif) -> None:
        seccomp.answer(job.listener, n.id, cont=True)

    # ---- fork ----

    def _on_clone(self, job: Job, n: seccomp.Notif) -> None:
        flags = n.args[0] if n.nr == NR["clone"] else procread.clone3_flags(n)
        if flags is None or flags & seccomp.CLONE_THREAD:
            # a thread: numbered above the parked counter by the kernel; pending like a
            # directed fork (the next one waits until it is numbered, or its caller is out
            # of the clone), since a spare may be directed from a receiver thread
            self.counter.direct(self.counter.parked + 1, n.pid, n.nr,
                                lambda: seccomp.answer(job.listener, n.id, cont=True))
        else:
            self._on_fork(job, n)

    def _tgid(self, tid: int) -> int | None:
        """The caller's process: the calling thread itself when it is a process we hold
        (no /proc read on a fork's or an exec's path)."""
        if tid in self.children or tid in self.jobs:
            return tid
        return procread.tgid(tid)

    def _fork_here(self, job: Job, n: seccomp.Notif) -> bool:
        """(A receiver thread) a new process is asked of the master from here; a thread's
        clone is trio's (it settles the counter first)."""
        if n.nr in (NR["clone"], NR["clone3"]):
            flags = n.args[0] if n.nr == NR["clone"] else procread.clone3_flags(n)
            if flags is None or flags & seccomp.CLONE_THREAD:
                return False
        self._on_fork(job, n, self._post)
        return True

    def _on_fork(self, job: Job, n: seccomp.Notif,
                 post: Callable[..., None] | None = None) -> None:
        """Ask the master for the child's PID; `post`: from a receiver thread."""
        parent = self._tgid(n.pid)
        if parent is None:          # the caller is gone
            return
        self.forked_again(parent)
        if post is not None and self.take_spare(job, n, parent):
            return                  # no round trip (bpfs/node/spares.py)
        self._ask(job, n, parent, post)

    def _ask(self, job: Job, n: seccomp.Notif, parent: int,
             post: Callable[..., None] | None = None) -> None:
        seq = next(self._seq)
        self._forks[seq] = (job, n, parent)
        msg = messages.Fork(seq=seq, parent=parent)
        if post is None:
            job.session.report(msg)
        else:
            job.session.report_threadsafe(msg, post)

    def _forked(self, job: Job, n: seccomp.Notif, parent: int,
                reply: messages.Forked) -> None:
        """The master's answer: let the fork happen with its PID (or fail with its errno)."""
        if reply.pid is None or reply.id is None:
            seccomp.answer(job.listener, n.id, err=reply.errno or errno.EAGAIN)
            return
        pid, mid = reply.pid, reply.id
        taken = procread.exists(pid)
        if taken or not seccomp.still_waiting(job.listener, n.id):
            if taken:
                log.warning("the master's PID %d is taken on this node: fork refused", pid)
            seccomp.answer(job.listener, n.id, err=errno.EAGAIN)
            job.session.report(messages.Unforked(pid=pid, id=mid))
            return
        # recorded before it may run: its execve may come at once (`_exec_here`)
        child = Child(pid, mid, -1, job, parent)
        self.children[pid] = child
        self.on_child(child)            # the master's signals for it reach it from now on
        # the counter just below `pid` for this fork; parked again once it has settled
        if not self.counter.direct(pid, n.pid, n.nr,
                                   lambda: seccomp.answer(job.listener, n.id, cont=True)):
            self._not_forked(child)
            return
        self.adopt_soon(child)

    # ---- signals ----

    def _kill_here(self, job: Job, n: seccomp.Notif) -> bool:
        """(A receiver thread) a signal is let through or asked of the master from here:
        a kill's latency is one trip through the event loop less."""
        self._on_kill(job, n, self._post)
        return True

    def _on_kill(self, job: Job, n: seccomp.Notif,
                 post: Callable[..., None] | None = None) -> None:
        """A target on this node: the kernel's; else the master's (`post`: from a
        receiver thread)."""
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
        msg = messages.Kill(seq=seq, pid=pid, sig=sig, ruid=creds[0], euid=creds[1])
        if post is None:
            job.session.report(msg)
        else:
            job.session.report_threadsafe(msg, post)


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
# answered in a receiver thread (`_here`): True if done, False to hand it to HANDLERS
HERE: dict[int, Callable[[Supervisor, Job, seccomp.Notif], bool]] = {
    NR["clone"]: Supervisor._fork_here, NR["clone3"]: Supervisor._fork_here,
    NR["fork"]: Supervisor._fork_here, NR["vfork"]: Supervisor._fork_here,
    NR["execve"]: Supervisor._exec_here, NR["execveat"]: Supervisor._exec_here,
    **{NR[k]: Supervisor._kill_here for k in ("kill", "tkill", "tgkill", "rt_sigqueueinfo",
                                               "rt_tgsigqueueinfo")},
}

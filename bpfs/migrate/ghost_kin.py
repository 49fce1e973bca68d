"""A ghost's kin: what is done to a parked ghost halted for one step, to make or unmake
processes or to change what `ps` shows: its copies (`clone`, siblings: one dump, many ranks),
its children (`fork`: a process forked on a node), the reaping of an ended child (`reap`:
the real parent on the node reaped), a new name and command line (`rename`: an exec on
a node), and an exec in the ghost itself (`exec_in`: an exec whose program is to run on
another node; `capture` takes it from there). `Kin` is mixed into `bpfs.migrate.ghost.Ghosts`,
which supplies the tracees and their ends; it runs in the tracer thread. docs/ghosts.md
("Children", "An exec in a ghost") says why and how.
"""

from __future__ import annotations

import errno
import logging
import os
import signal as _signal
import threading
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from bpfs import procstatus
from bpfs.migrate import ghost_argv, ghost_exec, ghost_restore, ghost_stream
from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.image import Image
from bpfs.migrate.tracee import (GHOST, SEIZED, Future, Signals, Tracee, as_error, child_signal,
                                 resolve, send_kill, send_signal)

log = logging.getLogger("bpfs.migrate.ghost")

R = TypeVar("R")
WNOHANG = 1


@dataclass
class Halted:
    """A parked ghost halted for one step: where it slept, and what signals came meanwhile."""

    signals: Signals
    regs: pt.Regs | None = None
    gadget: int = 0
    made: list[int] = field(default_factory=list)  # the copies made, held from their birth


class Held(Signals):
    """The signals a restore suppressed in the ghost `t`: once it runs, they are its own
    (`for_process`), sent again; a child ghost's SIGCHLD too (it may wait for that child
    now). If the restore fails first, they are a ghost's, reported as any (the list)."""

    chld = False

    def append(self, sig: int) -> None:
        if sig == _signal.SIGCHLD and child_signal(self._t.pid, self._t):
            self.chld = True
            return
        super().append(sig)

    def for_process(self) -> list[int]:
        return [*self, *([_signal.SIGCHLD] if self.chld else [])]


class Kin:
    """clone, fork, reap, rename and exec_in of parked ghosts (see the module doc)."""

    tracees: dict[int, Tracee]
    park_rss: dict[int, tuple[int, int]]
    to_reap: set[int]   # ghosts to halt to reap their ended children (`reap_ended`)
    forks: dict[int, list[tuple[Future, bool]]]     # fork_soon's requests (Ghosts)
    building: dict[int, ghost_stream.Built]
    bell: int
    _lock: threading.Lock
    _parked: set[int]

    # supplied by Ghosts
    def gone(self, t: Tracee, status: int) -> None:
        raise NotImplementedError

    def fail(self, t: Tracee, what: str, exc: BaseException) -> None:
        raise NotImplementedError

    def forget(self, t: Tracee, status: int | None = None) -> None:
        raise NotImplementedError

    def _report(self, pid: int, signals: list[int]) -> None:
        raise NotImplementedError

    # ---- the operations ----

    def clone(self, fut: Future, pid: int, count: int) -> None:
        """`count` copies of the ghost `pid` (CLONE_PARENT: siblings, see `gp.copy`), made
        from it halted once; an entry is the new pid or -errno (docs/ghosts.md, "Clones").

        The copies are made first and parked afterwards: by then each has reached its first
        stop, so no wait for it to be scheduled. Each is held (in `tracees`) from its birth.
        """
        if count < 0:
            raise MigrateError(errno.EINVAL, f"cannot make {count} copies", pid)
        t = self._parked_ghost(pid, errno.EBUSY)
        h = Halted(Signals(t))
        pids: list[int] = []  # new pids and -errno, in order

        def copies(h: Halted) -> None:
            while len(pids) < count:
                before = len(h.made)
                try:
                    res = self._copy(t, h, gp.CLONE_FLAGS)
                finally:
                    pids.extend(h.made[before:])
                if res < 0:
                    pids.append(res)
        err = 0
        rss = self.park_rss.get(pid)
        try:
            self._halted(t, "clone", copies, h)
        except MigrateError as exc:
            err = exc.errno
        finally:
            self._adopt_all(h, rss)
        fut.set_result(pids + [-err] * (count - len(pids)))

    def fork(self, fut: Future, pid: int, reaped: bool = False, halt: bool = True,
             reap: bool = False) -> None:
        """A child of the ghost `pid` (fork(2) injected): its pid. ESRCH if `pid` is not a
        parked ghost of ours or ends meanwhile; the clone's errno (EAGAIN) otherwise.
        A child made when the step then fails is killed: nobody would know of it.
        `reaped` (a process forked on a node, whose real parent reaps it there): `pid`
        reaps the child itself once it has ended, whatever ended it (`reap_at_stop`); and
        `fut` resolves as soon as clone returned, before the parent and the child are put
        to sleep (a node waits for the answer; should that then fail, the child is killed:
        its `on_exit` follows as for any ghost). `halt` False: `pid` is in a signal's
        delivery stop already (`Tracer.fork_soon`); `reap`: its ended children that it
        reaps itself are reaped in the same halt (`_halted`)."""
        t = self._parked_ghost(pid, errno.ESRCH)
        h = Halted(Signals(t))
        rss = self.park_rss.get(pid)

        def step(h: Halted) -> int:
            res = self._copy(t, h, gp.FORK_FLAGS)
            if reaped and res > 0 and res in self.tracees:
                t.reaps.add(res)
                with self._lock:    # a parked ghost to whoever asks from now on (the
                    self._parked.add(res)   # node's child may act at once): any step
                fut.set_result(res)         # of it is queued behind its parking
            return res
        try:
            res = self._halted(t, "fork", step, h, halt=halt, reap=reap)
        except BaseException:
            for child in h.made:
                self._disown(child)
            raise
        self._adopt_all(h, rss)
        if res < 0:
            raise MigrateError(-res, f"fork of ghost {pid}: {os.strerror(-res)}", pid)
        resolve(fut, res)

    def reap(self, fut: Future, pid: int, child: int, known: int | None = None) -> None:
        """The ghost `pid` reaps its ended child ghost `child` (wait4 injected): the child's
        wait status, as the tracer consumed it at its end (a ghost has no memory to spare
        for wait4 to write it in; the kernel's is the same), or `known` for a child that
        ran here untraced (restored into its ghost: the caller read its zombie's status).
        ESRCH: `pid` is no parked ghost; ECHILD: `child` is not its child (or was reaped);
        EBUSY: `child` has not ended."""
        t = self._parked_ghost(pid, errno.ESRCH)
        if child not in t.children:
            raise MigrateError(errno.ECHILD, f"process {child} is no child of ghost {pid}",
                               pid)
        status = t.children[child]
        if status is None and known is not None and child not in self.tracees:
            status = known
        if status is None:
            raise MigrateError(errno.EBUSY, f"child ghost {child} has not ended", pid)
        got = self._halted(t, "reap", lambda h: gp.inject(
            t.pid, h.regs, h.gadget, h.signals, pt.SYS["wait4"], child, 0,
            WNOHANG | pt.WALL, 0))
        if got in (child, -errno.ECHILD):  # ECHILD: the kernel reaped it (SIGCHLD ignored)
            self._reaped(t, child)
        if got != child:
            err = -got if got < 0 else errno.EBUSY
            raise MigrateError(err, f"ghost {pid} reaping {child}: {os.strerror(err)}", pid)
        fut.set_result(status)

    def reap_at_stop(self, t: Tracee) -> None:
        """The parked ghost `t`, in the delivery stop of a SIGCHLD for one of its children,
        reaps those it reaps itself that have ended (`t.ended`), in this stop: no halt.
        (The kernel sends the SIGCHLD when the tracer consumes the child's end, so by
        then `unlink` has listed it.) A ghost in a job-control stop, or with one of ours
        on its way, is halted for it later instead (`reap_ended`): in this stop the signal
        is only suppressed."""
        if t.stopped or t.stopping or t.stop_sent or t.cont_sent:
            self.to_reap.add(t.pid)
            pt.cont(t.pid, 0)
            return
        fork = self.take_fork(t.pid)
        if fork is not None:    # a fork_soon whose STEP_SIGNAL has not come yet: made in
            fut, reaped = fork  # this stop too (that signal, when it comes, finds none)
            try:
                self.fork(fut, t.pid, reaped, halt=False, reap=True)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                resolve(fut, exc=as_error(exc, "fork", t.pid))
            return
        try:
            self._halted(t, "reap", lambda h: None, halt=False, reap=True)
        except MigrateError as exc:
            log.info("tracer: ghost %d reaping its children: %s", t.pid, exc)

    def take_fork(self, pid: int) -> tuple[Future, bool] | None:
        """The first fork_soon request waiting for `pid` (taken), or None."""
        with self._lock:
            waiting = self.forks.get(pid)
            return waiting.pop(0) if waiting else None

    def reap_ended(self) -> None:
        """Each ghost of `to_reap` reaps its ended children in one halt (those whose
        SIGCHLD stop could not: see `reap_at_stop`). A ghost that is no parked ghost any
        more (ended, being finished) leaves them to whoever inherits them."""
        while self.to_reap:
            t = self.tracees.get(self.to_reap.pop())
            if t is None or t.state != GHOST or t.killed or not t.ended:
                continue
            try:
                self._halted(t, "reap", lambda h: None, reap=True)
            except MigrateError as exc:
                log.info("tracer: ghost %d reaping its children: %s", t.pid, exc)

    def _reap_ended(self, t: Tracee, h: Halted) -> None:
        """The halted `t` reaps its ended children (`t.ended`): wait4 of each, WNOHANG."""
        ended, t.ended = t.ended, []
        for child in ended:
            got = gp.inject(t.pid, h.regs, h.gadget, h.signals, pt.SYS["wait4"], child, 0,
                            WNOHANG | pt.WALL, 0)
            if got in (child, -errno.ECHILD):
                self._reaped(t, child)
            else:
                log.info("tracer: ghost %d reaping its child %d: %s", t.pid, child,
                         os.strerror(-got) if got < 0 else "not ended")

    def _reaped(self, t: Tracee, child: int) -> None:
        t.children.pop(child, None)
        t.reaps.discard(child)
        t.lately.append(child)

    def rename(self, fut: Future, pid: int, argv: list[bytes]) -> None:
        """The ghost `pid` takes the name and command line of `argv` (`ghost_argv`).
        EINVAL for a bad argv (before the ghost is touched), ESRCH as for `fork`."""
        ghost_argv.encode(argv)
        t = self._parked_ghost(pid, errno.ESRCH)
        t.argv_map = self._halted(t, "rename", lambda h: ghost_argv.set_argv(
            t.pid, h.regs, h.gadget, h.signals, argv, t.argv_map))
        fut.set_result(None)

    def exec_in(self, fut: Future, pid: int, path: bytes, argv: list[bytes],
                envp: list[bytes], cwd: bytes) -> None:
        """The ghost `pid` execs `path` (`ghost_exec`): resolved once the exec took, the
        process then waits in its exec stop for `capture`, as a seized bpsh child does.
        EINVAL/E2BIG for bad arguments (before the ghost is touched); ESRCH as for `fork`;
        EBUSY for a ghost in a job-control stop or with one of ours on its way (the new
        program would get it); execve's errno (the ghost asleep as before, its cwd too)."""
        req = ghost_exec.check(path, argv, envp, cwd)
        t = self._parked_ghost(pid, errno.ESRCH)
        if t.stopped or t.stopping or t.stop_sent or t.cont_sent:
            raise MigrateError(errno.EBUSY, f"ghost {pid} is in a job-control stop", pid)
        res = self._halted(t, "exec", lambda h: ghost_exec.exec_in(
            t.pid, h.regs, h.gadget, h.signals, req), stays=lambda res: res == 0)
        if res < 0:
            raise MigrateError(-res, f"exec of {path!r} in ghost {pid}: "
                                     f"{os.strerror(-res)}", pid)
        # a new program, stopped at its exec: what the ghost kept is gone with its memory
        t.state, t.at_exec, t.gadget, t.argv_map = SEIZED, True, 0, None
        self.park_rss.pop(pid, None)
        with self._lock:
            self._parked.discard(pid)
        fut.set_result(None)

    def restore_in(self, fut: Future, pid: int, image: Image, fds: object,
                   close_others: bool = False) -> None:
        """The parked ghost `pid` becomes the image's process, running here, detached and
        forgotten (`ghost_restore`; docs/ghosts.md, "Back into the ghost"). Checks first
        (the ghost untouched); a failure before the point of no return puts it back to
        sleep, a ghost as before; after it, the process is killed and `fut` fails once
        it is gone. ESRCH as for `fork`; EBUSY in a job-control stop (as `exec_in`)."""
        t = self._parked_ghost(pid, errno.ESRCH)
        if t.stopped or t.stopping or t.stop_sent or t.cont_sent:
            raise MigrateError(errno.EBUSY, f"ghost {pid} is in a job-control stop", pid)
        built = self.building.get(pid)
        if built is not None and built.image is not image:
            raise MigrateError(errno.EINVAL, f"another image streams into ghost {pid}", pid)
        plan = ghost_restore.prepare(pid, image, fds, close_others, files=built is None)
        self.building.pop(pid, None)
        h = Halted(Held(t))
        try:
            gp.halt(t.pid, h.signals)
            h.regs = pt.getregs(t.pid)
            h.gadget = t.gadget = gp.sleeping_gadget(t.pid, h.regs)
            moved = ghost_restore.restore_in(t.pid, h.regs, h.gadget, h.signals, plan, built)
            ghost_restore.go(t.pid, image, moved, h.signals.for_process())
        except gp.Gone as gone:
            self.gone(t, gone.status)
            raise MigrateError(errno.ESRCH, f"ghost {pid} ended during restore", pid) \
                from None
        except ghost_restore.PastReturn as exc:
            t.waiters.append(fut)
            self.fail(t, "restore", exc)
            return
        except Exception as exc:  # noqa: BLE001 - before the point of no return
            if built is not None and h.regs is not None:
                _unbuild(t.pid, h, built)     # the ghost as it was before the stream
            err = self._repark(t, h, "restore", exc)
            self._report(t.pid, h.signals)
            raise err from None
        finally:
            plan.close()
        log.debug("ghost %d restored from its image; running, detached", pid)
        parent = self.tracees.get(t.parent) if t.parent else None
        reaps = parent is not None and pid in parent.reaps
        self.forget(t)
        if parent is not None:      # still its child: its SIGCHLD is not a user's, and
            parent.children[pid] = None     # the parent ghost reaps it (`reap`, `known`)
            if reaps:               # and, should it be a ghost again (moved out), itself
                parent.reaps.add(pid)
        fut.set_result(None)

    # ---- one step on a halted ghost ----

    def _parked_ghost(self, pid: int, err: int) -> Tracee:
        t = self.tracees.get(pid)
        if t is None:
            raise MigrateError(errno.ESRCH, f"process {pid} is not held by the tracer", pid)
        if t.state != GHOST or t.killed:
            raise MigrateError(err, f"process {pid} is {t.state}, not a parked ghost", pid)
        return t

    def _halted(self, t: Tracee, what: str, step: Callable[[Halted], R],
                h: Halted | None = None, stays: Callable[[R], bool] = lambda out: False,
                halt: bool = True, reap: bool = False) -> R:
        """Halt the parked ghost `t` (unless `halt` is False: it is in a signal-delivery
        stop already), run `step` on it, put it back to sleep in pause() (unless
        `stays(out)`: it is left in the stop the step ended in, an exec's).

        The signals that came meanwhile are reported. A SIGCHLD for one of its children
        among them (or `reap`): it reaps those it reaps itself that have ended
        (`_reap_ended`), in the same halt. If `t` ends meanwhile: ESRCH (its end is handled as any). If a step
        fails otherwise, `t` is put back to sleep, or killed if even that fails
        (`_repark`), and the failure raised as a MigrateError.
        """
        h = h or Halted(Signals(t))
        try:
            if halt:
                gp.halt(t.pid, h.signals)
            h.regs = pt.getregs(t.pid)
            if h.regs.rip - t.gadget not in (0, 2):  # not where it slept last time
                t.gadget = gp.sleeping_gadget(t.pid, h.regs)
            h.gadget = t.gadget
            out = step(h)
            if not stays(out):
                if t.ended and (h.signals.chld or reap):
                    self._reap_ended(t, h)
                self._resume(t, h)
            return out
        except gp.Gone as gone:
            self.gone(t, gone.status)
            raise MigrateError(errno.ESRCH, f"ghost {t.pid} ended during {what}", t.pid) \
                from None
        except Exception as exc:  # noqa: BLE001 - whatever it was, the ghost goes on or ends
            raise self._repark(t, h, what, exc) from None
        finally:
            self._report(t.pid, h.signals)
            for sig in h.signals.again:
                send_signal(t.pid, sig)

    def _resume(self, t: Tracee, h: Halted) -> None:
        """Back to sleep in pause(); a ghost held in a job-control stop (`set_stopped`), or on
        its way into one, back into that stop (`gp.stop_again`)."""
        if t.stopped or t.stopping:
            t.stopped, t.stopping = gp.stop_again(t.pid, h.regs, h.gadget, h.signals), False
        else:
            gp.sleep_in_pause(t.pid, h.regs, h.gadget)

    def _repark(self, t: Tracee, h: Halted, what: str, exc: Exception) -> MigrateError:
        """A step on the halted ghost `t` failed (`exc`): put it back to sleep, a ghost as
        before; if that fails too (or it was not halted), `fail`.

        Returns the error for the caller: ESRCH if `t` was killed meanwhile (a dying
        process gives other errors too, e.g. ENOEXEC for its vanished vdso; then putting it
        back fails with ESRCH)."""
        err = as_error(exc, what, t.pid)
        if h.regs is not None and err.errno != errno.ESRCH:
            try:
                self._resume(t, h)
            except Exception as again:  # noqa: BLE001 - it cannot stay halted
                exc = again
            else:
                log.warning("tracer: %s of ghost %d: %s; parked again", what, t.pid, err)
                return err
        self.fail(t, what, exc)
        if isinstance(exc, MigrateError) and exc.errno == errno.ESRCH:
            return MigrateError(errno.ESRCH, f"ghost {t.pid} ended during {what}", t.pid)
        return err

    # ---- copies: clone and fork ----

    def _copy(self, t: Tracee, h: Halted, flags: int) -> int:
        """One copy of the halted `t` (`gp.copy`); the new pid, or -errno. Whatever
        happens, a child made is held at once (`h.made`)."""
        got: list[int] = []  # the new pid, once clone returned it
        try:
            return gp.copy(t.pid, h.regs, h.gadget, h.signals, got, flags)
        except Exception:
            if not got:  # killed before clone returned: the child may exist
                got.extend(self._strays())
            raise
        finally:
            for child in got:
                self._hold(child, t, flags)
            h.made.extend(got)

    def _hold(self, child: int, t: Tracee, flags: int) -> None:
        """The new `child` of `t` (fork) or of `t`'s parent (clone) is a tracee from now."""
        parent = t.parent if flags & gp.CLONE_PARENT else t.pid
        self.tracees[child] = Tracee(child, GHOST, parent=parent, gadget=t.gadget,
                                     argv_map=t.argv_map)
        if parent in self.tracees:
            self.tracees[parent].children[child] = None

    def _adopt_all(self, h: Halted, rss: tuple[int, int] | None) -> None:
        for child in h.made:
            if child in self.tracees:
                self._adopt(self.tracees[child], h, rss)

    def _adopt(self, c: Tracee, h: Halted, rss: tuple[int, int] | None) -> None:
        """Make the new `c`, made by a clone or fork, a ghost: consume its first stop, park
        it where its original sleeps (its registers are its original's: a fork).

        If it cannot be parked it is killed; if it ended already, its end is consumed: either
        way `on_exit` follows, as for any ghost. `rss` is the original's `park_rss` (the copy
        maps the same pages). Its ptrace options are its original's (inherited).
        """
        signals = Signals(c)
        try:
            # its attach stop, before it ran anything: an EVENT_STOP (the ghost was seized;
            # a SIGSTOP had it been PTRACE_TRACEME'd)
            sig, event = gp.stop_parts(gp.wait_stop(c.pid))
            if event == 0 and sig != _signal.SIGSTOP:
                signals.append(sig)
            gp.sleep_in_pause(c.pid, h.regs, h.gadget)
        except gp.Gone as gone:
            self.gone(c, gone.status)
            return
        except Exception as exc:  # noqa: BLE001 - it cannot stay in its first stop
            self.fail(c, "parking a copy", exc)
            return
        finally:
            self._report(c.pid, signals)
        if rss is not None:
            self.park_rss[c.pid] = rss
        with self._lock:
            self._parked.add(c.pid)

    def _disown(self, child: int) -> None:
        """A child made by a fork that then failed: killed, its end consumed as any, and
        not counted among its parent's children (no one will reap it: its zombie stays
        until the parent ghost ends)."""
        c = self.tracees.get(child)
        if c is None:
            return
        parent = self.tracees.get(c.parent)
        if parent is not None:
            parent.children.pop(child, None)
            parent.reaps.discard(child)
        c.parent, c.killed = 0, True
        send_kill(child)

    def _strays(self) -> list[int]:
        """Processes traced by this thread that it does not hold (a copy whose original was
        killed before clone returned, so its pid never came)."""
        me, out = threading.get_native_id(), []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in self.tracees or int(name) == self.bell:
                continue
            try:
                status = procstatus.read(int(name))
            except OSError:
                continue
            if status.get("TracerPid") == str(me):
                out.append(int(name))
        return out

    # ---- ends ----

    def unlink(self, t: Tracee, status: int | None) -> None:
        """`t` ended (`status`) or is no longer ours (None). Its parent ghost keeps its status
        until it reaps it (`reap`); its own children are orphans now: the kernel gave them
        to init or a subreaper, which reaps them; nothing more is asked of us."""
        parent = self.tracees.get(t.parent) if t.parent else None
        if parent is not None and t.pid in parent.children:
            if status is None:
                del parent.children[t.pid]
                parent.reaps.discard(t.pid)
            else:
                parent.children[t.pid] = status
                if t.pid in parent.reaps:       # its SIGCHLD is on its way: reaped then
                    parent.ended.append(t.pid)  # (`reap_at_stop`), or now if it cannot
                    if parent.stopped or parent.stopping or parent.stop_sent or \
                            parent.cont_sent:   # take it (a job-control stop)
                        self.to_reap.add(parent.pid)
        for child in t.children:
            c = self.tracees.get(child)
            if c is not None and c.parent == t.pid:
                c.parent = 0
        t.children = {}


def _unbuild(pid: int, h: Halted, built: ghost_stream.Built) -> None:
    """A streamed restore that failed before its point of no return: what the stream
    built goes too (a failure of that is logged: the ghost works as a ghost still)."""
    try:
        ghost_stream.unbuild(pid, h.regs, h.gadget, h.signals, built)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the restore's own failure goes up
        log.warning("tracer: undoing the stream into ghost %d: %s", pid, exc)

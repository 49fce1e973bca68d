"""A running master process that moves to a node: seized, stopped, dumped, then parked as
its own ghost, or let go exactly as it was (mixed into `Ghosts`; tracer thread).

    seize_running(pid, check[, stop])   PTRACE_SEIZE + PTRACE_INTERRUPT (and, with `stop`,
                                its stop waited for): a process that asked to move itself
                                stops where its ctl write returns
    stop_moving(pid)            its stop waited for (the master then copies its stdio for a
                                relay while the dump goes on)
    dump_moving(pid, links, lazy)  once it is stopped: its Image (bpfs.migrate.running; lazy:
                                its big runs read when sent, before park_moved); the
                                signals that came meanwhile were held, and go in the image
    park_moved(pid)             it runs on the node now: this one becomes its ghost
    release_moving(pid, err)    the move failed: it goes on (with `err`, the syscall it is
                                stopped after returns -err: its own ctl write fails so)

States (bpfs/migrate/tracee.py): MOVING (seized and interrupted), MOVE_HELD (stopped and
dumped). bpfs.migrate.running keeps the signals it took on the way to the stop: pending in
the image, or sent again when it is let go.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from bpfs.migrate import ghost_park as gp
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.tracee import GHOST, MOVE_HELD, MOVING, Future, Tracee, resolve

log = logging.getLogger("bpfs.migrate.ghost")
DEAD_WAIT = 2.0             # a process killed while held: its end, at most this late


def _let_go_dead(pid: int) -> None:
    """The seized `pid` died while we held it (a SIGKILL: ptrace says ESRCH): take its
    end, which waits for us, its tracer, before its parent may reap it (else it stays a
    zombie its parent waits for in vain, and the tracer thread, seeing a traced child it
    does not hold, leaves it so). Taken already (by `running.stop`): nothing to do. A
    stop instead (alive after all): let go. Waits DEAD_WAIT at most."""
    from bpfs.migrate import running
    running.keep(pid)
    deadline = time.monotonic() + DEAD_WAIT
    try:
        while not (status := pt.wait(pid, os.WNOHANG)):
            if time.monotonic() > deadline:
                log.warning("tracer: process %d said ESRCH but has not ended", pid)
                return
            time.sleep(0.001)
        if os.WIFSTOPPED(status):
            pt.detach(pid, 0)
    except MigrateError:
        pass


class Moving:
    """The move steps of `Ghosts` (which brings tracees, _lock, _parked, _release...).

    A moving tracee is `held`: the tracer's loop leaves its events alone, and these steps
    wait for them themselves (bpfs.migrate.running's stop), in this thread."""

    tracees: dict[int, Tracee]

    def seize_running(self, fut: Future, pid: int, check: object, stop: bool = False
                      ) -> None:
        """`stop`: wait for its stop too (not for a writer of its own move: it stops
        only once its write has returned); stop_moving is then answered at once."""
        from bpfs.migrate import running
        if pid in self.tracees:
            raise MigrateError(errno.EBUSY, f"process {pid} is already held by the tracer "
                               "(a ghost, or moving)", pid)
        if check is not None:
            check()                                     # type: ignore[operator]
        running.seize_running(pid)
        t = self.tracees[pid] = Tracee(pid, state=MOVING, held=True)
        for ghost in self.tracees.values():     # a child ghost restored here moves again
            if pid in ghost.children and ghost.children[pid] is None and ghost is not t:
                t.parent = ghost.pid
                break
        stopping = False
        try:
            running.interrupt(pid)          # now: a writer of its own move stops at its return
            if check is not None:
                check()                                 # type: ignore[operator]
            if stop:
                stopping = True
                running.stop(pid)
        except BaseException as exc:
            self.tracees.pop(pid, None)
            try:
                if stopping and getattr(exc, "errno", None) == errno.ESRCH:
                    _let_go_dead(pid)       # it ended while stopped: its end, if not taken
                else:
                    running.release(pid)
            except MigrateError:
                _let_go_dead(pid)
            raise
        fut.set_result(None)

    def stop_moving(self, fut: Future, pid: int) -> None:
        from bpfs.migrate import running
        t = self._moving(pid)
        try:
            running.stop(pid)
        except MigrateError as exc:
            if exc.errno == errno.ESRCH:
                self._vanished(t)
            raise
        fut.set_result(None)

    def dump_moving(self, fut: Future, pid: int, links: set[int], lazy: bool = False
                    ) -> None:
        from bpfs.migrate import running
        t = self._moving(pid)
        try:
            image = running.dump_running(pid, links=links, lazy=lazy)
        except MigrateError as exc:
            if exc.errno == errno.ESRCH:
                self._vanished(t)
            raise
        t.state = MOVE_HELD
        fut.set_result(image)

    def park_moved(self, fut: Future, pid: int, close: tuple[int, ...] = ()) -> None:
        """`close`: fds that were its links (it came back from a node before): the node
        has its own now, and the stdio server reads the new ones only after these end."""
        from bpfs.migrate import running
        t = self._moving(pid, held=True)
        signals: list[int] = []
        running.keep(pid)
        pt.ptrace(pt.SETOPTIONS, pid, 0, pt.O_EXITKILL)    # the master's end is its end
        if close:
            regs = pt.getregs(pid)
            _, gadget, _ = gp.vdso(pid)
            for fd in close:
                gp.inject(pid, regs, gadget, signals, pt.SYS["close"], fd)
            pt.setregs(pid, regs)
        gp.park(pid, signals)
        t.state, t.held = GHOST, False
        with self._lock:                                    # type: ignore[attr-defined]
            self._parked.add(pid)                           # type: ignore[attr-defined]
        resolve(fut, None)
        self._report(pid, signals)                          # type: ignore[attr-defined]

    def release_moving(self, fut: Future, pid: int, err: int | None) -> None:
        from bpfs.migrate import running
        t = self._moving(pid)
        try:
            if err:                         # its own `move` write fails with `err`
                running.stop(pid)
                regs = pt.getregs(pid)
                regs.rax = (-err) & (2**64 - 1)
                pt.setregs(pid, regs)
            running.release(pid)
        except MigrateError as exc:
            if exc.errno in (errno.ESRCH, errno.ECHILD):    # killed meanwhile
                _let_go_dead(pid)
            raise
        finally:
            self.tracees.pop(pid, None)
        log.info("tracer: process %d did not move; it goes on", t.pid)
        resolve(fut, None)

    def _vanished(self, t: Tracee) -> None:
        """It ended while stopped for its move (its end taken, if `running` has not)."""
        self.tracees.pop(t.pid, None)
        _let_go_dead(t.pid)

    def _moving(self, pid: int, held: bool = False) -> Tracee:
        t = self.tracees.get(pid)
        if t is None or t.state not in ((MOVE_HELD,) if held else (MOVING, MOVE_HELD)):
            raise MigrateError(errno.ESRCH if t is None else errno.EBUSY,
                               f"process {pid} is not {'dumped' if held else 'held'} "
                               "for a move", pid)
        return t

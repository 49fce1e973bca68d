"""Migrated processes, master side: the ghost table, signals, exits, a lost node.

    procs = ProcService(cluster, send_node)
    await nursery.start(procs.run)        starts the ptrace thread; stops it (every ghost
                                          killed) when cancelled
    await procs.execmove(node, caller, req[, launch])   from nodes/N/ctl (bpfs.master.migrations)
    procs.on_need/on_restored/on_failed/on_exited/on_stopped/on_continued(node, msg)
                                          node -> master messages
    procs.node_lost(node)                 its ghosts die by SIGKILL (bproc semantics)
    await procs.signal_proc(pid, sig)     procs/P/signal and procs/P/ctl

The tracer (bpfs.migrate.tracer.Tracer) runs ptrace in its own thread; its Futures are
awaited with `wait_future`, and its callbacks (`on_signal`, `on_exit`, called in its
thread) are moved into trio with the trio token. The design: docs/migration.md.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import signal as _signal
from typing import Any, Awaitable, Callable

import trio

from bpfs.errors import BpfsError
from bpfs.master.forks import NodeForks
from bpfs.master.nodeexec import NodeExec
from bpfs.master.moves import Moves
from bpfs.master.standins import NodeStandins
from bpfs.master.migrations import (CAPTURE_TIMEOUT, RESTORE_TIMEOUT, Launch, Migrations,
                                    SendNode, wait_future)
from bpfs.model import Cluster
from bpfs.wire import messages

__all__ = ["CAPTURE_TIMEOUT", "RESTORE_TIMEOUT", "Launch", "ProcService", "make_tracer",
           "wait_future"]

log = logging.getLogger("bpfs.master.procs")


def make_tracer(on_signal: Callable[[int, int], None], on_exit: Callable[[int, int], None],
                on_keyboard: Callable[[int, int], None] | None = None) -> Any:
    """The ptrace thread, started; None if this build has none (execmove is then ENOSYS)."""
    try:
        from bpfs.migrate.tracer import Tracer
    except ImportError as exc:
        log.warning("no ghost tracer (%s): migration disabled", exc)
        return None
    tracer = Tracer(on_signal=on_signal, on_exit=on_exit, on_keyboard=on_keyboard)
    try:
        tracer.start()
    except BpfsError as exc:
        log.error("cannot start the ghost tracer (%s): migration disabled", exc)
        return None
    return tracer



class ProcService(Moves, NodeStandins, NodeExec, NodeForks, Migrations):
    """The ghosts of migrated processes, (Migrations) the migrations in flight, and
    (NodeForks) the processes forked on nodes."""

    def __init__(self, cluster: Cluster, send_node: SendNode,
                 tracer_factory: Callable[..., Any] = make_tracer) -> None:
        super().__init__()
        self.cluster = cluster
        self.send_node = send_node
        self._factory = tracer_factory
        self.tracer: Any = None
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    # ---- lifetime ----------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the tracer, serve until cancelled, then stop it (every ghost dies)."""
        self._token = trio.lowlevel.current_trio_token()
        self.tracer = self._factory(on_signal=self._tracer_signal, on_exit=self._tracer_exit,
                                    on_keyboard=self._tracer_keyboard)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if self.tracer is not None:
                self.tracer.stop()

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _from_tracer(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` in trio's thread (we are in the tracer's)."""
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    # ---- node messages about processes (bpfs/wire/messages.py's classes) ----------------

    def on_exited(self, node: int, msg: messages.Exited) -> None:
        pid, sig = msg.pid, msg.signal
        p = self.cluster.procs.get(pid)
        if p is None or p.node != node:
            log.info("node %d: exit of unknown pid %d; ignored", node, pid)
            return
        mid = msg.id
        if mid is not None and mid != p.mid:
            log.info("node %d: exit of pid %d of migration %r, not %d (a reused pid); "
                     "ignored", node, pid, mid, p.mid)
            return
        code = msg.code or 0
        self.spares_end(node, pid)
        log.debug("node %d: pid %d (move or start %d) ended: code %d, signal %s", node, pid,
                  p.mid, code, sig)
        self.cluster.exited(pid, code, sig)
        self._finish(pid, code, sig)

    def on_stopped(self, node: int, msg: messages.Stopped) -> None:
        """The real process stopped (SIGSTOP, SIGTSTP...): state "stopped", and the ghost
        stops too, so its parent (a shell, for `bpsh -N`) sees a stopped child."""
        pid = self._known_on(node, msg)
        if pid is not None:
            self.cluster.stopped(pid)
            self._ghost_job(pid, stop=True, sig=msg.sig or _signal.SIGSTOP)
            self.standin_job(pid, True, msg.sig or _signal.SIGSTOP)

    def on_continued(self, node: int, msg: messages.Continued) -> None:
        pid = self._known_on(node, msg)
        if pid is not None:
            self.cluster.continued(pid)
            self._ghost_job(pid, stop=False)
            self.standin_job(pid, False, _signal.SIGCONT)

    def _known_on(self, node: int, msg: messages.Stopped | messages.Continued) -> int | None:
        pid = msg.pid
        p = self.cluster.procs.get(pid)
        if p is None or p.node != node or p.state == "exited":
            log.info("node %d: %s of unknown pid %r; ignored", node, messages.tag(type(msg)), pid)
            return None
        return pid

    def _ghost_job(self, pid: int, stop: bool, sig: int = _signal.SIGSTOP) -> None:
        if self.tracer is None or not hasattr(self.tracer, "set_stopped"):
            return
        what = "stopping" if stop else "continuing"
        try:
            fut = self.tracer.set_stopped(pid, stop, sig)
        except BpfsError as exc:
            log.info("pid %d: %s the ghost: %s", pid, what, exc)
            return

        def done(f: "concurrent.futures.Future[Any]") -> None:     # in the tracer thread
            exc = None if f.cancelled() else f.exception()
            if exc is not None:
                log.info("pid %d: %s the ghost: %s", pid, what, exc)
        fut.add_done_callback(done)

    def _finish(self, pid: int, code: int, sig: int | None) -> None:
        """The ghost ends the same way. Nothing here waits for it: the tracer thread does
        it, and only a failure is worth a word (no trio task, no wake-up per exit).

        If it cannot end that way (a signal that ends no process, from a buggy node; the
        tracer failing), it is killed: a ghost must never outlive its process, or its
        parent (bpsh) waits for ever. The tracer kills it itself when it fails; a kill of
        what is gone already is a no-op."""
        if self.tracer is None:
            return
        finish = getattr(self.tracer, "finish_soon", self.tracer.finish)
        try:       # finish_soon: no doorbell (a shell's loop of short commands: one each)
            fut = finish(pid, signal=sig) if sig else finish(pid, exit_code=code)
        except BpfsError as exc:
            log.info("pid %d: ending the ghost: %s", pid, exc)
            return

        def ended(f: "concurrent.futures.Future[Any]") -> None:     # in the tracer thread
            exc = None if f.cancelled() else f.exception()
            if exc is None:
                return
            if isinstance(exc, BpfsError) and exc.errno == errno.ESRCH:
                log.info("pid %d: ending the ghost: %s", pid, exc)
                return
            log.warning("pid %d: cannot end the ghost with %s (%s); killing it", pid,
                        f"signal {sig}" if sig else f"exit code {code}", exc)
            self._kill_ghost(pid, "it could not end as its process did")
        fut.add_done_callback(ended)

    def node_lost(self, node: int) -> None:
        """The node's processes are gone: their ghosts die by SIGKILL, migrations fail."""
        self._fail_on(node)
        self.standins_lost(node)
        self.spares_lost(node)
        for pid in self.cluster.procs_on(node):
            m = self._by_pid.get(pid)
            if m is not None and not m.started:
                continue        # its migration fails (above) and says so
            self.cluster.exited(pid, None, _signal.SIGKILL)
            self._kill_ghost(pid, f"node {node}, where it ran, is lost")

    def _kill_ghost(self, pid: int, why: str) -> None:
        """SIGKILL the ghost of `pid`, saying why: its end (`_ghost_exit`) then ends the
        real process too, if it still runs somewhere."""
        if self.tracer is None:
            return
        log.warning("pid %d: killing its ghost: %s", pid, why)
        try:
            self.tracer.kill(pid)
        except BpfsError as exc:
            log.info("pid %d: kill: %s", pid, exc)

    # ---- signals -----------------------------------------------------------------

    async def signal_proc(self, pid: int, sig: int) -> None:
        """procs/P/signal: straight to the real process (the caller's write waits for it);
        while it is "starting", queued like a signal to the ghost, forwarded at `restored`."""
        p = self.cluster.proc(pid)
        m = self._by_pid.get(pid)
        if m is not None and not m.started:
            m.signals.append(sig)
            return
        await self.send_node(p.node, messages.Signal(pid=pid, sig=sig, id=p.mid))
        self.cluster.signalled(pid, sig)

    def _forward(self, pid: int, sig: int, group: bool = False) -> None:
        """A ghost's signal to its real process: written now if the connection takes it
        (a kill from node to node waits for this; a task costs one more pass of the loop)."""
        p = self.cluster.procs.get(pid)
        if p is not None:
            self.cluster.signalled(pid, sig)
            msg = messages.Signal(pid=pid, sig=sig, id=p.mid, group=True if group else None)
            if self.send_now is None or not self.send_now(p.node, msg):
                self._spawn(self._send_signal, p.node, pid, sig, p.mid, group)

    async def _send_signal(self, node: int, pid: int, sig: int, mid: int,
                           group: bool = False) -> None:
        """`sig` to `pid` on `node`, as long as it is still the process migration `mid` put
        there (the node checks: a message overtaken by the pid's reuse reaches no one);
        with `group`, to its job's whole process group there."""
        try:
            await self.send_node(node, messages.Signal(pid=pid, sig=sig, id=mid,
                                                       group=True if group else None))
        except BpfsError as exc:
            log.info("pid %d: signal %d not forwarded: %s", pid, sig, exc)

    # ---- tracer callbacks (tracer thread) ----------------------------------------

    def _tracer_signal(self, pid: int, sig: int) -> None:
        self._from_tracer(self._ghost_signal, pid, sig)

    def _tracer_keyboard(self, pid: int, sig: int) -> None:
        self._from_tracer(self._ghost_signal, pid, sig, True)

    def _tracer_exit(self, pid: int, status: int) -> None:
        self._from_tracer(self._ghost_exit, pid, status)

    def _ghost_signal(self, pid: int, sig: int, group: bool = False) -> None:
        m = self._by_pid.get(pid)
        if m is not None and not m.started:
            m.signals.append(sig)
        elif pid in self.cluster.procs:
            # SIGCONT (fg, bg) continues the whole job: a terminal's Ctrl-Z stopped it all
            self._forward(pid, sig, group or sig == _signal.SIGCONT)

    def _ghost_exit(self, pid: int, status: int) -> None:
        m = self._by_pid.get(pid)
        if m is not None and not m.started:
            # The node may be restoring it right now: its answer decides. `restored` ->
            # on_restored kills what it started; `failed` -> nothing runs. (Failing the
            # migration here would forget it, and a `restored` already on its way would
            # leave the real process running with no ghost.)
            m.ghost_gone = True
            self.launch_gone(pid, status)
            return
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        self._ghost_gone(pid, sig, code)
        self.forked_gone(pid)
        self.spare_gone(pid)
        self.launch_gone(pid, status)
        self.standin_over(pid, status)

    def _ghost_gone(self, pid: int, sig: int | None, code: int | None = None) -> None:
        p = self.cluster.procs.get(pid)
        if p is None:
            return
        if p.state != "exited":     # the ghost died first: the real process follows it
            self._spawn(self._send_signal, p.node, pid, _signal.SIGKILL, p.mid)
            self.cluster.exited(pid, code, sig)
        if p.output is None:        # an exec'd one stays for its output (master/exec)
            self.cluster.remove_proc(pid)

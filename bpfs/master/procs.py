"""Migrated processes, master side: execmove, ghosts, signals, exits (DESIGN §3).

    procs = ProcService(cluster, send_node)
    await nursery.start(procs.run)        starts the ptrace thread; stops it (every ghost
                                          killed) when cancelled
    await procs.execmove(node, caller, req)   from nodes/N/ctl: seize the writer, return its pid
    procs.on_need/on_restored/on_failed/on_exited/on_stopped/on_continued(node, msg)
                                          node -> master messages
    procs.node_lost(node)                 its ghosts die by SIGKILL (bproc semantics)
    await procs.signal_proc(pid, sig)     procs/P/signal and procs/P/ctl
    await procs.execmove(node, caller, req, launch)   the same for the master's own child
                                          (nodes/N/ctl exec, bpfs.master.exec): the
                                          Launch hears how its migration ends

One migration (ID = our serial), bpsh's child being the writer W:

    ctl write      tracer.seize(W, pin.check), done before the write returns (W is the
                   pinned opener of the ctl handle, proven alive and the same user before
                   and after the seize: ESRCH, EPERM); a task starts
    task           tracer.capture(W) -> Image (W execs right after its write returns; the
                   tracer dumps it at its entry point and parks it as the ghost)
                   procs/PID appears now, state "starting", event start: before the node
                   can run the program, so before bpsh can see any of its output
                   -> node: restore {id, image, uid, gid, groups, io, port, token}
                   <- need {id, hashes}  -> files {id, contents}   (repeatable)
                   <- restored {id, pid}: the process runs; state "running"
                   <- failed {id, errno, message}, or any error on our side: bpsh gets the
                   execreq error header (if it listens), the ghost exits 255, procs/PID
                   goes away with the event `exit failed ENAME`
    ghost life     a signal to the ghost -> node: signal {pid, sig, id}, event signal; one
                   from the terminal (Ctrl-C, Ctrl-\\, Ctrl-Z), or SIGCONT (fg, bg) ->
                   signal {pid, sig, id, group}: the job's whole process group on the node
                   (one that comes while "starting", to the ghost or to procs/PID/signal,
                   waits for `restored` and is forwarded then)
                   node: stopped {pid, sig} / continued {pid} -> state "stopped" /
                   "running", and the ghost stops or goes on with it (its parent sees it)
                   node: exited {pid, code, signal, id} -> the ghost ends the same way
                   the ghost died first (kill -9 on the master) -> node: signal {pid, 9, id}
                   A pid is reused once its ghost is gone, maybe by a migration to the
                   same node, so `id` (the migration's, kept as Proc.mid) says which
                   process a signal or an exit is about: the node signals only the
                   process it restored for that id, and an exit whose id is not the
                   current process's (overtaken by the reuse) is ignored.
                   the ghost is gone -> event exit (once), procs/PID removed

A multi-node run (`execmove --nodes`, bproc's vexecmove) is one capture and one dump:
the writer stands for the first rank that may run, and the tracer clones its parked
ghost once for every other rank (the clones are bpsh's children too), in chunks: each
rank is one Migration like any other, sent to its node as soon as its ghost exists, all
sending the same image bytes, with `pid` and `rank` added so the node gives the process
its ghost's PID and its BPROC_RANK. The writer's own rank goes last (its ghost must live
until the last copy is made). Once every ghost exists bpsh gets the ranks link (rank ->
ghost PID, or -ERRNO for a rank that may not run); until then it holds the links and
exits of PIDs it cannot place.

The tracer (bpfs.migrate.ghost.Tracer) runs ptrace in its own thread; its Futures are
awaited here with `wait_future`, and its callbacks (`on_signal`, `on_exit`, called in its
thread) are moved into trio with the trio token. Errors: execmove raises BpfsError (the
ctl write's errno); everything after the write returns is logged and reported to bpsh.
"""

from __future__ import annotations

import concurrent.futures
import errno
import itertools
import logging
import os
import select
import signal as _signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import trio

from bpfs.errors import BpfsError
from bpfs.model import Caller, Cluster, ProcOutput
from bpfs.wire import execreq

log = logging.getLogger("bpfs.master.procs")

CAPTURE_TIMEOUT = 10.0      # the writer execs right after its ctl write returns
RESTORE_TIMEOUT = 60.0      # from `restore` sent to `restored` (file contents may travel)
REPORT_TIMEOUT = 5.0        # connecting to bpsh to report a failure
FINISH_TIMEOUT = 2.0        # a failed migration's ghost ends with 255 by then, else SIGKILL
FAILED_EXIT = 255

SendNode = Callable[[int, dict[str, Any]], Awaitable[None]]


async def wait_future(fut: "concurrent.futures.Future[Any]") -> Any:
    """The result of a Future completed by another thread, without blocking trio."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Any) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass
    fut.add_done_callback(wake)
    await done.wait()
    return fut.result()


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


@dataclass(eq=False)
class Launch:
    """A process the master forked itself (`exec`): how far its migration got.

    `armed` once its execmove seized it; `done` once it runs on the node (`error` None)
    or will never run (`error` says why). Its procs/PID keeps `output` and is not
    removed when the ghost goes: bpfs.master.exec decides when.
    """
    output: ProcOutput
    armed: bool = False
    error: BpfsError | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def finish(self, error: BpfsError | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass(eq=False)
class Migration:
    id: int
    node: int
    pid: int
    caller: Caller
    req: execreq.ExecMove
    send: trio.MemorySendChannel = field(repr=False)
    receive: trio.MemoryReceiveChannel = field(repr=False)
    started: bool = False               # restored: the process runs on the node
    ghost_gone: bool = False
    cmd: str = "?"
    signals: list[int] = field(default_factory=list)   # caught before the process ran
    gen: int = 0                        # of its Proc, once published
    launch: Launch | None = None
    rank: int | None = None             # a rank of a multi-node run
    ranks: list[BpfsError | None] | None = None   # the writer's, until it fans out:
                                        # why each rank may not run (None: it may)


class ProcService:
    """Migrations in flight and the ghosts of migrated processes."""

    def __init__(self, cluster: Cluster, send_node: SendNode,
                 tracer_factory: Callable[..., Any] = make_tracer) -> None:
        self.cluster = cluster
        self.send_node = send_node
        self._factory = tracer_factory
        self.tracer: Any = None
        self._migrations: dict[int, Migration] = {}
        self._by_pid: dict[int, Migration] = {}
        self._ids = itertools.count(1)
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

    # ---- execmove ----------------------------------------------------------------

    def check_ready(self) -> None:
        """ENOSYS unless this master can migrate processes."""
        if self.tracer is None or self._nursery is None:
            raise BpfsError(errno.ENOSYS, "this master cannot migrate processes")

    async def execmove(self, node: int, caller: Caller, req: execreq.ExecMove,
                       launch: Launch | None = None,
                       rank_errors: Sequence[BpfsError | None] = ()) -> int:
        """Seize the writer before its write returns; the rest happens in a task.

        The writer is `caller.pin`'s process (the ctl handle's opener), and only while the
        pin proves it: ESRCH if there is no pin or its process has ended (its number may
        be anyone's now), EPERM if it is no longer the user it was; checked before and
        after the seize (bpfs.migrate.ghost.Tracer.seize releases a process seized by
        mistake).

        With req.nodes, `rank_errors` (one per rank, None where it may run; at least one
        None) says which ranks get a ghost; the writer is the first of those."""
        self.check_ready()
        ranks: list[BpfsError | None] | None = None
        first: int | None = None
        if req.nodes is not None:
            ranks = list(rank_errors) or [None] * len(req.nodes)
            if len(ranks) != len(req.nodes) or all(ranks):
                raise BpfsError(errno.EINVAL, "execmove --nodes: no rank may run")
            first = ranks.index(None)
            node = req.nodes[first]
        pin = caller.pin
        if pin is None:
            raise BpfsError(errno.ESRCH, f"process {caller.pid} is not pinned: nothing "
                            "may act on it")
        pin.check()
        pid = pin.tid
        p = self.cluster.procs.get(pid)
        if pid in self._by_pid or (p is not None and p.state != "exited"):
            raise BpfsError(errno.EBUSY, f"process {pid} is already being migrated")
        await wait_future(self.tracer.seize(pid, pin.check))
        send, receive = trio.open_memory_channel[dict[str, Any]](64)
        m = Migration(next(self._ids), node, pid, caller, req, send, receive, launch=launch)
        m.ranks, m.rank = ranks, first
        if launch is not None:
            launch.armed = True
        self._migrations[m.id] = m
        self._by_pid[pid] = m
        self._spawn(self._migrate, m)
        log.info("migration %d: pid %d to node %d armed", m.id, pid, node)
        return pid

    async def _migrate(self, m: Migration) -> None:
        async def move() -> None:
            image = await self._capture(m)
            if image is None:
                return
            data = None
            if m.ranks is not None:
                data = await self._fan_out(m, image)
            self._publish(m)
            await self._restore(m, image, data)
        await self._guarded(m, move)

    async def _move_rank(self, m: Migration, image: Any, data: bytes) -> None:
        """A further rank of a multi-node run: its ghost exists, its image is `data`."""
        async def move() -> None:
            self._publish(m)
            await self._restore(m, image, data)
        await self._guarded(m, move)

    async def _guarded(self, m: Migration, move: Callable[[], Awaitable[None]]) -> None:
        """Run one migration's steps; any failure ends it cleanly (_failed), and it is
        forgotten afterwards whatever happened."""
        try:
            await move()
        except BpfsError as exc:
            await self._failed(m, exc)
        except Exception:
            log.exception("migration %d of pid %d failed", m.id, m.pid)
            await self._failed(m, BpfsError(errno.EIO, "internal error in the master"))
        finally:
            self._migrations.pop(m.id, None)
            self._by_pid.pop(m.pid, None)
            if m.launch is not None:
                m.launch.finish(BpfsError(errno.ESRCH, f"process {m.pid} ended before exec"))

    async def _fan_out(self, m: Migration, image: Any) -> bytes:
        """The writer is dumped: one ghost per further rank, each rank sent to its node as
        soon as its ghost exists (clones come in chunks, so the first nodes restore while
        the tracer makes the rest); the image serialized once; bpsh told who is who once
        every ghost exists (it holds what it cannot place meanwhile). The writer's own
        rank goes last: its ghost must live until the last copy is made."""
        assert m.ranks is not None and m.req.nodes is not None
        ranks, nodes = m.ranks, m.req.nodes
        m.ranks = None
        may_run = [k for k, err in enumerate(ranks) if err is None]
        pids = [-(err.errno or errno.EIO) if err else 0 for err in ranks]
        pids[may_run[0]] = m.pid
        data = await _serialize(image)
        rest = may_run[1:]
        for chunk in _chunks(rest, FAN_OUT_CHUNKS):
            try:
                clones = await wait_future(self.tracer.clone(m.pid, len(chunk)))
            except BpfsError as exc:        # the writer's ghost is gone: no more copies
                clones = [-(exc.errno or errno.EIO)] * len(chunk)
            alive = set(self.tracer.ghosts())
            for k, pid in zip(chunk, clones):
                pids[k] = pid
                if pid < 0:
                    log.warning("migration %d: no ghost for rank %d (%s)", m.id, k,
                                os.strerror(-pid))
                    continue
                send, receive = trio.open_memory_channel[dict[str, Any]](64)
                r = Migration(next(self._ids), nodes[k], pid, m.caller, m.req, send, receive,
                              cmd=m.cmd, rank=k, ghost_gone=pid not in alive)
                self._migrations[r.id] = r
                self._by_pid[pid] = r
                self._spawn(self._move_rank, r, image, data)
        what = f"the ranks of pid {m.pid}"          # bpsh listens, whatever the IO
        left = _tell_bpsh_now(m.req.port, execreq.render_ranks(m.req.token, m.pid, pids), what)
        if left is not None:
            self._spawn(_tell_bpsh_rest, *left, what)
        log.info("migration %d: pid %d fans out to %d ranks", m.id, m.pid, len(ranks))
        return data

    def _publish(self, m: Migration) -> None:
        """procs/PID, "starting": the ghost is held, the node has not run it yet."""
        c = m.caller
        old = self.cluster.procs.get(m.pid)
        if old is not None and old.output is not None:
            old.output.close()          # a lingering exec'd process of a reused pid
        p = self.cluster.start_proc(m.pid, m.node, c.uid, c.gid, m.cmd, time.time(),
                                    state="starting",
                                    output=m.launch.output if m.launch else None)
        m.gen, p.mid = p.gen, m.id

    async def _capture(self, m: Migration) -> Any:
        """The dumped image; None if the writer ended without exec'ing (nothing to do)."""
        try:
            image = await wait_future(self.tracer.capture(m.pid, CAPTURE_TIMEOUT))
            m.cmd = _command(image.argv, image.comm)
            return image
        except BpfsError as exc:
            if exc.errno in (errno.ESRCH, errno.ECANCELED) or m.ghost_gone:
                log.info("migration %d: pid %d ended before exec (%s)", m.id, m.pid, exc)
                return None
            raise

    async def _restore(self, m: Migration, image: Any, data: bytes | None = None) -> None:
        if m.ghost_gone:
            raise BpfsError(errno.ESRCH, f"process {m.pid} was killed before it moved")
        c = m.caller
        try:
            with trio.fail_after(RESTORE_TIMEOUT):
                if data is None:
                    data = await _serialize(image)
                msg = {"t": "restore", "id": m.id, "image": data, "uid": c.uid, "gid": c.gid,
                       "groups": sorted(c.groups), "io": list(m.req.io), "port": m.req.port,
                       "token": m.req.token,
                       "pid": m.pid}        # so the node connects bpsh's links at once
                if m.rank is not None:
                    msg["rank"] = m.rank
                await self.send_node(m.node, msg)
                await self._negotiate(m, image)
        except trio.TooSlowError:
            raise BpfsError(errno.ETIMEDOUT, f"node {m.node} did not restore in time") from None

    async def _negotiate(self, m: Migration, image: Any) -> None:
        from bpfs.migrate import read_contents
        async for msg in m.receive:
            kind = msg["t"]
            if kind == "need":
                contents = await trio.to_thread.run_sync(read_contents, image, msg["hashes"])
                await self.send_node(m.node, {"t": "files", "id": m.id, "contents": contents})
            elif kind == "restored":
                return
            else:
                raise BpfsError(msg["errno"], msg["message"] or "migration failed")

    async def _failed(self, m: Migration, exc: BpfsError) -> None:
        """Nothing runs on the node: tell bpsh (N: strerror), end the ghost with 255."""
        log.warning("migration %d of pid %d to node %d failed: %s", m.id, m.pid, m.node, exc)
        if m.gen:
            self.cluster.start_failed(m.pid, exc.errno, m.gen)
        if m.launch is not None:
            m.launch.finish(exc)
        with trio.CancelScope(shield=True):
            if "socket" in m.req.io and m.launch is None:
                await _tell_bpsh(m.req.port, execreq.render_error(
                    m.req.token, m.pid, exc.errno, exc.message), f"that pid {m.pid} failed")
            if m.ghost_gone or self.tracer is None:
                return
            try:
                with trio.fail_after(FINISH_TIMEOUT):
                    await wait_future(self.tracer.finish(m.pid, exit_code=FAILED_EXIT))
            except (BpfsError, trio.TooSlowError) as exc2:
                log.warning("pid %d: cannot end it with %d (%s); killing it", m.pid,
                            FAILED_EXIT, exc2 or "timed out")
                self._kill_ghost(m.pid)

    # ---- node messages (each checked against bpfs/wire/messages.py's table first) ----------

    def _migration(self, node: int, msg: dict[str, Any]) -> Migration | None:
        m = self._migrations.get(msg["id"])
        if m is None or m.node != node:
            log.warning("node %d: %s for unknown migration %d; ignored", node, msg["t"],
                        msg["id"])
            return None
        return m

    def on_need(self, node: int, msg: dict[str, Any]) -> None:
        self._deliver(node, msg)

    def on_failed(self, node: int, msg: dict[str, Any]) -> None:
        self._deliver(node, msg)

    def _deliver(self, node: int, msg: dict[str, Any]) -> None:
        m = self._migration(node, msg)
        if m is not None:
            try:
                m.send.send_nowait(msg)
            except trio.WouldBlock:
                log.warning("node %d floods migration %d; message dropped", node, m.id)

    def on_restored(self, node: int, msg: dict[str, Any]) -> None:
        """Recorded here, in message order, so an `exited` right behind finds the process."""
        m = self._migration(node, msg)
        if m is None:       # we gave up on it (timeout, ghost gone): nothing may run
            self._spawn(self._send_signal, node, msg["pid"], _signal.SIGKILL, msg["id"])
            return
        if msg["pid"] != m.pid:
            log.warning("node %d restored migration %d as pid %d, not %d", node, m.id,
                        msg["pid"], m.pid)
        m.started = True
        self.cluster.proc_running(m.pid)
        self._deliver(node, msg)
        if m.launch is not None:
            m.launch.finish()
        if m.ghost_gone:
            self._ghost_gone(m.pid, _signal.SIGKILL)
        for sig in m.signals:
            self._forward(m.pid, sig)

    def on_exited(self, node: int, msg: dict[str, Any]) -> None:
        pid, sig = msg["pid"], msg["signal"]
        p = self.cluster.procs.get(pid)
        if p is None or p.node != node:
            log.info("node %d: exit of unknown pid %d; ignored", node, pid)
            return
        mid = msg["id"]
        if mid is not None and mid != p.mid:
            log.info("node %d: exit of pid %d of migration %r, not %d (a reused pid); "
                     "ignored", node, pid, mid, p.mid)
            return
        code = msg["code"] or 0
        self.cluster.exited(pid, code, sig)
        self._finish(pid, code, sig)

    def on_stopped(self, node: int, msg: dict[str, Any]) -> None:
        """The real process stopped (SIGSTOP, SIGTSTP...): state "stopped", and the ghost
        stops too, so its parent (a shell, for `bpsh -N`) sees a stopped child."""
        pid = self._known_on(node, msg)
        if pid is not None:
            self.cluster.stopped(pid)
            sig = msg.get("sig")
            self._ghost_job(pid, stop=True, sig=sig if isinstance(sig, int) else _signal.SIGSTOP)

    def on_continued(self, node: int, msg: dict[str, Any]) -> None:
        pid = self._known_on(node, msg)
        if pid is not None:
            self.cluster.continued(pid)
            self._ghost_job(pid, stop=False)

    def _known_on(self, node: int, msg: dict[str, Any]) -> int | None:
        pid = msg.get("pid")
        p = self.cluster.procs.get(pid) if isinstance(pid, int) else None
        if p is None or p.node != node or p.state == "exited":
            log.info("node %d: %s of unknown pid %r; ignored", node, msg.get("t"), pid)
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
        try:
            fut = self.tracer.finish(pid, signal=sig) if sig else \
                self.tracer.finish(pid, exit_code=code)
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
            self._kill_ghost(pid)
        fut.add_done_callback(ended)

    def node_lost(self, node: int) -> None:
        """The node's processes are gone: their ghosts die by SIGKILL, migrations fail."""
        for m in list(self._migrations.values()):
            if m.node == node and not m.started:
                self._deliver(node, {"t": "failed", "id": m.id, "errno": errno.EHOSTDOWN,
                                     "message": f"node {node} went down"})
        for pid in self.cluster.procs_on(node):
            m = self._by_pid.get(pid)
            if m is not None and not m.started:
                continue        # its migration fails (above) and says so
            self.cluster.exited(pid, None, _signal.SIGKILL)
            self._kill_ghost(pid)

    def _kill_ghost(self, pid: int) -> None:
        if self.tracer is None:
            return
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
        await self.send_node(p.node, {"t": "signal", "pid": pid, "sig": sig, "id": p.mid})
        self.cluster.signalled(pid, sig)

    def _forward(self, pid: int, sig: int, group: bool = False) -> None:
        p = self.cluster.procs.get(pid)
        if p is not None:
            self.cluster.signalled(pid, sig)
            self._spawn(self._send_signal, p.node, pid, sig, p.mid, group)

    async def _send_signal(self, node: int, pid: int, sig: int, mid: int,
                           group: bool = False) -> None:
        """`sig` to `pid` on `node`, as long as it is still the process migration `mid` put
        there (the node checks: a message overtaken by the pid's reuse reaches no one);
        with `group`, to its job's whole process group there."""
        msg: dict[str, Any] = {"t": "signal", "pid": pid, "sig": sig, "id": mid}
        if group:
            msg["group"] = True
        try:
            await self.send_node(node, msg)
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
            return
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        self._ghost_gone(pid, sig, code)

    def _ghost_gone(self, pid: int, sig: int | None, code: int | None = None) -> None:
        p = self.cluster.procs.get(pid)
        if p is None:
            return
        if p.state != "exited":     # the ghost died first: the real process follows it
            self._spawn(self._send_signal, p.node, pid, _signal.SIGKILL, p.mid)
            self.cluster.exited(pid, code, sig)
        if p.output is None:        # an exec'd one stays for its output (master/exec)
            self.cluster.remove_proc(pid)


INLINE_IMAGE = 1 << 20      # smaller images are serialized in trio's thread (~50 us)
FAN_OUT_CHUNKS = (3, 9)     # ghosts cloned per batch before the rest (~0.3 ms a batch + 0.1 a copy)


def _chunks(items: list[int], sizes: Sequence[int]) -> list[list[int]]:
    """`items` cut into pieces of `sizes`, then whatever is left in one piece."""
    out, i = [], 0
    for n in sizes:
        if i < len(items):
            out.append(items[i:i + n])
            i += n
    if i < len(items):
        out.append(items[i:])
    return out


async def _serialize(image: Any) -> bytes:
    """The image's bytes; a big one in a worker thread so trio keeps serving meanwhile
    (a thread hand-over costs more than serializing a usual, by-reference image)."""
    from bpfs.migrate import dumps
    if image.page_bytes() + sum(map(len, image.contents.values())) < INLINE_IMAGE:
        return dumps(image)
    return await trio.to_thread.run_sync(dumps, image)


async def _tell_bpsh(port: int, data: bytes, what: str) -> None:
    """One link to bpsh (it listens on all addresses): an error header, or the ranks."""
    left = _tell_bpsh_now(port, data, what)
    if left is not None:
        await _tell_bpsh_rest(*left, what)


def _tell_bpsh_now(port: int, data: bytes, what: str
                   ) -> tuple[socket.socket, bytes, bool] | None:
    """Open the link and write what goes without waiting: on loopback a non-blocking
    connect is over when connect() returns, and a ranks link fits in the socket buffer, so
    usually all of it, at once, in the caller's turn of the event loop (an async connect
    waited for a loop that serves 32 busy nodes: ~14 ms, at the end of a 32-node run, for
    a link bpsh needs before it can reap any rank). None: done (or failed, and logged);
    else (socket, what is left, still connecting) for `_tell_bpsh_rest`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                         socket.SOCK_CLOEXEC)
    try:
        err = sock.connect_ex(("127.0.0.1", port))
        if err == errno.EINPROGRESS:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                return sock, data, True
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            return sock, data[sent:], False
    except OSError as exc:
        log.info("cannot tell bpsh (port %d) %s: %s", port, what, exc.strerror or exc)
    sock.close()
    return None


async def _tell_bpsh_rest(sock: socket.socket, data: bytes, connecting: bool,
                          what: str) -> None:
    """Finish what `_tell_bpsh_now` began, waiting as needed (REPORT_TIMEOUT in all)."""
    try:
        with trio.fail_after(REPORT_TIMEOUT):
            if connecting:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
            async with trio.SocketStream(trio.socket.from_stdlib_socket(sock)) as stream:
                await stream.send_all(data)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        log.info("cannot tell bpsh %s: %s", what, exc)
    finally:
        sock.close()


def _command(argv: list[str], comm: str) -> str:
    """One printable line for procs/P/status: the argv, else the command name."""
    cmd = " ".join(argv) or comm or "?"
    return "".join(ch if ch.isprintable() else "?" for ch in cmd)[:256]


"""The steps of one migration, master side: execmove -> capture -> restore -> negotiate,
or failed; a multi-node run's fan-out. The design, message by message: docs/migration.md.

`Migrations` holds the migrations in flight; bpfs.master.procs.ProcService is one, with
the ghost table and the tracer these steps use. Errors: execmove raises BpfsError (the
ctl write's errno); everything after the write returns is logged and reported to bpsh
(bpfs.master.tell_bpsh), and the ghost ends with FAILED_EXIT.
"""

from __future__ import annotations

import concurrent.futures
import errno
import itertools
import logging
import os
import signal as _signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import trio

from bpfs.errors import BpfsError
from bpfs.master import tell_bpsh
from bpfs.model import Caller, Cluster, StdioLinks
from bpfs.output import ProcOutput
from bpfs.wire import execreq, messages
from bpfs.migrate.imageframe import Buffer
from bpfs.migrate.imagebuf import pieces
from bpfs.migrate.lazyrun import materialize
from bpfs.wire.movemsgs import PART

log = logging.getLogger("bpfs.master.procs")

CAPTURE_TIMEOUT = 10.0      # the writer execs right after its ctl write returns
RESTORE_TIMEOUT = 60.0      # from `restore` sent to `restored` (file contents may travel)
FINISH_TIMEOUT = 2.0        # a failed migration's ghost ends with 255 by then, else SIGKILL
FAILED_EXIT = 255
INLINE_IMAGE = 1 << 20      # smaller images are serialized in trio's thread
INLINE_RUNS = 1024          # and the headers of those with so many runs at most
FAN_OUT_CHUNKS = (3, 9)     # ghosts cloned per batch before the rest (bench/results-layout.md)

SendNode = Callable[[int, messages.Msg], Awaitable[None]]
Reply = (messages.Need | messages.Restored | messages.Failed     # a node's, about a migration
         | messages.Taking)
Image = bytes | memoryview | list[Buffer]   # an image's bytes, or its buffers in order

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
    host: str | None = None             # bpsh's address when it runs on a node
    on_started: Callable[[], None] | None = None   # a move's: at `restored`, before anything
    again: int | None = None            # a move's: its links are made again (stdin read)
    streamed: bool = False              # its image streams to the node (`abort` if it fails)
    direct: bool = False                # a move's: its pages may come straight (`taking`)
    took: trio.Event | None = None      # a move's `take` asked, its `way` sent (tonode.py)
    taking: trio.CancelScope | None = None      # ... and its task's scope



class Migrations:
    """Migrations in flight, by id and by pid; a subclass (ProcService) brings the tracer,
    the cluster, send_node and the ghost-table methods declared at the end."""

    cluster: Cluster
    send_node: SendNode
    tracer: Any
    _nursery: trio.Nursery | None

    def __init__(self) -> None:
        self._migrations: dict[int, Migration] = {}
        self._by_pid: dict[int, Migration] = {}
        self._ids = itertools.count(1)

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
        after the seize (bpfs.migrate.tracer.Tracer.seize releases a process seized by
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
        send, receive = trio.open_memory_channel[Reply](64)
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

    async def _move_rank(self, m: Migration, image: Any, data: Image) -> None:
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

    async def _fan_out(self, m: Migration, image: Any) -> Image:
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
        own = m.rank if m.rank is not None else may_run[0]     # the writer's rank
        pids[own] = m.pid
        data = await _serialize(image)
        rest = [k for k in may_run if k != own]
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
                send, receive = trio.open_memory_channel[Reply](64)
                r = Migration(next(self._ids), nodes[k], pid, m.caller, m.req, send, receive,
                              cmd=m.cmd, rank=k, ghost_gone=pid not in alive, host=m.host)
                self._migrations[r.id] = r
                self._by_pid[pid] = r
                self._spawn(self._move_rank, r, image, data)
        what = f"the ranks of pid {m.pid}"          # bpsh listens, whatever the IO
        left = tell_bpsh.send_now(m.req.port, execreq.render_ranks(m.req.token, m.pid, pids),
                                  what, m.host)
        if left is not None:
            self._spawn(tell_bpsh.finish, left, what)
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
        p.links = StdioLinks(m.req.port, m.req.token, tuple(m.req.io), m.host)  # type: ignore[arg-type]

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

    async def _restore(self, m: Migration, image: Any, data: Image | None = None) -> None:
        """Send the image and wait for `restored` (or a failure, raised). An image beyond
        one piece (a moved process's memory) streams: `streamed`, the `restore` with its
        first piece, then `piece`s, views of `data` (the dump's own buffers: no copy),
        which the node writes into the process as they come (bpfs/node/streamin.py)."""
        if m.ghost_gone:
            raise BpfsError(errno.ESRCH, f"process {m.pid} was killed before it moved")
        try:
            with trio.fail_after(RESTORE_TIMEOUT):
                if data is None:
                    data = await _serialize(image)
                parts = data if isinstance(data, list) else [data]
                total = sum(map(len, parts))
                if total <= PART:
                    await self._send_restore(m, b"".join(map(materialize, parts))  # type: ignore[arg-type]
                                             if isinstance(data, list) else data)
                else:
                    cut = pieces(parts, PART)
                    first = materialize(next(cut))
                    at = await self._send_restore(m, first, total)  # type: ignore[arg-type]
                    for piece in cut:       # a LazyRun's pages are read as they go
                        at = await self._send_piece(m, at, materialize(piece))  # type: ignore[arg-type]
                await self._negotiate(m, image)
        except trio.TooSlowError:
            await self._abort(m)
            raise BpfsError(errno.ETIMEDOUT, f"node {m.node} did not restore in time") from None
        except BaseException:
            await self._abort(m)
            raise

    async def _send_restore(self, m: Migration, image: Buffer, total: int | None = None
                            ) -> int:
        """`again` (a moved process), `streamed` (an image of `total` bytes whose first
        piece is `image`), then the `restore`; how many bytes of the image went."""
        c = m.caller
        if m.again is not None:
            await self.send_node(m.node, messages.Again(   # its links connect meanwhile
                id=m.id, consumed=m.again, port=m.req.port, token=m.req.token,
                io=tuple(m.req.io), pid=m.pid, host=m.host))
        if total is not None:
            m.streamed = True
            await self.send_node(m.node, messages.Streamed(id=m.id, total=total))
        await self.send_node(m.node, messages.Restore(
            id=m.id, image=image, uid=c.uid, gid=c.gid,  # type: ignore[arg-type]
            groups=tuple(sorted(c.groups)), io=tuple(m.req.io), port=m.req.port,
            token=m.req.token, pid=m.pid,   # so the node connects bpsh's links at once
            rank=m.rank, host=m.host, **_family(m.pid)))
        return len(image)

    async def _send_piece(self, m: Migration, at: int, piece: Buffer) -> int:
        await self.send_node(m.node, messages.Piece(id=m.id, at=at,
                                                    data=piece))  # type: ignore[arg-type]
        return at + len(piece)

    async def _abort(self, m: Migration) -> None:
        """A streamed restore that will not be finished: the node discards what it built."""
        if not m.streamed or m.started:
            return
        m.streamed = False
        with trio.CancelScope(shield=True):
            try:
                await self.send_node(m.node, messages.Abort(id=m.id))
            except BpfsError as exc:
                log.info("abort of restore %d not sent to node %d: %s", m.id, m.node, exc)

    async def _negotiate(self, m: Migration, image: Any) -> None:
        """Wait for `restored`, sending the file contents the node asks for. `image`: the
        Image, or its bytes (a moved process's, passed on unread: loaded only if the node
        asks, which a node that restored it before never does)."""
        from bpfs.migrate import loads, read_contents
        async for msg in m.receive:
            if isinstance(msg, messages.Need):
                if isinstance(image, (bytes, bytearray, memoryview)):
                    image = await trio.to_thread.run_sync(loads, image)
                contents = await trio.to_thread.run_sync(read_contents, image, msg.hashes)
                await self.send_node(m.node, messages.Files(id=m.id, contents=contents))
            elif isinstance(msg, messages.Restored):
                return
            elif isinstance(msg, messages.Taking):     # late, after TAKE_TIMEOUT: not used
                continue
            else:
                raise BpfsError(msg.errno, msg.message or "migration failed")

    async def _failed(self, m: Migration, exc: BpfsError) -> None:
        """Nothing runs on the node: tell bpsh (N: strerror), end the ghost with 255."""
        log.warning("migration %d of pid %d to node %d failed: %s", m.id, m.pid, m.node, exc)
        if m.gen:
            self.cluster.start_failed(m.pid, exc.errno, m.gen)
        if m.launch is not None:
            m.launch.finish(exc)
        with trio.CancelScope(shield=True):
            if "socket" in m.req.io and m.launch is None:
                await tell_bpsh.send(m.req.port, execreq.render_error(
                    m.req.token, m.pid, exc.errno, exc.message), f"that pid {m.pid} failed",
                    m.host)
            if m.ghost_gone or self.tracer is None:
                return
            try:
                with trio.fail_after(FINISH_TIMEOUT):
                    await wait_future(self.tracer.finish(m.pid, exit_code=FAILED_EXIT))
            except (BpfsError, trio.TooSlowError) as exc2:
                self._kill_ghost(m.pid, f"its migration failed, and it cannot end with "
                                 f"{FAILED_EXIT} ({exc2 or 'timed out'})")

    # ---- node messages (bpfs/wire/messages.py's classes, every field checked) --------------

    def _migration(self, node: int, msg: Reply) -> Migration | None:
        m = self._migrations.get(msg.id)
        if m is None or m.node != node:
            log.warning("node %d: %s for unknown migration %d; ignored", node,
                        messages.tag(type(msg)), msg.id)
            return None
        return m

    def on_need(self, node: int, msg: messages.Need) -> None:
        self._deliver(node, msg)

    def on_failed(self, node: int, msg: messages.Failed) -> None:
        self._deliver(node, msg)

    def _deliver(self, node: int, msg: Reply) -> None:
        m = self._migration(node, msg)
        if m is not None:
            try:
                m.send.send_nowait(msg)
            except trio.WouldBlock:
                log.warning("node %d floods migration %d; message dropped", node, m.id)

    def on_restored(self, node: int, msg: messages.Restored) -> None:
        """Recorded here, in message order, so an `exited` right behind finds the process."""
        m = self._migration(node, msg)
        if m is None:       # we gave up on it (timeout, ghost gone): nothing may run
            self._spawn(self._send_signal, node, msg.pid, _signal.SIGKILL, msg.id)
            return
        if msg.pid != m.pid:
            log.warning("node %d restored migration %d as pid %d, not %d", node, m.id,
                        msg.pid, m.pid)
        m.started = True
        self.cluster.proc_running(m.pid)
        if m.on_started is not None:
            m.on_started()
        self._deliver(node, msg)
        if m.launch is not None:
            m.launch.finish()
        if m.ghost_gone:
            self._ghost_gone(m.pid, _signal.SIGKILL)
        for sig in m.signals:
            self._forward(m.pid, sig)

    def _fail_on(self, node: int) -> None:
        """The node is lost: every migration to it that has not started fails."""
        for m in list(self._migrations.values()):
            if m.node == node and not m.started:
                self._deliver(node, messages.Failed(id=m.id, errno=errno.EHOSTDOWN,
                                                    message=f"node {node} went down"))

    # ---- the ghost table's (bpfs.master.procs.ProcService) -------------------------

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        raise NotImplementedError

    def _forward(self, pid: int, sig: int, group: bool = False) -> None:
        raise NotImplementedError

    async def _send_signal(self, node: int, pid: int, sig: int, mid: int,
                           group: bool = False) -> None:
        raise NotImplementedError

    def _ghost_gone(self, pid: int, sig: int | None, code: int | None = None) -> None:
        raise NotImplementedError

    def _kill_ghost(self, pid: int, why: str) -> None:
        raise NotImplementedError


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


async def _serialize(image: Any) -> Image:
    """The image's bytes; a big one as its buffers (dumps_parts: its pages are not
    copied). Made in trio's thread when that is quick (a thread hand-over costs more than
    serializing a usual, by-reference image, or the header of a moved process's few
    runs: 0.1-0.3 ms), else in a worker thread so trio keeps serving meanwhile."""
    from bpfs.migrate import dumps
    from bpfs.migrate.image import dumps_parts
    if sum(map(len, image.contents.values())) < INLINE_IMAGE:
        if image.page_bytes() < INLINE_IMAGE:
            return dumps(image)
        if sum(len(r.pages) for r in image.regions) <= INLINE_RUNS:
            return dumps_parts(image)   # its header only: the runs are not copied
    return await trio.to_thread.run_sync(dumps_parts, image)


def _command(argv: list[str], comm: str) -> str:
    """One printable line for procs/P/status: the argv, else the command name."""
    cmd = " ".join(argv) or comm or "?"
    return "".join(ch if ch.isprintable() else "?" for ch in cmd)[:256]


def _family(pid: int) -> dict[str, int]:
    """The ghost's parent, process group and session (what getppid, getpgid and getsid
    answer on the node: bpfs/node/supervisor.py); {} if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        ppid, pgid, sid = (int(x) for x in data[data.rfind(b")") + 2:].split()[1:4])
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in (("ppid", ppid), ("pgid", pgid), ("sid", sid)) if v > 0}

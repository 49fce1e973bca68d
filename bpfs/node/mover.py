"""The node's side of moving a running process (bproc_move): stop it, dump it, wait.

    master -> node  dump    id, pid, links, [host, port, token, to]   stop `pid`, dump it
    node -> master  part... dumped id, image, consumed   (or failed id, errno, message)
                    (with host: the header alone in `part`, the pages straight to the
                    target as `chunk`s, bpfs/node/direct.py; then an empty `dumped`)
    master -> node  drop    id, pid             it runs elsewhere now: end this copy, unsaid
                    resume  id, pid, [errno]    it did not move: let it go on as it was

One thread per move does every ptrace request for it (the kernel answers only the tracer
thread; a thread kept from an earlier move, bpfs/node/movethreads.py): it seizes and interrupts the process, and only then does the handler return, so
a process that asked to move itself (its ctl write, forwarded to the master) is stopped
right where that write returns, before the session reads the write's answer. The thread
then dumps it (bpfs.migrate.running), sends the image in pieces and waits for the verdict;
without one within VERDICT_TIMEOUT, or when the session ends, the process goes on here.

A process does not move while it has children here: their parent would be gone from
under them, and it could not wait for them where it goes (EBUSY says so). A job's own
process (the one this node restored) is seized by the move's thread itself (`DirectOps`),
and its dropped copy is killed while still stopped and taken out of the table first, so
its end is not reported: the process lives on elsewhere under the same PID. A process
forked here goes through the node's tracer instead (bpfs/node/standins.py): its parent
is here, so its dropped copy stays as its stand-in, and its stdio goes to a relay.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import trio

from bpfs.errors import BpfsError
from bpfs.migrate import ptrace as pt
from bpfs.migrate.image import dumps_parts
from bpfs.migrate.imagebuf import pieces
from bpfs.migrate.lazyrun import LazyRun, materialize
from bpfs.migrate.errors import MigrateError
from bpfs.node.direct import Route
from bpfs.node.movethreads import MoveThreads
from bpfs.node.session import Session
from bpfs.wire import messages
from bpfs.wire.movemsgs import PART

log = logging.getLogger("bpslave")

SEIZE_TIMEOUT = 2.0          # the thread seizing and interrupting the process
VERDICT_TIMEOUT = 300.0      # dumped, stopped, waiting for `drop` or `resume`
AHEAD = 2                    # parts read ahead of the one being sent
DIRECT_MIN = 2 << 20         # pages (beyond the header) from which they go straight
WAY_TIMEOUT = 10.0           # a big image waits so long for the master's `way`
DROP, RESUME = "drop", "resume"


@dataclass(eq=False)
class Move:
    session: Session
    id: int
    pid: int
    links: tuple[int, ...]
    origin: dict[str, str]                  # content hash -> the master's path
    verdict: "queue.Queue[tuple[str, int | None]]" = field(default_factory=queue.Queue)
    seized: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    ops: Any = None                         # DirectOps, or a stand-in's (node/standins.py)
    outbox: Any = None                      # its parts, to the task that sends them
    route: Route | None = None              # where its pages go straight, if anywhere
    way: trio.Event | None = None           # set once the master's `way` came (`dump` said
    # `way`), or the verdict
    where: tuple[str, int, str, int] | None = None   # the `way`'s: host, port, token, to
    routeless: bool = False                 # its sender is over: no route made now
    big_only: bool = False                  # straight only with big runs (a move home)


class DirectOps:
    """The ptrace steps of a move of a restored process, made by the move's thread."""

    def __init__(self, pid: int, filters: int = 0) -> None:
        self.pid = pid
        self.filters = filters              # the node's own seccomp filters on it

    def page_sender(self, sock: int) -> Any:
        """The stopped, dumped process writing its pages into `sock` itself (an entered
        PageSender: this thread is its tracer); MigrateError if it cannot."""
        from bpfs.migrate.sendpages import PageSender
        from bpfs.node.direct import SEND_TIMEOUT
        return PageSender(self.pid, sock, SEND_TIMEOUT, self.filters).__enter__()

    def seize(self) -> None:
        from bpfs.migrate import running
        running.seize_running(self.pid)
        try:
            running.interrupt(self.pid)     # a writer of its own move stops at its return
        except BaseException:
            running.release(self.pid)
            raise

    def dump(self, links: set[int]) -> Any:
        from bpfs.migrate import running
        return running.dump_running(self.pid, links=links, lazy=True)

    def drop(self) -> None:
        """The stopped copy ends; its tracer (this thread) consumes that end, so its
        keeper can reap it (and tell nobody: it is out of the table)."""
        from bpfs.migrate import running
        running.discard(self.pid)

    def release(self, err: int | None) -> None:
        from bpfs.migrate import running
        if err:                             # its own `move` write fails with `err`
            running.stop(self.pid)
            regs = pt.getregs(self.pid)
            regs.rax = (-err) & (2**64 - 1)
            pt.setregs(self.pid, regs)
        running.release(self.pid)


class Mover:
    """The moves under way on this node, by pid."""

    def __init__(self) -> None:
        self.moves: dict[int, Move] = {}
        self.threads = MoveThreads()        # each move's, kept for the next

    def start(self, session: Session, msg: messages.Dump) -> None:
        """Seize and interrupt `msg.pid` before returning; the rest in the move's thread.
        A refusal is `failed` at once (EBUSY, ESRCH), nothing touched."""
        try:
            self._check(session, msg.pid)
        except BpfsError as exc:
            session.report(messages.Failed(id=msg.id, errno=exc.errno, message=exc.message))
            return
        try:
            ops = self._ops(session, msg)
        except BpfsError as exc:
            session.report(messages.Failed(id=msg.id, errno=exc.errno, message=exc.message))
            return
        m = Move(session, msg.id, msg.pid, tuple(msg.links or ()),
                 dict(session.node.restorer.restorer.origin), ops=ops)  # read in its thread
        self.moves[m.pid] = m
        m.outbox, outgoing = trio.open_memory_channel[messages.Msg](AHEAD)
        assert session.nursery is not None
        if None not in (msg.host, msg.port, msg.token, msg.to) and msg.big_only:
            m.where = (msg.host, msg.port, msg.token, msg.to)   # type: ignore[assignment]
            m.way = trio.Event()            # a move home: connected only for an image with
            m.way.set()                     # big runs (`_routed`): a small one costs none
            m.big_only = True
        elif None not in (msg.host, msg.port, msg.token, msg.to):
            self._route(session, m, msg)    # connects while the process is dumped
        elif msg.way:
            m.way = trio.Event()            # the target is asked meanwhile (`way`)
        session.nursery.start_soon(_send_parts, session, outgoing, m)
        token = trio.lowlevel.current_trio_token()
        self.threads.run(self._run, m, token)
        if not m.seized.wait(SEIZE_TIMEOUT):
            log.warning("move %d: pid %d not seized within %g s", m.id, m.pid, SEIZE_TIMEOUT)

    def way(self, session: Session, msg: messages.Way) -> None:
        """Where the pages of a move whose `dump` said `way` go (trio's thread): kept for
        its thread, which connects only if its image goes straight (`_routed`)."""
        m = self.moves.get(msg.pid)
        if m is None or m.id != msg.id or m.way is None or m.way.is_set():
            log.debug("way of move %d, which does not wait for one: ignored", msg.id)
            return
        if None not in (msg.host, msg.port, msg.token, msg.to):
            m.where = (msg.host, msg.port, msg.token, msg.to)   # type: ignore[assignment]
        m.way.set()

    @staticmethod
    def _route(session: Session, m: Move, msg: messages.Dump) -> None:
        assert session.nursery is not None and msg.to is not None
        m.route = Route(msg.to)
        session.nursery.start_soon(m.route.connect, msg.host, msg.port, msg.token)

    @staticmethod
    async def _routed(m: Move) -> None:
        """(trio's thread, for the move's) Its route decided: after the master's `way`
        (then connected now: only an image that goes straight pays for it), if it waits
        for one."""
        if m.way is not None:
            with trio.move_on_after(WAY_TIMEOUT):   # none: through the master
                await m.way.wait()
            if m.route is None and m.where is not None and not m.routeless:
                host, port, tok, to = m.where
                m.route = Route(to)
                assert m.session.nursery is not None
                m.session.nursery.start_soon(m.route.connect, host, port, tok)
        if m.route is not None:
            await m.route.decided.wait()

    def verdict(self, pid: int, mid: int, what: str, err: int | None = None) -> None:
        m = self.moves.get(pid)
        if m is None or m.id != mid:
            log.debug("%s for pid %d of move %d, which is not under way: ignored", what, pid, mid)
            return
        if what == DROP:
            self._forget_job(m)
        m.verdict.put((what, err))
        if m.way is not None:           # a thread waiting for its `way` waits no more
            m.way.set()

    def session_over(self) -> None:
        """The master is gone: every move lets its process go on (the node kills what the
        session held anyway)."""
        for m in list(self.moves.values()):
            m.verdict.put((RESUME, None))
            if m.way is not None:       # a thread waiting for its `way` waits no more
                m.way.set()

    def _check(self, session: Session, pid: int) -> None:
        node = session.node
        held = node.procs.held.get(pid)
        if held is None or held.session is not session:
            raise BpfsError(errno.ESRCH, f"no process {pid} on this node")
        if pid in self.moves:
            raise BpfsError(errno.EBUSY, f"process {pid} is already moving")
        if _children(pid):
            raise BpfsError(errno.EBUSY, f"process {pid} has children on this node: it "
                            "cannot move while they live")

    def _ops(self, session: Session, msg: messages.Dump) -> Any:
        """DirectOps for a restored process; a stand-in's for one forked here."""
        sup = session.node.supervisor
        if sup is None or msg.pid in sup.jobs:
            return DirectOps(msg.pid, 1 if session.node.restorer.supervised else 0)
        standins = getattr(session.node, "standins", None)
        if standins is None:
            raise BpfsError(errno.EBUSY, f"process {msg.pid} was forked on this node, "
                            "which cannot hold a stand-in for it")
        return standins.ops(session, msg.id, msg.pid)

    def _forget_job(self, m: Move) -> None:
        """Before the copy here is killed: nobody reports its end (trio's thread)."""
        m.session.node.procs.drop(m.pid)

    # ---- the move's thread: every ptrace request for the process ---------------------

    def _run(self, m: Move, token: trio.lowlevel.TrioToken) -> bool:
        """The move; True if this thread traces nothing after it (its process released,
        or killed and its end consumed): it may serve the next move (movethreads.py)."""
        seized = False
        try:
            try:
                m.ops.seize()
                seized = True
            finally:
                m.seized.set()
            image = m.ops.dump(set(m.links))
            for ref in image.files:         # the master's name for a copy this node keeps
                ref.path = m.origin.get(ref.hash, ref.path)
            consumed = _stdin_consumed(m.pid) if 0 in m.links else None
            parts = dumps_parts(image)     # the runs stay views of the dump: no copy
        except (MigrateError, BpfsError, OSError) as exc:
            err = getattr(exc, "errno", None) or errno.EIO
            return self._fail(token, m, err, getattr(exc, "message", None) or str(exc), seized)
        except BaseException as exc:     # a bug: the process must not stay stopped
            log.error("move %d of pid %d failed", m.id, m.pid, exc_info=exc)
            return self._fail(token, m, errno.EIO, f"node error: {exc}", seized)
        try:
            self._send_image(token, m, parts, consumed)
        except BaseException as exc:     # a lost link or stream (else a bug)
            if isinstance(exc, (trio.BrokenResourceError, trio.RunFinishedError, MigrateError,
                                OSError)):
                log.warning("move %d of pid %d: the image did not go: %s", m.id, m.pid, exc)
            else:
                log.error("move %d of pid %d failed", m.id, m.pid, exc_info=exc)
            # `failed`, then the master's word as after a dump that went: `resume` (it
            # goes on here), or `drop` (its ghost was killed meanwhile: a broken direct
            # stream may be the master's undoing); the session's end resumes it
            self._report(token, m, messages.Failed(id=m.id, errno=errno.EIO,
                                                   message=f"node error: {exc}"[:4096]))
        del parts, image
        try:
            what, err = m.verdict.get(timeout=VERDICT_TIMEOUT)
        except queue.Empty:
            log.warning("move %d: no verdict for pid %d in %g s: it goes on here", m.id, m.pid,
                        VERDICT_TIMEOUT)
            what, err = RESUME, None
        clean = self._kill(m) if what == DROP else self._release(m, err)
        self._done(token, m)
        return clean

    def _fail(self, token: trio.lowlevel.TrioToken, m: Move, err: int, text: str,
              seized: bool) -> bool:
        """`failed` to the master; the process (if it was seized) goes on as it was."""
        self._report(token, m, messages.Failed(id=m.id, errno=err, message=text[:4096]))
        clean = self._release(m, None) if seized else True
        self._done(token, m)
        return clean

    def _send_image(self, token: trio.lowlevel.TrioToken, m: Move, parts: list,
                    consumed: int | None) -> None:
        """`part`s (views of the dump: no copy; the first says the total and the stdin
        read), then `dumped`, through the move's outbox: a LazyRun's pages are read here
        as the parts before them go, at most AHEAD parts ahead of the socket. With a
        route to the target, the first part is the header and the pages go there."""
        total = sum(map(len, parts))
        relayed = getattr(m.ops, "relayed", None)   # a stand-in's relay: ahead of its parts
        try:
            if relayed is not None:
                self._post(token, m, relayed)
            if self._direct(token, m, parts):
                self._send_direct(token, m, parts, total, consumed)
                return
            cut = list(pieces(parts, PART)) or [b""]
            for k, piece in enumerate(cut[:-1]):
                self._post(token, m, messages.Part(
                    id=m.id, data=materialize(piece),  # type: ignore[arg-type]
                    total=None if k else total, consumed=None if k else consumed))
            last = messages.Dumped(id=m.id, image=materialize(cut[-1]),  # type: ignore[arg-type]
                                   consumed=consumed)
            if len(cut) > 1 or relayed is not None:
                self._post(token, m, last)      # behind its parts
            else:                   # alone: at once, from here (no hop to trio's thread)
                self._report_here(token, m, last)
        finally:
            try:
                token.run_sync_soon(m.outbox.close)
            except trio.RunFinishedError:
                pass

    def _direct(self, token: trio.lowlevel.TrioToken, m: Move, parts: list) -> bool:
        """Whether the pages go straight: DIRECT_MIN bytes of them or more, a header that
        fits in one part, and a route that connected (waited for: it started with the
        dump, or at the master's `way`, connecting then; a move home, only with runs of
        LAZY_MIN or more, connects only now, to the address its `dump` gave with
        `big_only`). A smaller image goes through
        the master at once (one message: no wait for the target's answer, no connection;
        a route the `dump` gave is closed with its sender)."""
        if len(parts) <= 2 or sum(map(len, parts[:2])) > PART \
                or sum(map(len, parts[2:])) < DIRECT_MIN:
            return False
        if m.big_only and not any(isinstance(p, LazyRun) for p in parts[2:]):
            return False
        if m.way is None and m.route is None:
            return False
        trio.from_thread.run(self._routed, m, trio_token=token)
        return m.route is not None and m.route.fs is not None

    def _send_direct(self, token: trio.lowlevel.TrioToken, m: Move, parts: list,
                     total: int, consumed: int | None) -> None:
        """The header to the master (`part`, `direct`), the pages to the target (`chunk`s
        at their offsets), then an empty `dumped` once the last one went."""
        header = b"".join(map(bytes, parts[:2]))
        self._post(token, m, messages.Part(id=m.id, data=memoryview(header), total=total,
                                           consumed=consumed, direct=True))
        at, route = len(header), m.route
        assert route is not None
        cut = list(pieces(parts[2:], PART))
        opener = getattr(m.ops, "page_sender", None)      # not a stand-in's: its tracer
        if opener is not None and any(isinstance(p, LazyRun) for p in cut) \
                and route.write_from(opener, cut, at):      # one copy fewer (direct.py)
            self._post(token, m, messages.Dumped(id=m.id, image=b"", consumed=consumed))
            return
        route_id = route.id
        for piece in cut:
            data = materialize(piece)
            self._post(token, m, messages.Chunk(id=route_id, at=at, data=data))  # type: ignore[arg-type]
            at += len(data)
        self._post(token, m, messages.Dumped(id=m.id, image=b"", consumed=consumed))

    def _post(self, token: trio.lowlevel.TrioToken, m: Move, msg: messages.Msg) -> None:
        """Queue `msg` for the move's sender; waits while AHEAD are queued already."""
        trio.from_thread.run(m.outbox.send, msg, trio_token=token)

    def _release(self, m: Move, err: int | None) -> bool:
        try:
            m.ops.release(err)
        except (MigrateError, BpfsError, TimeoutError) as exc:
            log.warning("move %d: releasing pid %d: %s", m.id, m.pid, exc)
            return False
        return True

    def _kill(self, m: Move) -> bool:
        try:
            m.ops.drop()
        except (MigrateError, BpfsError, TimeoutError) as exc:
            log.warning("move %d: dropping pid %d: %s", m.id, m.pid, exc)
            return False
        log.debug("move %d: pid %d moved away", m.id, m.pid)
        return True

    def _report(self, token: trio.lowlevel.TrioToken, m: Move, msg: messages.Msg) -> None:
        try:
            token.run_sync_soon(m.session.report, msg)
        except trio.RunFinishedError:
            pass

    def _report_here(self, token: trio.lowlevel.TrioToken, m: Move, msg: messages.Msg
                     ) -> None:
        """`msg` written from this thread if nothing queued goes before it, else as
        `_report` (Session.report_threadsafe)."""
        def post(fn: Any, *args: Any) -> None:
            try:
                token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass
        m.session.report_threadsafe(msg, post)

    def _done(self, token: trio.lowlevel.TrioToken, m: Move) -> None:
        def done() -> None:
            m.outbox.close()            # its sender ends (if nothing was sent: now)
            if self.moves.get(m.pid) is m:
                del self.moves[m.pid]
        try:
            token.run_sync_soon(done)
        except trio.RunFinishedError:
            pass


async def _send_parts(session: Session, outgoing: trio.MemoryReceiveChannel,
                      m: Move) -> None:
    """Send a move's parts in order as its thread queues them, its `chunk`s on the
    route to the target (a task of the session: it ends when the thread closes the
    outbox, or at the first failure, which the thread then meets as a closed outbox)."""
    try:
        async with outgoing:
            async for msg in outgoing:
                route = m.route
                try:
                    if isinstance(msg, messages.Chunk):
                        assert route is not None
                        await route.send(msg)
                    else:
                        if isinstance(msg, messages.Dumped) and route is not None:
                            await route.close()     # the last chunk went: the stream ends
                        await session.fs.send(msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                        OSError) as exc:
                    if isinstance(msg, messages.Chunk):
                        log.warning("move %d: the direct stream to %s broke: %s", msg.id,
                                    route.to if route else "?", exc or type(exc).__name__)
                    return
                del msg                 # a sent part holds its pages: let them go
    finally:
        m.routeless = True                  # no route made after this
        if m.route is not None:
            await m.route.close()


def _stdin_consumed(pid: int) -> int | None:
    """How many bytes of its stdin link the stopped `pid` has read (None: not a socket)."""
    from bpfs.wire.stdiolink import stdin_consumed
    (fd,) = pt.copy_fds(pid, [0])
    if fd is None:
        return None
    try:
        return stdin_consumed(fd)
    except BpfsError:               # not a TCP socket
        return None
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


async def on_dump(session: Session, msg: messages.Dump) -> None:
    mover = getattr(session.node, "mover", None)
    if mover is None:
        session.report(messages.Failed(id=msg.id, errno=errno.ENOSYS,
                                       message="this node cannot move processes"))
        return
    if session.node.supervisor is not None:     # it leaves: its spare goes back
        session.node.supervisor.give_back(msg.pid)
    mover.start(session, msg)


async def on_drop(session: Session, msg: messages.Drop) -> None:
    mover = getattr(session.node, "mover", None)
    if mover is not None:
        mover.verdict(msg.pid, msg.id, DROP)


async def on_way(session: Session, msg: messages.Way) -> None:
    mover = getattr(session.node, "mover", None)
    if mover is not None:
        mover.way(session, msg)


async def on_resume(session: Session, msg: messages.Resume) -> None:
    mover = getattr(session.node, "mover", None)
    if mover is not None:
        mover.verdict(msg.pid, msg.id, RESUME, msg.errno)

"""A restore whose image streams in (a moved process's memory): built as the pieces come.

    master -> node  streamed id, total        the next restore's image is `total` bytes
                    restore  id, image, ...   `image` is its first piece (the header in it)
                    piece    id, at, data     the rest, in order (`at`: its offset)
                    abort    id               it will not be finished: discard it
    node -> master  restored id, pid  |  failed id, errno, message

The pieces after the first may also come straight from the node that dumped the process,
as `chunk`s on a connection of their own (bpfs/node/direct.py): taken here the same way,
and that stream ends with its restore.

Why: a moved process's image (100 MB, 1 GB) was gathered whole in one buffer and only then
written into the new process: two fills of fresh memory one after the other, and the
restore could not start before the last byte came. Now the process is built as soon as
the header is in (`Restorer.begin`: mapped, writable, its credentials set, stopped), each
piece is written into it with process_vm_writev straight from the frame it came in
(`Incoming.runs_in`: big runs as single iovecs, no copy), and when the last byte lands
only its open files, registers and final steps remain (`Build.finish`).

The writes go in worker threads, WRITERS pieces at a time, while the next piece is
received (at most MAX_WRITES pieces in hand, counted from the oldest not written yet:
the receiver waits for room, `room`): a write into the new process's fresh pages costs
about 1 ms a MB here (a VM), and receiving the next piece while it went (node -> node,
100 MB: 93 ms of writes, 57 of receiving, one after the other) held the source up as
long. Two at a time: some of this VM's fresh memory costs 7 times more to fault in
(23 ms of CPU for 8 MiB, not 3: bench/results-move.md, branch move-out2), and one writer
was then the whole move's pace while the other core idled. The process is finished (`Build.finish`, in the
event loop's thread, its tracer) only once every write is over; a failed write fails the
restore, and `abort` (or the session's end) meanwhile kills what was built, as before:
`Build.abort` waits for a write under way, so none reaches a PID freed and taken again.

When it cannot be built at once (the PID is not in the request, its links are still
connecting, file contents must be fetched first), the pieces are put in place instead
and the restore goes on as any other once the image is whole (`Attempt.run`).

Failure: a piece out of order or beyond the total (EPROTO, EFBIG), a corrupt header, a
write that fails, no piece for PIECE_TIMEOUT: the process being built is killed (it never
ran), the restore is `failed`, and later pieces of it are ignored. `abort`: the same,
unreported (the master gave up: the source keeps the process). The session's end discards
every stream. Everything here runs in the event loop's thread (the Restorer's).
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from typing import Any

import trio

from bpfs.errors import BpfsError
from bpfs.migrate.imagebuf import Incoming
from bpfs.node import earlylinks, procs, stdio
from bpfs.node.direct import MAX_WRITES, WRITERS, end_take
from bpfs.node.procs import Attempt
from bpfs.node.session import Session
from bpfs.wire import messages

log = logging.getLogger("bpslave")

PIECE_TIMEOUT = 30.0                # a stream with no piece for so long fails
MAX_STREAMS = 16                    # restores streaming in at once
MAX_STREAM_IMAGE = 64 << 30         # bytes of one streamed image


class Stream:
    """One restore streaming in: its `Attempt` (links, fds, the reply), the image as it
    comes (`Incoming`), and the process being built (`build`), if it could start."""

    def __init__(self, session: Session, req: messages.Restore, total: int) -> None:
        self.session, self.id = session, req.id
        self.attempt = Attempt(session, req)
        self.incoming = Incoming(total, MAX_STREAM_IMAGE)
        self.build: Any = None              # bpfs.migrate.restore.Build
        self.image: Any = None
        self.over = False                   # restored, failed or discarded
        self.decided = False                # built as it comes, or put together first
        self.deadline = trio.current_time() + PIECE_TIMEOUT
        self.scope = trio.CancelScope()
        self.writes = 0                     # pieces in the writer's hands
        self.wrote = trio.Event()           # set, then replaced, as each write ends
        self.finishing = False              # its last byte is in: finished once written
        self.writer = trio.CapacityLimiter(WRITERS)
        self.in_hand: deque[trio.Event] = deque()   # each write's end, in order

    def start(self) -> None:
        """The first piece (the request's image): build now if nothing needs waiting."""
        self.incoming.keep_all = True           # until it is decided (the header is in)
        self.incoming.take(0, self.attempt.req.image)
        self._decide()
        self._maybe_done()

    def piece(self, at: int, data: memoryview) -> None:
        if self.over:
            return
        try:
            self.incoming.take(at, data)
            if self.build is not None:
                self._write_soon(self.incoming.runs_in(at, data))
            elif not self.decided:
                self._decide()
        except BaseException as exc:
            self.fail(exc)
            return
        self.deadline = trio.current_time() + PIECE_TIMEOUT
        self._maybe_done()

    def _write_soon(self, runs: Any) -> None:
        """`runs` (views of their frame, which they keep) written in a writer thread."""
        self.writes += 1
        done = trio.Event()
        self.in_hand.append(done)
        assert self.session.nursery is not None
        self.session.nursery.start_soon(self._write, self.build, runs, done)

    async def _write(self, build: Any, runs: Any, done: trio.Event) -> None:
        try:
            await trio.to_thread.run_sync(build.write, runs, limiter=self.writer)
        except Exception as exc:        # MigrateError (ESRCH once aborted), OSError
            self.fail(exc)
        finally:
            done.set()
            self.writes -= 1
            self.wrote.set()
            self.wrote = trio.Event()

    async def room(self) -> None:
        """Wait while MAX_WRITES pieces are in the writers' hands (the receiver's pace),
        counted from the oldest not written yet: the direct stream reads into its
        buffers in turn, so a later piece's write ending first frees none of them."""
        while True:
            while self.in_hand and self.in_hand[0].is_set():
                self.in_hand.popleft()
            if len(self.in_hand) < MAX_WRITES:
                return
            await self.in_hand[0].wait()

    def _decide(self) -> None:
        """Once the header is in: build the process now (the pages kept so far written
        into it, the later ones as they come), or put the image together first."""
        inc = self.incoming
        if inc.image() is None:
            return
        self.decided = True
        built = self._begin()
        log.debug("restore %d: %s", self.id, "built as its image comes" if built
                  else "its image put together first")
        if built:
            assert inc.header_end is not None
            kept = memoryview(inc.buf._map)[inc.header_end:inc.got]
            self.build.write(inc.runs_in(inc.header_end, kept))
            inc.keep_all = False

    def _begin(self) -> bool:
        """Start the process if the PID, the header, the files and the links are all
        there; False: wait for the whole image (nothing taken that `Attempt.run` needs)."""
        a, node = self.attempt, self.attempt.node
        req = a.req
        image = self.incoming.image()
        if image is None or req.pid is None or self._standin() is not None \
                or self.session.node.procs.dying(req.pid):
            return False            # (a dropped copy of it still ends here: Attempt.run waits)
        image, missing = procs.prepared(node, req, image)
        if missing:
            return False
        if not a.take_links(req.pid):
            return False
        self.image, _, self.build = procs._restore_job(node, req, a.fds, (image, []), {},
                                                      begin=True)
        a.steps.mark("begin")
        return True

    def _standin(self) -> Any:
        """The node's stand-ins when this process comes back into one of them (put
        together first, then restored into it), else None."""
        standins = getattr(self.session.node, "standins", None)
        pid = self.attempt.req.pid
        return standins if standins is not None and pid in standins.held else None

    def _maybe_done(self) -> None:
        if not self.incoming.complete:
            return
        self.over = True
        self.scope.cancel()
        self._forget()
        a = self.attempt
        if self.build is None:          # put together: the usual restore from here
            a.req = messages.replace(a.req, image=self.incoming.view())
            assert self.session.nursery is not None
            standins = self._standin()
            if standins is not None:    # back into its stand-in (bpfs/node/standins.py)
                self.session.nursery.start_soon(standins.restore_in, self.session, a.req)
            else:
                self.session.nursery.start_soon(a.run)
            return
        self.finishing = True
        assert self.session.nursery is not None
        self.session.nursery.start_soon(self._finish)

    async def _finish(self) -> None:
        """Once every piece is written: the rest of the restore (unless it failed or was
        discarded meanwhile)."""
        try:
            while self.writes:
                await self.wrote.wait()
        except BaseException:           # cancelled: the session ends
            self.discard()
            raise
        if not self.finishing:
            return
        self.finishing = False
        a = self.attempt
        try:
            pid = self.build.finish()
        except BaseException as exc:
            self.build = None
            a._failed(exc)
            return
        a.steps.mark("pages and finish")
        a._restored(self.image, pid)

    def fail(self, exc: BaseException) -> None:
        """Discard what was built and say why (`failed`); later pieces are ignored."""
        if self.over and not self.finishing:
            return
        self.over, self.finishing = True, False
        end_take(self.session, self.id)
        self._discard_build()
        self.attempt._failed(exc)

    def discard(self) -> None:
        """The same, unreported (`abort`, the session's end)."""
        if self.over and not self.finishing:
            return
        self.over, self.finishing = True, False
        self._discard_build()
        a = self.attempt
        stdio.close_all(a.fds)
        if a.links is not None:
            a.links.close()
        self.scope.cancel()
        self._forget()

    def _discard_build(self) -> None:
        build, self.build = self.build, None
        if build is not None:
            build.abort()

    def _forget(self) -> None:
        end_take(self.session, self.id)
        if self.session.streams.get(self.id) is self:
            del self.session.streams[self.id]

    async def watch(self) -> None:
        """Fail it when pieces stop coming; a failed stream is kept (later pieces of it
        ignored) until PIECE_TIMEOUT after its last piece; discarded if cancelled."""
        try:
            with self.scope:
                while trio.current_time() < self.deadline:
                    await trio.sleep_until(self.deadline)
                self.fail(BpfsError(errno.ETIMEDOUT, f"restore {self.id}: no piece of its "
                                    f"image for {PIECE_TIMEOUT:g} s"))
        finally:
            if not self.over:
                self.discard()
            self._forget()


# ---- handlers (bpfs/node/service.py's FROM_MASTER) ----------------------------------

async def on_streamed(session: Session, msg: messages.Streamed) -> None:
    """The next `restore` of this id streams in: its image is `total` bytes."""
    if len(session.streamed) >= MAX_STREAMS:
        session.streamed.pop(next(iter(session.streamed)))
    session.streamed[msg.id] = msg.total


async def on_restore(session: Session, msg: messages.Restore) -> None:
    total = session.streamed.pop(msg.id, None)
    if total is None:
        end_take(session, msg.id)           # all of its image is here
        await procs.on_restore(session, msg)
        return
    try:
        procs.check_restore(msg)
        if msg.id in session.streams:
            raise BpfsError(errno.EBUSY, f"restore {msg.id} is streaming in already")
        if len(session.streams) >= MAX_STREAMS:
            raise BpfsError(errno.EBUSY, "too many images streaming in at once")
        if total <= len(msg.image):
            raise BpfsError(errno.EPROTO, f"a streamed image of {total} bytes whose first "
                            f"piece holds {len(msg.image)}")
        stream = Stream(session, msg, total)
    except BpfsError as exc:
        log.warning("restore %d refused: %s", msg.id, exc)
        end_take(session, msg.id)
        session.report(messages.Failed(id=msg.id, errno=exc.errno, message=exc.message))
        return
    session.streams[msg.id] = stream
    take = session.takes.get(msg.id)
    if take is not None:                    # its pages come straight: take them now
        take.ready.set()
    assert session.nursery is not None
    session.nursery.start_soon(stream.watch)
    try:
        stream.start()
    except BaseException as exc:
        stream.fail(exc)


async def on_piece(session: Session, msg: messages.Piece) -> None:
    stream = session.streams.get(msg.id)
    if stream is None:
        log.debug("piece of restore %d, which is not streaming in: ignored", msg.id)
        return
    stream.piece(msg.at, msg.data)
    await stream.room()


async def on_abort(session: Session, msg: messages.Abort) -> None:
    session.streamed.pop(msg.id, None)
    session.again.pop(msg.id, None)
    earlylinks.drop(session, msg.id)
    end_take(session, msg.id)
    stream = session.streams.pop(msg.id, None)
    if stream is not None:
        stream.discard()

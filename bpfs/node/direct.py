"""A moving process's pages straight from node to node (the direct stream).

    master -> B  take     id                   B listens for restore `id`'s pages
    B -> master  taking   id, port, token      (or failed: the master passes them on)
    master -> A  dump     id, pid, links, host, port, token, to (B's restore id)
    A -> B       open     id, token            on a connection of its own (4 KiB frames)
                 chunk    id, at, data ...     the image after its header, in order
    A -> master  part     (the header: total, consumed, direct), then `dumped` (empty)

Why: between nodes every byte of a moving process went A -> master -> B, two copies over
the network and the master's loop in the middle of each (a node-to-node move of 100 MB
took 0.2 s, from the master 0.12 s). Now only the header (a few KiB: what the master needs
to answer `need`, and the restore's first piece) goes through the master; the control
stays with it (it decides, and tells A `drop` or `resume` and B `abort` as before).

B's side (`Take`, one per `take`): a listening socket on the address B reaches the master
from, for at most TAKE_TIMEOUT, and a token of 256 random bits. The first connection
that opens with `open` of that id and token is the stream (the listener closes then: a
second connection is refused); a connection that opens otherwise is closed (at most
MAX_REFUSED of them, then the listener closes and A, refused, sends through the master).
Every frame is decoded by messages.DIRECT (only `open`, then `chunk`s, each within the
frame limit); each chunk goes to the restore that streams in (bpfs/node/streamin.py) as
a `piece`, so a chunk out of order or beyond the total fails that restore (EPROTO,
EFBIG), as does any other frame, or the stream's end before the last byte (EPROTO). The
stream is closed when its restore is over, whichever way: a source still sending then
fails, and the master lets the process go on there (`resume`).

A's side (`Route`): connect within CONNECT_TIMEOUT while the process is dumped, and open
with the token; if that fails, the parts go through the master as before (a cluster
whose nodes cannot reach each other still moves). BPFS_DIRECT_PORT, in B's environment,
makes it name that port in `taking` instead of its own (tests: an unreachable one).
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets
from typing import Any, Callable

import trio

from bpfs.errors import BpfsError, ProtocolError
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.imageframe import Buffer
from bpfs.migrate import sendpages
from bpfs.migrate.lazyrun import LazyRun
from bpfs.node.session import Session
from bpfs.wire import framing as wire, messages
from bpfs.wire.movemsgs import PART

log = logging.getLogger("bpslave")

TAKE_TIMEOUT = 30.0          # a `take` waits so long for its stream to open
OPEN_TIMEOUT = 2.0           # a connection's `open`, from its accept
CONNECT_TIMEOUT = 1.0        # the source connecting to the target, then the master's way
SEND_TIMEOUT = 30.0          # a chunk written to a target that stopped reading
MAX_TAKES = 16               # takes open at once
MAX_REFUSED = 8              # wrong openings of one take before it stops listening
MAX_CHECKS = 4               # connections in their opening at once
CHUNK_FRAME = PART + 4096    # a chunk's frame at most
MAX_WRITES = 3               # pieces in a restore's writers' hands (bpfs/node/streamin.py)
WRITERS = 2                  # of them written at once, each in a thread of its own


class Take:
    """B's end of one direct stream: its listener, its token, then its connection."""

    def __init__(self, session: Session, mid: int) -> None:
        self.session, self.id = session, mid
        self.token = secrets.token_hex(32)
        self.listener: trio.SocketListener | None = None
        self.scope = trio.CancelScope()
        self.ready = trio.Event()       # its restore streams in (streamin.on_restore)
        self.refused = 0
        self.checking = 0
        self.peer = "?"
        self._accepting = trio.CancelScope()

    async def listen(self) -> int:
        """Listen on the address this node reaches the master from; the port."""
        host = self.session.fs.stream.socket.getsockname()[0]
        (self.listener,) = await trio.open_tcp_listeners(0, host=host, backlog=4)
        return self.listener.socket.getsockname()[1]

    def close(self) -> None:
        """Stop listening, and end the stream if it opened (its restore is over)."""
        self.scope.cancel()

    async def run(self) -> None:
        """Accept the stream, then pass its chunks on to its restore; then forget it."""
        try:
            with self.scope:
                fs = await self._accept()
                if fs is not None:
                    try:
                        await self._receive(fs)
                    finally:
                        await trio.aclose_forcefully(fs.stream)
        finally:
            self._stop_listening()
            if self.session.takes.get(self.id) is self:
                del self.session.takes[self.id]

    def _stop_listening(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.socket.close()

    async def _accept(self) -> wire.FrameStream | None:
        """The first connection that opens right, within TAKE_TIMEOUT (None: none did)."""
        assert self.listener is not None
        opened: list[wire.FrameStream] = []
        with trio.move_on_after(TAKE_TIMEOUT), self._accepting:
            async with trio.open_nursery() as nursery:
                while not opened:
                    stream = await self.listener.accept()
                    if self.checking >= MAX_CHECKS:
                        await trio.aclose_forcefully(stream)
                        self._refuse(_peer(stream), "too many connections opening at once")
                        continue
                    nursery.start_soon(self._check, stream, opened)
        self._stop_listening()
        if not opened:
            log.info("restore %d: no direct stream opened (%d refused); its pages come "
                     "through the master", self.id, self.refused)
            return None
        return opened[0]

    async def _check(self, stream: trio.SocketStream, opened: list[wire.FrameStream]
                     ) -> None:
        """Keep `stream` if its first frame is this take's `open`, else close it."""
        self.checking += 1
        peer, kept = _peer(stream), False
        # chunks are read into MAX_WRITES + 1 buffers in turn: the writer thread holds at
        # most MAX_WRITES - 1 of them while the next is read (`room` first: streamin.py)
        fs = wire.FrameStream(stream, wire.HANDSHAKE_MAX_FRAME, messages.DIRECT,
                              reuse=MAX_WRITES + 1)
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                msg = await fs.receive()
            if not isinstance(msg, messages.Open) or msg.id != self.id \
                    or not hmac.compare_digest(msg.token, self.token):
                raise ProtocolError("a wrong opening (another restore, or a wrong token)")
            if not opened:                  # else another one opened meanwhile
                fs.max_frame = CHUNK_FRAME
                opened.append(fs)
                self.peer, kept = peer, True
                self._accepting.cancel()
        except (ProtocolError, EOFError, trio.TooSlowError, trio.BrokenResourceError,
                OSError) as exc:
            self._refuse(peer, str(exc) or type(exc).__name__)
        finally:
            self.checking -= 1
            if not kept:
                await trio.aclose_forcefully(stream)

    def _refuse(self, peer: str, why: str) -> None:
        self.refused += 1
        log.warning("restore %d: refused a direct stream from %s: %s", self.id, peer, why)
        if self.refused >= MAX_REFUSED:
            self._accepting.cancel()

    async def _receive(self, fs: wire.FrameStream) -> None:
        """Each chunk, as a piece of the restore streaming in, until it is over."""
        with trio.move_on_after(TAKE_TIMEOUT):
            await self.ready.wait()
        stream = self.session.streams.get(self.id)
        if stream is None:
            return
        log.info("restore %d: its pages straight from %s", self.id, self.peer)
        while not stream.over:
            await stream.room()
            if stream.over:
                return
            try:
                msg = await fs.receive()
            except EOFError:
                stream.fail(ProtocolError(f"restore {self.id}: the direct stream ended at "
                                          f"byte {stream.incoming.got} of "
                                          f"{stream.incoming.total}"))
                return
            except ProtocolError as exc:
                stream.fail(exc)
                return
            if not isinstance(msg, messages.Chunk) or msg.id != self.id:
                stream.fail(ProtocolError(f"restore {self.id}: the direct stream sent "
                                          f"{messages.tag(type(msg))} of restore {msg.id}"))
                return
            stream.piece(msg.at, msg.data)


def end_take(session: Session, mid: int) -> None:
    """Restore `mid` is over (or will not come): its take, if any, ends."""
    take = session.takes.pop(mid, None)
    if take is not None:
        take.close()


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError):
        return "?"


def _advertised(port: int) -> int:
    text = os.environ.get("BPFS_DIRECT_PORT", "")
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else port


async def on_take(session: Session, msg: messages.Take) -> None:
    try:
        if msg.id in session.takes:
            raise BpfsError(errno.EBUSY, f"restore {msg.id} is taken already")
        if len(session.takes) >= MAX_TAKES:
            raise BpfsError(errno.EBUSY, "too many direct streams at once")
        take = Take(session, msg.id)
        port = await take.listen()
    except (BpfsError, OSError) as exc:
        err = getattr(exc, "errno", None) or errno.EIO
        log.warning("restore %d: no direct stream: %s", msg.id, exc)
        session.report(messages.Failed(id=msg.id, errno=err, message=str(exc)[:4096]))
        return
    session.takes[msg.id] = take
    assert session.nursery is not None
    session.nursery.start_soon(take.run)
    session.report(messages.Taking(id=msg.id, port=_advertised(port), token=take.token))


# ---- A's side ------------------------------------------------------------------------

class Route:
    """Where a move's pages go: the target's direct stream once `decided` (`fs`), or
    the master (`fs` None)."""

    def __init__(self, mid: int) -> None:
        self.id = mid                   # the target's restore: its chunks' id
        self.fs: wire.FrameStream | None = None
        self.decided = trio.Event()
        self.closed = False             # the move is over (or sends through the master)
        self.to = "?"

    async def connect(self, host: str, port: int, token: str) -> None:
        """Connect and open within CONNECT_TIMEOUT, else leave `fs` None."""
        self.to, mid = f"{host}:{port}", self.id
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
                fs = wire.FrameStream(stream, wire.HANDSHAKE_MAX_FRAME)
                await fs.send(messages.Open(id=mid, token=token))
            if self.closed:             # its move ended meanwhile
                raise trio.BrokenResourceError("the move is over")
            self.fs = fs
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("restore %d: cannot reach %s (%s): its pages go through the "
                        "master", mid, self.to, _why(exc))
            if stream is not None:
                await trio.aclose_forcefully(stream)
        finally:
            self.decided.set()

    async def send(self, msg: messages.Chunk) -> None:
        """A chunk, its data written from where it is (no copy into a frame)."""
        assert self.fs is not None
        await self.fs.send_split(msg, "data", SEND_TIMEOUT)

    def write_from(self, opener: Callable[[int], Any], cut: list[Buffer], at: int) -> bool:
        """Write the chunks `cut` (from offset `at`) from this thread, the move's (its
        process's tracer): a LazyRun's pages by the process itself (`opener(fd)`, an
        entered bpfs.migrate.sendpages.PageSender), the rest from here. False: the process
        cannot send them (nothing written: the caller sends them the usual way). Else
        every chunk went, or MigrateError/OSError (the stream is then broken: the move
        fails, and the process goes on here). Nothing else writes to the stream meanwhile:
        its chunks are all here, and trio's side of it waits for `dumped`."""
        fs = self.fs
        if fs is None or self.closed:
            return False
        fd = os.dup(fs.stream.socket.fileno())      # ours: trio's may be closed meanwhile
        blocking(fd, True)      # one sendto a piece (sendpages.py); trio waits meanwhile
        try:
            try:
                sender = opener(fd)
            except MigrateError as exc:
                log.info("restore %d: its pages go from here (%s)", self.id, exc.message)
                return False
            try:
                for piece in cut:
                    if self.closed:
                        raise MigrateError(errno.ECANCELED, "the move is over")
                    lazy = isinstance(piece, LazyRun)
                    head = wire.FrameStream.split_head(
                        messages.Chunk(id=self.id, at=at, data=memoryview(b"")), "data",
                        len(piece))
                    _write_all(fd, head)
                    if lazy:
                        sender.send(piece.addr, piece.size)     # type: ignore[union-attr]
                    else:
                        _write_all(fd, piece)                   # type: ignore[arg-type]
                    at += len(piece)
            finally:
                sender.close()
        finally:
            try:
                blocking(fd, False)
            finally:
                os.close(fd)
        return True

    async def close(self) -> None:
        self.closed = True
        fs, self.fs = self.fs, None
        if fs is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(fs.stream)


def blocking(fd: int, on: bool) -> None:
    """sendpages.blocking with SEND_TIMEOUT."""
    sendpages.blocking(fd, on, SEND_TIMEOUT)


def _write_all(fd: int, data: Buffer) -> None:
    sendpages.write_all(fd, data, SEND_TIMEOUT)


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no connection within {CONNECT_TIMEOUT:g} s"
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return _why(cause.exceptions[-1])
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


"""A process coming home from a node: its pages on a connection of their own, straight
from the process to the master (the master's end of a direct stream).

    master         listens on the address node A reaches it at, one token (256 bits)
    master -> A    dump id, pid, links, host, port, token, to=id     (bpfs/master/moves.py)
    A -> master    open id, token; chunk id, at, data ...   on the connection; the process
                   writes each chunk's pages itself (bpfs/node/direct.py Route.write_from)
    A -> master    part (the header: total, consumed, direct), then `dumped` (empty)

Why: on the node's link every byte was read by the node daemon from the process, framed,
and written into the link, which also carries the node's every other message; the
master's loop then read it there. Straight, the process writes its pages into the
socket (one copy at the source) and the link carries the header alone.

`HomeTake` is node/direct.py's `Take` on the master's side, and checks the same: the
first connection that opens with this move's id and token is the stream (a wrong opening
is closed; after MAX_REFUSED of them, or none within TAKE_TIMEOUT, it stops listening,
and A, refused, sends on the link as before); then only `chunk`s of this id, each within
the frame limit (messages.DIRECT), in order and within the total (`Incoming`, by its
caller: bpfs/master/homecoming.py). The stream ending early is EPROTO; the master
closing it (the move failed, the ghost was killed) makes A's sending fail, and A lets
the process go on at its `resume`.
"""

from __future__ import annotations

import errno
import hmac
import logging
import secrets

import trio

from bpfs.errors import BpfsError, ProtocolError
from bpfs.wire import framing as wire, messages
from bpfs.wire.movemsgs import PART

log = logging.getLogger("bpfs.master.procs")

TAKE_TIMEOUT = 30.0          # listening for the stream at most
OPEN_TIMEOUT = 2.0           # a connection's `open`, from its accept
MAX_REFUSED = 8              # wrong openings before it stops listening
CHUNK_FRAME = PART + 4096    # a chunk's frame at most


class HomeTake:
    """One move's direct stream home: its listener, token, then its connection (`fs`)."""

    def __init__(self, mid: int, reuse: int) -> None:
        self.id = mid
        self.token = secrets.token_hex(32)
        self.reuse = reuse                  # chunks read into so many buffers in turn
        self.listener: trio.SocketListener | None = None
        self.fs: wire.FrameStream | None = None
        self.decided = trio.Event()         # opened, or never will
        self.scope = trio.CancelScope()
        self.refused = 0
        self.closed = False

    async def listen(self, host: str) -> int:
        """Listen on `host` (the master's address on the node's link); the port."""
        (self.listener,) = await trio.open_tcp_listeners(0, host=host, backlog=4)
        return self.listener.socket.getsockname()[1]

    async def run(self) -> None:
        """Accept the stream (a task of the master's; the move's end cancels it)."""
        try:
            with self.scope, trio.move_on_after(TAKE_TIMEOUT):
                while self.fs is None and self.refused < MAX_REFUSED:
                    assert self.listener is not None
                    stream = await self.listener.accept()
                    await self._check(stream)
        except (OSError, trio.ClosedResourceError) as exc:     # EMFILE...: the link's way
            log.warning("move %d: no direct stream home: %s", self.id, exc)
        finally:
            self._stop_listening()
            self.decided.set()

    async def _check(self, stream: trio.SocketStream) -> None:
        fs = wire.FrameStream(stream, wire.HANDSHAKE_MAX_FRAME, messages.DIRECT,
                              reuse=self.reuse)
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                msg = await fs.receive()
            if not isinstance(msg, messages.Open) or msg.id != self.id \
                    or not hmac.compare_digest(msg.token, self.token):
                raise ProtocolError("a wrong opening (another move, or a wrong token)")
        except (ProtocolError, EOFError, trio.TooSlowError, trio.BrokenResourceError,
                OSError) as exc:
            self.refused += 1
            log.warning("move %d: refused a direct stream: %s", self.id,
                        exc or type(exc).__name__)
            await trio.aclose_forcefully(stream)
            return
        fs.max_frame = CHUNK_FRAME
        if self.closed:             # the move ended meanwhile
            fs.stream.socket.close()
            return
        self.fs = fs

    async def opened(self) -> wire.FrameStream:
        """The stream, once the source says it opened it (EPROTO: it did not)."""
        with trio.move_on_after(OPEN_TIMEOUT):
            await self.decided.wait()
        if self.fs is None:
            raise BpfsError(errno.EPROTO, f"move {self.id}: the source sends its pages "
                            "straight, but opened no stream")
        return self.fs

    async def chunk(self, timeout: float) -> messages.Chunk:
        """The next chunk (EPROTO: the stream ended or sent anything else; ETIMEDOUT)."""
        fs = await self.opened()
        try:
            with trio.fail_after(timeout):
                msg = await fs.receive()
        except trio.TooSlowError:
            raise BpfsError(errno.ETIMEDOUT, f"move {self.id}: no chunk for {timeout:g} s") \
                from None
        except (EOFError, ProtocolError, trio.BrokenResourceError, OSError) as exc:
            raise BpfsError(errno.EPROTO, f"move {self.id}: the direct stream ended: "
                            f"{exc or type(exc).__name__}") from None
        if not isinstance(msg, messages.Chunk) or msg.id != self.id:
            raise BpfsError(errno.EPROTO, f"move {self.id}: the direct stream sent "
                            f"{messages.tag(type(msg))} of move {msg.id}")
        return msg

    def _stop_listening(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.socket.close()

    def close(self) -> None:
        """Stop listening, and end the stream (a source still sending fails)."""
        self.closed = True
        self.scope.cancel()
        self._stop_listening()
        fs, self.fs = self.fs, None
        self.decided.set()
        if fs is not None:
            fs.stream.socket.close()

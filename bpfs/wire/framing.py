"""The master <-> node wire protocol: framing, decoding limits, handshake, keys.

With bpfs/wire/messages.py, the only module that speaks msgpack for the protocol. Grammar:

    frame      := LENGTH(4 bytes, big endian) PAYLOAD(LENGTH bytes)
    PAYLOAD    := msgpack map with a string key "t" naming the message (messages.py)

Handshake (mutual HMAC-SHA256 challenge-response over the shared cluster key;
each side proves it knows the key before it learns anything):

    node   -> master  Hello(v=VERSION, nonce=Nn)                         32 random bytes
    master -> node    Challenge(v=VERSION, nonce=Nm,
                                mac=HMAC(key, "bpfs-master" Nn Nm))
    node   -> master  Auth(mac=HMAC(key, "bpfs-node" Nm Nn))
    master -> node    Ok()  |  Refused(errno=E, message=M)

The domain tags keep one side's answer from ever being replayed as the
other's. A version mismatch or a wrong MAC is refused (EACCES / EPROTO) and the
connection closed. After the handshake come the session messages of
bpfs/wire/messages.py, whose classes are the grammar of every message and its fields
(registration, heartbeats, migration).

Receiving: a frame larger than the stream's limit is refused from its length
prefix, before any of it is read (HANDSHAKE_MAX_FRAME until the handshake is
over); a stream that knows who is at the other end (`side`: set by `accept` and
`connect`, messages.HANDSHAKE until the handshake is over, then FROM_NODE or
FROM_MASTER) decodes the payload into that side's message classes, which checks
every field's type and bounds as it goes and builds no list or map longer than the
grammar allows (messages.py). A stream without a side (tests, tools) decodes plain
maps with msgpack's limits set from the frame and from messages.MAX_ITEMS (`unpack`).
Any fault raises ProtocolError (EPROTO) naming the message and the field: the caller
closes that one connection. No size the peer states is trusted for an allocation:
the stream reads at most RECEIVE_CHUNK bytes at a time.

A direct stream from node to node (a moving process's pages, bpfs/node/direct.py) has no
handshake: its first frame, `open` (within HANDSHAKE_MAX_FRAME), carries the one-time
token the target gave the master for it, and the target decodes every frame with
messages.DIRECT; `send_split` writes a chunk's data from where it is, and `reuse` reads
the big frames into a few buffers, in turn.

Deadlines: the whole handshake must be over within HANDSHAKE_TIMEOUT (a peer that
trickles one byte a second is cut at that deadline, not at each byte's).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
import threading
from typing import Any, Callable, TypeVar

import msgpack
import trio

from bpfs.errors import BpfsError, ProtocolError   # wire.ProtocolError, as callers know it
from bpfs.wire import messages

VERSION = 1
DEFAULT_PORT = 2223
HANDSHAKE_MAX_FRAME = 4096
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
NONCE_BYTES = 32
HANDSHAKE_TIMEOUT = 10.0
RECEIVE_CHUNK = 1 << 20         # bytes read at most at a time, whatever a frame claims
BATCH = 1 << 20                 # bytes of small frames joined into one write (send_many)
EAGER = 16                      # reads without a wait in a row, then a checkpoint

Message = messages.Msg
M = TypeVar("M", bound=messages.Msg)


class AuthError(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EACCES)


def pack(msg: Message | dict[str, Any]) -> bytes | bytearray:
    """A message's frame (a plain map's, for tests and tools, through msgpack)."""
    if isinstance(msg, messages.Msg):
        frame = messages.encode_after(msg, 4)
        frame[:4] = (len(frame) - 4).to_bytes(4, "big")
        return frame
    body = msgpack.packb(msg, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def unpack(body: bytes) -> dict[str, Any]:
    """Decode one payload as a plain map (a stream without a side): ProtocolError if it
    is not msgpack, is larger than its limits, or is not a map with a string "t"."""
    msg = messages.loads(body, ext=False)
    if type(msg) is not dict or type(msg.get("t")) is not str:
        raise ProtocolError("frame is not a message map with a string 't'")
    return msg


class FrameStream:
    """Length-prefixed msgpack messages over a trio stream.

    `receive` raises ProtocolError on an oversized or malformed frame, or (with `side`,
    a messages.Side: who is at the other end, in which phase) one that is not one of
    that side's messages; EOFError when the peer closed cleanly between frames.
    """

    def __init__(self, stream: trio.abc.Stream, max_frame: int = DEFAULT_MAX_FRAME,
                 side: messages.Side | None = None, reuse: int = 0) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.side = side
        # big frames' bodies read into `reuse` buffers kept, in turn: for a receiver done
        # with a message's views (a chunk's data) before it receives `reuse` more
        self.reuse = int(reuse)
        self._spares: list[bytearray] = []
        self._turn = 0
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self._sock = getattr(stream, "socket", None)    # a SocketStream's: written at once
        self._rest = b""        # the end of a frame `send_nowait` could not write whole
        # Writes from another thread (`send_threadsafe`) and trio's own writes take turns
        # on this lock; `_busy`: trio's send goes on across awaits (no other write then).
        self.thread_lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._eager = 0         # reads in a row that found data (`_receive_some`)

    async def send(self, msg: Message | dict[str, Any], timeout: float | None = None) -> None:
        """Send one message; `timeout`: trio.TooSlowError if it cannot all go in time."""
        await self._send(pack(msg), timeout)

    async def send_split(self, msg: Message, name: str, timeout: float | None = None) -> None:
        """Send `msg` whose last field `name` is big (a chunk's data) from where it is:
        the frame's head, then those bytes, one write each (no copy into a frame)."""
        head, data = messages.encode_split(msg, name)
        prefix = (len(head) + len(data)).to_bytes(4, "big")
        async with self._send_lock:
            rest, self._rest = self._rest, b""
            await self._send_all(rest + prefix + head, timeout)
            await self._send_all(data, timeout)

    @staticmethod
    def split_head(msg: Message, name: str, size: int) -> bytes:
        """The frame of `msg` up to its last field `name`'s bytes, `size` of them, which
        the caller writes itself right after (`send_split`'s two writes, the second one
        not ours: a moving process's pages, bpfs/node/direct.py)."""
        head, _ = messages.encode_split(msg, name, size)
        return (len(head) + size).to_bytes(4, "big") + head

    async def send_many(self, msgs: list[Message] | list[dict[str, Any]],
                        timeout: float | None = None) -> None:
        """Several messages in one write, up to BATCH bytes of them; a bigger frame (a
        piece of an image) is written as it is, not copied into a batch."""
        batch: list[bytes | bytearray] = []
        held = 0
        for msg in msgs:
            frame = pack(msg)
            if batch and held + len(frame) > BATCH:
                await self._send(b"".join(batch) if len(batch) > 1 else batch[0], timeout)
                batch, held = [], 0
            batch.append(frame)
            held += len(frame)
        if batch:
            await self._send(b"".join(batch) if len(batch) > 1 else batch[0], timeout)

    def send_nowait(self, msg: Message | dict[str, Any]) -> bool:
        """Write `msg` now, from synchronous code, if no other send is under way.

        True: it is on its way, written whole, or its end kept (`pending`) to go first with
        the next send or `flush`, which the caller must then make. False: nothing was
        written (another send holds the stream, the socket is full, or not a socket, or
        closed): send it with `send`. BrokenResourceError if the connection is broken.
        """
        fd = self._sock.fileno() if self._sock is not None else -1   # -1 once closed
        if fd < 0 or self._send_lock.locked() or self._rest:
            return False
        data = pack(msg)
        with self.thread_lock:
            if self._busy or self._rest:
                return False
            sent = self._write(fd, data)
            if sent:            # none written: the caller sends it, it is not kept here too
                self._rest = data[sent:]
        return sent > 0

    def send_threadsafe(self, msg: Message, ok: Callable[[], bool] | None = None
                        ) -> bool | None:
        """Write `msg` now from any thread, if no send is under way and `ok()` (called
        with the writes held off: the caller's own ordering rule).

        True: written whole. None: written in part, its end kept (`pending`): the caller
        must have trio's thread `flush`. False: nothing written (busy, full, closed,
        broken): send it from trio's thread. Why: a node's receiver thread sends `fork`
        without a trip through the event loop (bpfs/node/supervisor.py)."""
        data = pack(msg)
        with self.thread_lock:
            fd = self._sock.fileno() if self._sock is not None and not self._closed else -1
            if fd < 0 or self._busy or self._rest or (ok is not None and not ok()):
                return False
            try:
                sent = self._write(fd, data)
            except trio.BrokenResourceError:
                return False
            if not sent:
                return False
            self._rest = data[sent:]
        return True if sent == len(data) else None

    @property
    def pending(self) -> bool:
        """Part of a frame from `send_nowait` still waits to be written (see `flush`)."""
        return bool(self._rest)

    async def flush(self, timeout: float | None = None) -> None:
        """Write what `send_nowait` left, if anything."""
        await self._send(b"", timeout)

    @staticmethod
    def _write(fd: int, data: bytes) -> int:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send: {exc.strerror}") from exc

    async def _send(self, data: bytes, timeout: float | None) -> None:
        """A frame usually fits in the socket's buffer: written at once with one write(),
        without a lock wait, a cancel scope or a trip through the event loop (trio's
        send_all makes two: the lock's checkpoint and its own). Whatever does not fit,
        or any send while another waits, goes through trio (with `timeout`). What
        `send_nowait` left goes first."""
        fd = self._sock.fileno() if self._sock is not None else -1   # -1 once closed
        if fd >= 0 and not self._send_lock.locked():
            self._send_lock.acquire_nowait()
            try:
                with self.thread_lock:
                    data, self._rest = (self._rest + data if self._rest else data), b""
                    sent = self._write(fd, data) if data else 0
                    self._busy = sent < len(data)
                if sent < len(data):
                    await self._send_all(memoryview(data)[sent:], timeout)
            finally:
                self._idle()
                self._send_lock.release()
            return
        async with self._send_lock:
            with self.thread_lock:
                data, self._rest = (self._rest + data if self._rest else data), b""
                self._busy = bool(data)
            try:
                if data:
                    await self._send_all(data, timeout)
            finally:
                self._idle()

    def _idle(self) -> None:
        if self._busy:
            with self.thread_lock:
                self._busy = False

    async def _send_all(self, data: bytes | memoryview, timeout: float | None) -> None:
        if timeout is None:
            await self.stream.send_all(data)
        else:
            with trio.fail_after(timeout):
                await self.stream.send_all(data)

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = await self._receive_some(min(max(65536, n - len(self._buf)),
                                                 RECEIVE_CHUNK))
            if not chunk:
                return False
            self._buf += chunk
        return True

    async def _receive_some(self, size: int) -> bytes:
        """What the socket holds (up to `size` bytes; b"" at its end), read at once if
        there is any, without trio's two checkpoints around a read (one more pass of the
        loop per frame: a node's fork loop sends the master two frames a fork); waited
        for with wait_readable if none. Every EAGER reads that did not wait, a checkpoint
        all the same (a peer that keeps the socket full does not starve the others)."""
        if self._sock is None:
            return await self.stream.receive_some(size)
        while True:
            fd = self._sock.fileno()        # -1 once closed (never a reused number)
            if fd < 0:
                raise trio.ClosedResourceError("the stream is closed")
            try:
                chunk = os.read(fd, size)
            except BlockingIOError:
                self._eager = 0
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive: {exc.strerror}") from exc
            self._eager += 1
            if self._eager >= EAGER:
                self._eager = 0
                await trio.lowlevel.checkpoint()
            return chunk

    async def receive(self) -> Any:
        if not await self._fill(4):
            if self._buf:
                raise ProtocolError("connection closed inside a frame header")
            raise EOFError("peer closed the connection")
        length = int.from_bytes(self._buf[:4], "big")
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        if length > RECEIVE_CHUNK and self._sock is not None:
            body: bytes | bytearray | memoryview = await self._receive_big(length)
        else:
            if not await self._fill(4 + length):
                raise ProtocolError("connection closed inside a frame")
            body = bytes(self._buf[4:4 + length])
            del self._buf[:4 + length]
        if self.side is None:
            return unpack(body)
        return self.side.decode(body)

    async def _receive_big(self, length: int) -> bytearray | memoryview:
        """A big frame's body (a piece of an image), read from the socket straight into a
        buffer of its size: one copy, where growing the stream's buffer made three. Only
        the length prefix, checked against the limit, was trusted for it. With `reuse`,
        the buffer is the last big frame's if it is large enough (no fresh pages)."""
        if self.reuse:
            k, self._turn = self._turn % self.reuse, self._turn + 1
            if k == len(self._spares):
                self._spares.append(bytearray(length))
            elif len(self._spares[k]) < length:
                self._spares[k] = bytearray(length)
            body: bytearray | memoryview = memoryview(self._spares[k])[:length]
        else:
            body = bytearray(length)
        view = memoryview(body)
        got = min(len(self._buf) - 4, length)
        view[:got] = self._buf[4:4 + got]
        del self._buf[:4 + got]
        while got < length:
            n = await self._sock.recv_into(view[got:], length - got)
            if not n:
                raise ProtocolError("connection closed inside a frame")
            got += n
        return body

    async def expect(self, kind: type[M]) -> M:
        """The next message, which must be a `kind` (ProtocolError); a Refused is raised
        as the BpfsError it carries."""
        msg = await self.receive()
        if isinstance(msg, messages.Refused):
            raise BpfsError(msg.errno, msg.message)
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {messages.tag(kind)!r}, got "
                                f"{messages.tag(type(msg))!r}")
        return msg

    def retire(self) -> None:
        """No `send_threadsafe` from now on: the stream is about to be closed (its fd
        number may be reused at once)."""
        with self.thread_lock:
            self._closed = True

    async def aclose(self) -> None:
        self.retire()
        await self.stream.aclose()


# ---- keys -------------------------------------------------------------------

def create_key(path: str) -> bytes:
    """Write a fresh random cluster key to `path` with mode 0600 (atomically)."""
    key = secrets.token_hex(32).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def load_key(path: str) -> bytes:
    """Read the cluster key; refuse one that group or others may read (EACCES)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise BpfsError(exc.errno or errno.ENOENT, f"cluster key {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BpfsError(errno.EACCES, f"cluster key {path} is readable by others (chmod 600 it)")
    if len(key) < 16:
        raise BpfsError(errno.EINVAL, f"cluster key {path} is too short")
    return key


def _mac(key: bytes, tag: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, tag + a + b, hashlib.sha256).digest()


# ---- handshake ----------------------------------------------------------------

async def client_handshake(fs: FrameStream, key: bytes) -> None:
    """Node side. Raises AuthError if the master does not know the key or refuses us."""
    nn = secrets.token_bytes(NONCE_BYTES)
    await fs.send(messages.Hello(v=VERSION, nonce=nn))
    ch = await fs.expect(messages.Challenge)
    nm = ch.nonce
    if not hmac.compare_digest(_mac(key, b"bpfs-master", nn, nm), ch.mac):
        raise AuthError("the master does not know the cluster key")
    await fs.send(messages.Auth(mac=_mac(key, b"bpfs-node", nm, nn)))
    try:
        await fs.expect(messages.Ok)
    except ProtocolError:
        raise
    except BpfsError as exc:
        raise AuthError(f"master refused us: {exc.message}") from None


async def server_handshake(fs: FrameStream, key: bytes) -> None:
    """Master side. Raises AuthError (after telling the peer) on a wrong key or version."""
    hello = await fs.expect(messages.Hello)
    if hello.v != VERSION:
        await _refuse(fs, errno.EPROTO, f"protocol version {hello.v!r} unsupported, want {VERSION}")
        raise ProtocolError(f"peer speaks protocol version {hello.v!r}")
    nn = hello.nonce
    nm = secrets.token_bytes(NONCE_BYTES)
    await fs.send(messages.Challenge(v=VERSION, nonce=nm, mac=_mac(key, b"bpfs-master", nn, nm)))
    auth = await fs.expect(messages.Auth)
    if not hmac.compare_digest(_mac(key, b"bpfs-node", nm, nn), auth.mac):
        await _refuse(fs, errno.EACCES, "wrong cluster key")
        raise AuthError("peer does not know the cluster key")
    await fs.send(messages.Ok())


async def _refuse(fs: FrameStream, err: int, message: str) -> None:
    try:
        await fs.send(messages.Refused(errno=err, message=message))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def connect(host: str, port: int, key: bytes, *,
                  local_address: str | None = None) -> FrameStream:
    """Open an authenticated connection to the master (node side), from `local_address`
    if given (the master registers the node at the address it sees)."""
    stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    fs = FrameStream(stream, HANDSHAKE_MAX_FRAME, messages.HANDSHAKE)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await client_handshake(fs, key)
    except BaseException:
        await stream.aclose()
        raise
    fs.max_frame, fs.side = DEFAULT_MAX_FRAME, messages.FROM_MASTER
    return fs


async def accept(stream: trio.abc.Stream, key: bytes) -> FrameStream:
    """Authenticate a freshly accepted connection (master side); the caller closes on error."""
    fs = FrameStream(stream, HANDSHAKE_MAX_FRAME, messages.HANDSHAKE)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await server_handshake(fs, key)
    except EOFError:
        raise AuthError("peer hung up during the handshake (it may hold another key)") from None
    except trio.TooSlowError:
        raise ProtocolError("handshake timed out", errno.ETIMEDOUT) from None
    fs.max_frame, fs.side = DEFAULT_MAX_FRAME, messages.FROM_NODE
    return fs

"""A master process moving to a node: its pages straight into the target's direct stream,
written by the process itself (mixed into `Moves`, bpfs/master/moves.py).

    master -> B  take id                      while P is stopped and dumped (bpfs/master/tonode.py)
    B -> master  taking id, port, token
    master -> B  (a connection of its own)    open id, token; then chunk id, at, data ...
    master -> B  streamed, restore            the image's header, on the node's link
    B -> master  restored | failed

Why: a master process's big runs were read into the master's memory (process_vm_readv, in
trio's thread) and written from there into the node's link, piece after piece: two copies
at the source, one after the other in the thread that also serves every other message.
Now, as between nodes (bpfs/node/direct.py), the stopped process is given the socket
and the tracer injects `sendto` of each 8 MiB piece from its own pages
(bpfs/migrate/sendpages.py): one copy, in the tracer thread, while trio's waits. The
tracer does one frame a request, SENDS_AHEAD queued, so other ghosts' work goes in
between; a 1 GB process does not hold it for a second.

Not straight (the old way, every byte on the link as a `piece`): a process without big
runs (RssAnon under DIRECT_MIN: not worth a connection), a node that takes nothing or
cannot be reached within CONNECT_TIMEOUT. A process that cannot send its own pages (its
own seccomp filter, no fd free) has them sent from here, on the same stream.

Failure: the node's `failed` or its end breaks the stream: the injected call fails
(EPIPE, ECONNRESET; the socket is shut down on our side too, so a call under way ends),
the process gets its fd, page, mask and registers back (`PageSender.close`), and the move
fails as any other: the node discards what it built (`abort`), P goes on here as it was.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import deque
from typing import Any

import trio

from bpfs import procstatus
from bpfs.master.migrations import Migration, _serialize, wait_future
from bpfs.migrate import sendpages
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.imagebuf import pieces
from bpfs.migrate.lazyrun import LazyRun, materialize
from bpfs.wire import framing as wire, messages
from bpfs.wire.movemsgs import PART

log = logging.getLogger("bpfs.master.procs")

CONNECT_TIMEOUT = 1.0       # the master connecting to the target's listener
SEND_TIMEOUT = 5.0          # a piece written to a target that stopped reading (the
                            # tracer waits in it: short, a live node takes 8 MiB in ms)
SENDS_AHEAD = 2             # frames queued for the tracer at once
DIRECT_MIN = 16 << 20       # anonymous memory from which the pages go straight


class OutRoute:
    """The master's end of one direct stream to a node's restore `id` (`fs` None: the
    pages go on the link)."""

    def __init__(self, mid: int) -> None:
        self.id = mid
        self.fs: wire.FrameStream | None = None
        self.to = "?"
        self.decided = trio.Event()     # opened, or never will
        self.closed = False             # the move is over (or goes on the link)

    async def open(self, host: str, port: int, token: str) -> None:
        """Connect and open within CONNECT_TIMEOUT, else leave `fs` None."""
        self.to = f"{host}:{port}"
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
                fs = wire.FrameStream(stream, wire.HANDSHAKE_MAX_FRAME)
                await fs.send(messages.Open(id=self.id, token=token))
            if self.closed:             # the move ended meanwhile
                raise trio.BrokenResourceError("the move is over")
            self.fs = fs
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("restore %d: cannot reach %s (%s): its pages go on the link",
                        self.id, self.to, exc or "timed out")
            if stream is not None:
                await trio.aclose_forcefully(stream)

    def shutdown(self) -> None:
        """Break the stream (a send under way in the process ends: EPIPE)."""
        if self.fs is not None:
            try:
                self.fs.stream.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    async def close(self) -> None:
        self.closed = True
        fs, self.fs = self.fs, None
        if fs is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(fs.stream)


def worth_a_stream(pid: int) -> bool:
    """Whether the process `pid` holds enough anonymous memory to send it straight."""
    try:
        return int(procstatus.read(pid).get("RssAnon", "0 kB").split()[0]) << 10 >= DIRECT_MIN
    except (OSError, ValueError, IndexError):
        return False


class OutPages:
    """Mixed into Moves (which brings the tracer, `_take`, `_restore` and its steps)."""

    tracer: Any

    async def _open_route(self, m: Migration, route: OutRoute) -> None:
        """Ask `m.node` to take the pages, and connect (nothing on any failure); a task
        of the master's: the move waits for `route.decided`."""
        try:
            where = await self._take(m)                     # type: ignore[attr-defined]
            if where and not route.closed:
                await route.open(where["host"], where["port"], where["token"])
        except Exception:           # noqa: BLE001 - a bug: the link's way still works
            log.exception("move %d: opening a direct stream to node %d", m.id, m.node)
        finally:
            route.decided.set()

    async def _restore_out(self, m: Migration, image: Any, route: OutRoute) -> str:
        """`_restore`, the pages straight into `route` if it opened; how they went."""
        from bpfs.master.migrations import RESTORE_TIMEOUT
        if m.ghost_gone:
            raise MigrateError(errno.ESRCH, f"process {m.pid} was killed before it moved")
        data = await _serialize(image)
        parts = data if isinstance(data, list) else [data]
        cut = list(pieces(parts[2:], PART)) if len(parts) > 2 else []
        if route.fs is None or sum(map(len, parts[:2])) > PART \
                or not any(isinstance(p, LazyRun) for p in cut):
            await route.close()
            await self._restore(m, image, data)             # type: ignore[attr-defined]
            return "on the link"
        try:
            with trio.fail_after(RESTORE_TIMEOUT):
                header = memoryview(b"".join(map(bytes, parts[:2])))
                at = await self._send_restore(m, header,  # type: ignore[attr-defined]
                                              sum(map(len, parts)))
                how = await self._send_out(m, route, cut, at)
                await self._negotiate(m, image)             # type: ignore[attr-defined]
        except trio.TooSlowError:
            route.shutdown()
            await self._abort(m)                            # type: ignore[attr-defined]
            raise MigrateError(errno.ETIMEDOUT, f"node {m.node} did not restore in time") from None
        except BaseException:
            route.shutdown()
            await self._abort(m)                            # type: ignore[attr-defined]
            raise
        finally:
            await route.close()
        return how

    async def _send_out(self, m: Migration, route: OutRoute, cut: list[Any], at: int) -> str:
        """The chunks `cut` from offset `at`: by the process itself, a frame a tracer
        request, or from here if it cannot (module doc)."""
        assert route.fs is not None
        fd = os.dup(route.fs.stream.socket.fileno())  # ours: trio's may close meanwhile
        sendpages.blocking(fd, True, SEND_TIMEOUT)
        sender = sendpages.PageSender(m.pid, fd, SEND_TIMEOUT)
        try:
            try:
                await wait_future(self.tracer.submit(_enter, sender))
            except MigrateError as exc:
                log.info("move %d: pid %d's pages go from the master (%s)", m.id, m.pid,
                         exc.message)
                sendpages.blocking(fd, False, SEND_TIMEOUT)
                await self._send_here(route, cut, at)
                return "straight, from the master"
            try:
                await self._frames(route, sender, cut, at)
            finally:
                with trio.CancelScope(shield=True):
                    await wait_future(self.tracer.submit(sender.close))
            return "straight, by the process"
        except BaseException:
            route.shutdown()
            raise
        finally:
            try:
                sendpages.blocking(fd, False, SEND_TIMEOUT)
            except OSError:
                pass
            os.close(fd)

    async def _frames(self, route: OutRoute, sender: Any, cut: list[Any], at: int) -> None:
        """One tracer request a chunk, SENDS_AHEAD of them queued; on a failure the stream
        is broken first, so those queued behind fail at once."""
        queued: deque[Any] = deque()
        try:
            for piece in cut:
                head = wire.FrameStream.split_head(
                    messages.Chunk(id=route.id, at=at, data=memoryview(b"")), "data",
                    len(piece))
                queued.append(self.tracer.submit(_frame, sender, head, piece))
                at += len(piece)
                while len(queued) >= SENDS_AHEAD:
                    await wait_future(queued.popleft())
            while queued:
                await wait_future(queued.popleft())
        except BaseException:
            route.shutdown()
            with trio.CancelScope(shield=True):
                for fut in queued:
                    try:
                        await wait_future(fut)
                    except Exception:       # noqa: BLE001 - the first failure is raised
                        pass
            raise

    @staticmethod
    async def _send_here(route: OutRoute, cut: list[Any], at: int) -> None:
        assert route.fs is not None
        for piece in cut:
            data = materialize(piece)
            await route.fs.send_split(messages.Chunk(id=route.id, at=at,  # type: ignore[arg-type]
                                                     data=data), "data", SEND_TIMEOUT)
            at += len(data)


def _enter(sender: sendpages.PageSender) -> None:
    """In the tracer thread: the process given the socket (MigrateError: it cannot)."""
    from bpfs.migrate import ghost_park as gp
    try:
        sender.__enter__()
    except gp.Gone:
        raise MigrateError(errno.ESRCH, "the process ended", sender.pid) from None


def _frame(sender: sendpages.PageSender, head: bytes, piece: Any) -> None:
    """In the tracer thread: one chunk's frame; the process's end as ESRCH."""
    from bpfs.migrate import ghost_park as gp
    try:
        sender.send_frame(head, piece)
    except gp.Gone:
        raise MigrateError(errno.ESRCH, "the process ended while it sent its pages", sender.pid) \
            from None

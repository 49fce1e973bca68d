"""The node's side of /bproc on a node: its mount, and its requests to the master.

    client = FsClient(serve_fs)          serve_fs: bpfs.fs.remote.serve, given by the
                                         command line (bpfs/node may not import bpfs/fs)
    await client.mount(path, nursery)    after `welcome`: mount at the master's mount point
    client.attach(session) / detach()    the connection requests go over, while it lasts
    reply = await client.ask(msg)        one fs request, its `fs_reply`
    await client.tell(msg)               one without a reply (fs_release)

The filesystem (bpfs/fs/remote.py) outlives connections: it is mounted once, at the
first `welcome` that names a mount point, and stays until the daemon stops (the task
that serves it unmounts it when cancelled). Between connections a request is ENOTCONN;
when a connection ends, the requests waiting on it are ENOTCONN too. A waiting request
whose caller is interrupted (`interrupted()`, polled every INTERRUPT_POLL seconds) is
EINTR, and the master is told to drop it (`fs_cancel`).

The mount point must be an absolute, normal path (the master's abspath'd mount); one
that is not, or that cannot be mounted, is logged and the node goes on without /bproc.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from typing import Any, Awaitable, Callable

import trio

from bpfs.errors import BpfsError
from bpfs.wire import messages

log = logging.getLogger("bpslave")

INTERRUPT_POLL = 0.2        # seconds between looks at a waiting caller's pending signals

ServeFs = Callable[..., Awaitable[None]]   # serve(path, client, task_status=...)


class FsClient:
    def __init__(self, serve_fs: ServeFs | None) -> None:
        self.serve_fs = serve_fs
        self.mounted: str | None = None
        self.number: int | None = None      # ours, for `self` (bpfs/fs/remote.py)
        self.session: Any = None            # bpfs.node.session.Session while connected
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[messages.FsReply]] = {}

    def next_id(self) -> int:
        return next(self._ids)

    async def mount(self, path: str | None, nursery: trio.Nursery) -> None:
        """Serve /bproc at `path` (once; later `welcome`s naming another path are logged)."""
        if path is None or self.serve_fs is None:
            return
        if self.mounted is not None:
            if path != self.mounted:
                log.warning("the master's mount point is now %.200r; /bproc stays at %s",
                            path, self.mounted)
            return
        if not (path.startswith("/") and os.path.normpath(path) == path and "\0" not in path):
            log.error("not mounting the master's filesystem at %.200r: not an absolute, "
                      "normal path", path)
            return
        try:
            await nursery.start(self.serve_fs, path, self)
        except (BpfsError, OSError, RuntimeError) as exc:
            log.error("cannot mount the master's filesystem at %s: %s", path, exc)
            return
        self.mounted = path
        log.info("serving the master's filesystem at %s", path)

    def attach(self, session: Any) -> None:
        self.session = session

    def detach(self) -> None:
        """The connection ended: what waits on it is ENOTCONN."""
        self.session = None
        for channel in self._waiting.values():
            channel.close()
        self._waiting.clear()

    def on_reply(self, msg: messages.FsReply) -> None:
        channel = self._waiting.pop(msg.id, None)
        if channel is None:
            return              # dropped: its caller was interrupted
        try:
            channel.send_nowait(msg)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def ask(self, msg: Any, interrupted: Callable[[], bool] | None = None
                  ) -> messages.FsReply:
        """Send `msg` (an fs request) and wait for its reply (see the module doc)."""
        session = self.session
        if session is None:
            raise BpfsError(errno.ENOTCONN, "not connected to the master")
        send, receive = trio.open_memory_channel[messages.FsReply](1)
        self._waiting[msg.id] = send
        try:
            await session.send(msg)
            while True:
                with trio.move_on_after(INTERRUPT_POLL if interrupted else float("inf")):
                    return await receive.receive()
                if interrupted is not None and interrupted():
                    await self._cancel(session, msg.id)
                    raise BpfsError(errno.EINTR, "interrupted")
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError):
            raise BpfsError(errno.ENOTCONN, "the connection to the master ended") from None
        finally:
            self._waiting.pop(msg.id, None)

    async def tell(self, msg: Any) -> None:
        """Send `msg`, which has no reply (fs_release); dropped without a connection."""
        session = self.session
        if session is None:
            return
        try:
            await session.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _cancel(self, session: Any, request: int) -> None:
        self._waiting.pop(request, None)
        try:
            await session.send(messages.FsCancel(id=request))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

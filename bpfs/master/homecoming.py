"""A running process back from a node into its ghost (`move master`): its image streams
into the ghost as the node's `part`s come (mixed into `Moves`, bpfs/master/moves.py).

    first part (total, header) -> tracer.stream_in(pid, header)   regions built in the
                                                                  ghost, which stays a ghost
    each part, then `dumped`   -> tracer.write_in(pid, runs)      written where they go
    whole                      -> links connected, tracer.restore_in(pid, header, links)

Why: the image was put together in the master's fresh memory, then written into the
ghost's fresh memory, so every page was touched twice, the second time only after the last
byte had come (4 s for 1 GB, bench/results-move.md). Now each part is written from the
frame it came in straight into the page the process will use, by the tracer thread
(which holds the ghost) while the next part travels; when `dumped` is in, only files,
registers and the last steps are left (bpfs/migrate/ghost_stream.py says how the ghost
stays a working ghost until then).

A move that fails before the end (the node's `failed`, an image longer than its total
(EFBIG) or shorter (EPROTO), no part for PART_TIMEOUT, the ghost killed) aborts the stream
(`abort_in`): what was built in the ghost goes, and it is the ghost it was, P going on on
its node (`resume`). An image whose header is not in its first part, or that comes in one
`dumped`, is put together first and restored as before (`_gathered`, `_into_ghost`).

Everything from the node is checked where frames are (bpfs/wire: a part's size, the
total's bound) and by `Incoming` (order, the total, the header); the runs are the header's,
which `loads` checked (each inside its region); the tracer writes only into the regions it
built (EFAULT otherwise).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from bpfs.errors import BpfsError
from bpfs.master.homestream import HomeTake
from bpfs.master.migrations import Migration, wait_future
from bpfs.migrate.imagebuf import Incoming
from bpfs.model import Cluster, Proc, StdioLinks
from bpfs.wire import messages

log = logging.getLogger("bpfs.master.procs")

MAX_MOVE_IMAGE = 64 << 30       # bytes of one dumped image the master accepts
PART_TIMEOUT = 30.0             # a stream home with no part for so long fails
WRITES_AHEAD = 3                # a part is taken while fewer are handed to the tracer
MAX_HOMES = 4096
INLINE_LOADS = 8 << 20          # images loaded in trio's thread, not a worker's


@dataclass(frozen=True)
class Home:
    """The stdio links the master made for a process that came back into its ghost: its
    server, where its stdin link started, and the socket inodes it got (still its fds 0-2
    if the process has not changed them)."""
    links: StdioLinks
    base: int
    inodes: dict[int, int]

    def still_of(self, pid: int) -> bool:
        try:
            return all(os.stat(f"/proc/{pid}/fd/{n}").st_ino == ino
                       for n, ino in self.inodes.items())
        except OSError:
            return False


class HomeComing:
    """Mixed into Moves (which brings the tracer, the cluster and, from ToNode,
    `_next_of_dump`)."""

    _next_of_dump: Any

    cluster: Cluster
    tracer: Any
    link_host: str
    _home: dict[int, Home]
    _spawn: Any

    def __init__(self) -> None:
        super().__init__()
        self._home_takes: dict[int, HomeTake] = {}     # direct streams home, by move id
        self.local_of: Any = lambda node: None          # the master's address on a link

    async def _take_home(self, d: Migration) -> dict[str, Any]:
        """Listen for the pages of move `d` straight from its process (homestream.py):
        the `dump`'s fields saying where ({}: on the link, as before)."""
        host = self.local_of(d.node)
        if host is None:
            return {}
        take = HomeTake(d.id, WRITES_AHEAD + 1)
        try:
            port = await take.listen(host)
        except OSError as exc:
            log.info("move %d: no direct stream home (%s)", d.id, exc)
            return {}
        self._home_takes[d.id] = take
        self._spawn(take.run)
        return {"host": host, "port": port, "token": take.token, "to": d.id, "big_only": True}

    def _end_take_home(self, d: Migration) -> None:
        take = self._home_takes.pop(d.id, None)
        if take is not None:
            take.close()

    async def _home_from(self, d: Migration, p: Proc, first: messages.Part | messages.Dumped,
                         consumed: int, deadline: float) -> None:
        """P's image from its node into its ghost: streamed if it can be (module doc)."""
        if isinstance(first, messages.Dumped):          # small: all in one message
            await self._into_ghost(d, p, first.image, consumed)
            return
        image = incoming_image(d, first)
        header = image.image()
        take = None
        if first.direct:                # its pages come straight (homestream.py)
            take = self._home_takes.get(d.id)
            if take is None or header is None or image.got != image.header_end:
                raise BpfsError(errno.EPROTO, f"node {d.node} sends move {d.id}'s pages "
                                "straight, unasked, or more than its header first")
        if header is None:                              # a huge header: put together
            image.keep_everything(first.data)
            data = await self._gathered(d, image, deadline)
            await self._into_ghost(d, p, data, consumed)
            return
        now, later = await wait_future(self.tracer.stream_in(d.pid, header))
        try:
            await self._stream(d, image, first, deadline, take)
            await self._restore_home(d, p, header, consumed)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await wait_future(self.tracer.abort_in(d.pid))
                except BpfsError as exc:
                    log.warning("move %d: undoing the stream into ghost %d: %s", d.id,
                                d.pid, exc)
            raise
        log.info("move %d: %d MB of pid %d written into its ghost as they came (%s), %d "
                 "kB at the end", d.id, now >> 20, d.pid,
                 "straight from the process" if take else "on the link", later >> 10)

    async def _stream(self, d: Migration, image: Incoming, first: messages.Part,
                      deadline: float, take: HomeTake | None = None) -> None:
        """Each part's runs into the ghost as it comes (the first's after its header),
        up to `dumped`: EFBIG beyond the total, EPROTO short of it. The next part is
        taken while the tracer still has up to WRITES_AHEAD - 1 to write, so it goes from
        one to the next without waiting for this thread (whose wake-ups are slow on a
        busy machine); each part's frame lives until it is written."""
        at = image.header_end
        assert at is not None
        data: Any = memoryview(first.data)[at:]
        writes: deque[Any] = deque()
        last = False
        try:
            while True:
                if len(data):
                    writes.append(self.tracer.write_in(d.pid, image.runs_in(at, data)))
                while writes and (last or len(writes) >= WRITES_AHEAD):
                    await wait_future(writes.popleft())
                if last:
                    break
                if take is not None:            # straight: chunks, then an empty `dumped`
                    chunk = await take.chunk(PART_TIMEOUT)
                    at, data = chunk.at, chunk.data
                    image.take(at, data)        # in order, within the total (EFBIG)
                    last = image.complete
                else:
                    msg = await self._next_of_dump(d, min(deadline,
                                                          trio.current_time() + PART_TIMEOUT))
                    last = isinstance(msg, messages.Dumped)
                    at, data = image.got, msg.image if last else msg.data  # type: ignore[union-attr]
                    image.take(at, data)        # in order, within the total (EFBIG)
        finally:
            for fut in writes:  # the abort that follows is queued behind them
                fut.add_done_callback(lambda f: f.exception())
        if take is not None:
            await self._straight_over(d, deadline)
        if not image.complete:
            raise BpfsError(errno.EPROTO, f"node {d.node} sent {image.got} bytes of an "
                            f"image of {image.total}")

    async def _straight_over(self, d: Migration, deadline: float) -> None:
        """The source's `dumped` after its last chunk: empty (EPROTO: pages on the link
        too, or another part)."""
        msg = await self._next_of_dump(d, deadline)
        if not isinstance(msg, messages.Dumped) or len(msg.image):
            raise BpfsError(errno.EPROTO, f"node {d.node} sent pages of move {d.id} on "
                            "its link that went straight")

    async def _gathered(self, d: Migration, image: Incoming, deadline: float
                        ) -> bytes | memoryview:
        """The whole image, its parts put in place as they come (within the total)."""
        while True:
            msg = await self._next_of_dump(d, deadline)
            image.take(image.got, msg.data if isinstance(msg, messages.Part) else msg.image)
            if isinstance(msg, messages.Dumped):
                return image.view()             # EINVAL if shorter than announced

    async def _into_ghost(self, d: Migration, p: Proc, data: bytes | memoryview,
                          consumed: int | None) -> None:
        from bpfs.migrate import loads
        # a small image's loads (0.3-0.4 ms a MB: its runs are views) costs less than a
        # hand-over to a worker thread and back
        image = loads(data) if len(data) <= INLINE_LOADS else \
            await trio.to_thread.run_sync(loads, data)
        await self._restore_home(d, p, image, consumed)

    async def _restore_home(self, d: Migration, p: Proc, image: Any,
                            consumed: int | None) -> None:
        """Its links made again from here, then `restore_in` (of a streamed image, or a
        whole one): it runs on the master."""
        from bpfs.master.homelinks import connect_links
        fds = await connect_links(p, self.link_host, consumed or 0)
        # out of procs/ before it runs here (it may ask where it is at once); back if not
        self.cluster.proc_moved(d.pid, None)
        try:
            try:
                await wait_future(self.tracer.restore_in(d.pid, image, fds,
                                                         close_others=True))
            except BaseException:
                self.cluster.move_undone(p)
                raise
            if p.links is not None and fds:
                self._remember_home(d.pid, Home(p.links, consumed or 0, {
                    n: os.fstat(fd).st_ino for n, fd in fds.items()}))
        finally:
            for fd in set(fds.values()):
                os.close(fd)
        d.started = True

    def _remember_home(self, pid: int, home: Home) -> None:
        """A process back on the master keeps its links: its next move out makes them
        again from where it is (no relay). Bounded: the oldest are forgotten."""
        self._home[pid] = home
        while len(self._home) > MAX_HOMES:
            self._home.pop(next(iter(self._home)))


def incoming_image(d: Migration, first: messages.Part) -> Incoming:
    """Where an image coming in parts is taken (EPROTO: the first part says no total)."""
    if first.total is None:
        raise BpfsError(errno.EPROTO, f"node {d.node}: the first part of move {d.id} says "
                        "no total")
    image = Incoming(first.total, MAX_MOVE_IMAGE)
    image.take(0, first.data)
    return image

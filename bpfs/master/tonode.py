"""A running process moving from node A to node B, master side: its image's way.

    master -> A  dump id, pid, links, way   (bpfs/master/moves.py) and at once:
    master -> B  take id                     may its pages come straight from A?
    B -> master  taking id, port, token      (or failed, or nothing in TAKE_TIMEOUT: no)
    master -> A  way id, pid [, host, port, token, to]   (none: through the master)
    A -> master  part (the first: total, consumed[, direct]) ... dumped
    master -> B  again, streamed, restore (the first part), [piece ...], then `restored`

The `take` goes while A dumps (its answer took a round trip before the `dump` went):
A waits for the `way` only if its image has DIRECT_MIN bytes of pages or more
(bpfs/node/mover.py); a smaller one comes through the master at once, in one message,
and B, which took nothing, ends its take at the restore. The master reads B's answers
to the restore only once the `way` went (`took`).

Straight (A's first part says `direct`): that part is the image's header, which the
master passes on as the restore's first piece and keeps (for the file contents B may
ask for), and A sends the pages to B itself (bpfs/node/direct.py); its `dumped` then
holds nothing. Else (B took nothing, or A could not reach it within a second) every part
goes on to B as a `piece` as it comes (`_pass_on`), as before. Either way the master
alone decides: B's `restored` moves P to B in the table, A gets `drop`; on any failure
B gets `abort` (it discards what it built and closes its stream, so A, if still sending,
fails too) and A gets `resume` (bpfs/master/moves.py `_node_to`).

Errors: as the move's (EPROTO a source whose parts do not add up, ETIMEDOUT, and the
target's `failed`).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import trio

from bpfs.errors import BpfsError
from bpfs.master.homecoming import incoming_image
from bpfs.master.migrations import Migration, Reply
from bpfs.model import Proc, StdioLinks
from bpfs.wire import execreq, messages

log = logging.getLogger("bpfs.master.procs")

TAKE_TIMEOUT = 2.0              # `take` sent -> `taking`; else the parts come here


class ToNode:
    """Mixed into ProcService through Moves (which brings `_next_of_dump`'s callers)."""

    _migrations: dict[int, Migration]
    _ids: Any
    host_of: Any

    def _target(self, d: Migration, p: Proc, target: int) -> Migration:
        """The restore on `target` of the process `d` dumps (registered: B's answers
        about it come to it from now on; its links are set once the dump is in)."""
        send, receive = trio.open_memory_channel[Reply](64)
        m = Migration(next(self._ids), target, d.pid, d.caller, _links(p)[0], send, receive,
                      cmd=p.cmd)

        def started() -> None:              # at `restored`: it runs on `target` now
            self.back_home(d.pid, target)                   # type: ignore[attr-defined]
            self.cluster.proc_moved(d.pid, target, m.id)    # type: ignore[attr-defined]
            p.stdin_base = m.again or 0
            d.started = True
        m.on_started = started
        self._migrations[m.id] = m
        return m

    def _ask_way(self, d: Migration, m: Migration) -> None:
        """`take` to the target, then `way` to the source with its answer (a task: the
        source dumps meanwhile; cancelled, `m.taking`, if the move fails first)."""
        m.took, m.taking = trio.Event(), trio.CancelScope()
        self._spawn(self._way, d, m)                        # type: ignore[attr-defined]

    async def _way(self, d: Migration, m: Migration) -> None:
        assert m.took is not None and m.taking is not None
        try:
            with m.taking:
                where = await self._take(m)
                await self.send_node(d.node, messages.Way(  # type: ignore[attr-defined]
                    id=d.id, pid=d.pid, **where))
        except BpfsError as exc:
            log.info("move %d: no way sent to node %d: %s", d.id, d.node, exc)
        finally:
            m.took.set()

    async def _take(self, m: Migration) -> dict[str, Any]:
        """Ask the target to take the pages straight: the `dump`'s fields saying where
        ({}: through the master)."""
        host = self.host_of(m.node)
        if host is None:
            return {}
        try:
            m.streamed = True               # it may hold a stream for it: `abort` ends it
            await self.send_node(m.node, messages.Take(id=m.id))  # type: ignore[attr-defined]
            with trio.fail_after(TAKE_TIMEOUT):
                reply = await m.receive.receive()
        except (BpfsError, trio.TooSlowError) as exc:
            log.info("move to node %d: no direct stream (%s)", m.node, exc or "timed out")
            return {}
        if not isinstance(reply, messages.Taking):
            log.info("node %d takes no direct stream: %s", m.node,
                     getattr(reply, "message", type(reply).__name__))
            return {}
        m.direct = True
        return {"host": host, "port": reply.port, "token": reply.token, "to": m.id}

    async def _to_node(self, d: Migration, m: Migration, p: Proc,
                       first: messages.Part | messages.Dumped, consumed: int,
                       deadline: float) -> tuple[int, int]:
        """Restore the dump on `m.node` with `p`'s links as they are now (a relay's, if
        the source started one: `relayed`); (bytes through the master, bytes straight)."""
        m.req, m.host = _links(p)
        m.again = consumed
        if isinstance(first, messages.Dumped):      # small: all in one message, passed
            # on unread (the target checks it; loaded here only if it asks for files)
            await self._restore(m, first.image, first.image)  # type: ignore[attr-defined]
            through, straight = len(first.image), 0
        else:
            through, straight = await self._pass_on(d, m, first, deadline)
        if d.ghost_gone:
            raise BpfsError(errno.ESRCH, f"process {d.pid} was killed while it moved")
        return through, straight

    async def _pass_on(self, d: Migration, m: Migration, first: messages.Part,
                       deadline: float) -> tuple[int, int]:
        """Each `part` from the source goes on to the target as a `piece` as it comes (a
        view of the frame it came in: no copy), or, straight, only the first; the master
        keeps only the header, for the file contents the target may ask for. The target
        builds the process as they come (bpfs/node/streamin.py); on any failure it
        discards it (`abort`)."""
        from bpfs.master.migrations import RESTORE_TIMEOUT
        image = incoming_image(d, first)
        try:
            at = await self._send_restore(m, first.data, image.total)  # type: ignore[attr-defined]
            if first.direct:
                await self._straight(d, m, deadline)
            else:
                while True:
                    msg = await self._next_of_dump(d, deadline)
                    data = msg.data if isinstance(msg, messages.Part) else msg.image
                    image.take(at, data)            # in order, within the total (EFBIG)
                    if len(data):
                        at = await self._send_piece(m, at, data)  # type: ignore[attr-defined]
                    if isinstance(msg, messages.Dumped):
                        break
                if not image.complete:
                    raise BpfsError(errno.EPROTO, f"node {d.node} sent {image.got} bytes of "
                                    f"an image of {image.total}")
            header = image.image()
            if header is None:
                raise BpfsError(errno.EPROTO, f"node {d.node} sent no whole header")
            with trio.fail_after(RESTORE_TIMEOUT):
                await self._negotiate(m, header)            # type: ignore[attr-defined]
        except trio.TooSlowError:
            await self._abort(m)                            # type: ignore[attr-defined]
            raise BpfsError(errno.ETIMEDOUT, f"node {m.node} did not restore in time") from None
        except BaseException:
            await self._abort(m)                            # type: ignore[attr-defined]
            raise
        if first.direct:
            return len(first.data), image.total - len(first.data)
        return image.total, 0

    async def _straight(self, d: Migration, m: Migration, deadline: float) -> None:
        """The pages go from the source to the target: wait for the source's (empty)
        `dumped`, which says the last of them went (EPROTO: not asked for, or more)."""
        if not m.direct:
            raise BpfsError(errno.EPROTO, f"node {d.node} sends move {d.id}'s pages "
                            "straight, unasked")
        msg = await self._next_of_dump(d, deadline)
        if not isinstance(msg, messages.Dumped) or len(msg.image):
            raise BpfsError(errno.EPROTO, f"node {d.node} sent pages of move {d.id} "
                            "here that go straight to the target")

    async def _next_of_dump(self, d: Migration, deadline: float
                            ) -> messages.Part | messages.Dumped:
        """The source's next `part` or its `dumped`; its `failed` raised; ETIMEDOUT after
        `deadline` (the source then lets the process go on, at its `resume`)."""
        try:
            with trio.fail_at(deadline):
                msg = await d.receive.receive()
        except trio.TooSlowError:
            raise BpfsError(errno.ETIMEDOUT, f"node {d.node} did not dump process {d.pid} "
                            "in time") from None
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise BpfsError(errno.EIO, "move abandoned") from None
        if isinstance(msg, messages.Failed):
            raise BpfsError(msg.errno, msg.message or "the node cannot move it")
        return msg

    def on_taking(self, node: int, msg: messages.Taking) -> None:
        self._deliver(node, msg)                            # type: ignore[attr-defined]


def _links(p: Proc) -> tuple[execreq.ExecMove, str | None]:
    """The stdio links a restore of `p` makes again, and where their server is."""
    ln = p.links or StdioLinks(0, "0" * 32, ("null", "null", "null"))
    io = tuple(spec if fd in ln.fds else "null" for fd, spec in enumerate(ln.io))
    return execreq.ExecMove(ln.port or 1, ln.token, 0, *io), ln.host


"""One connection of a node daemon to its master, from `register` to its end.

    session = Session(node, fs, table)
    number = await session.register()        `register` -> `welcome` (BpfsError: refused)
    outcome = await session.run()            heartbeats, reports, dispatch until it ends

A session sends `facts` every `heartbeat` seconds, `usage` every `usage` seconds of
`welcome` if it names one (bpfs/node/usage.py), sends what `report` queues (from
synchronous code, in order), and dispatches every message from the master through the
table it was given (bpfs/node/service.py's FROM_MASTER: `message class -> async
handler(session, msg)`). Every message is decoded into its class (bpfs/wire/messages.py's
FROM_MASTER checks every field) before a handler sees it; one that does not fit, or that
the table lacks (`challenge` or `welcome` again...), is a protocol error that ends the
session (LOST, one log line). A
handler returns None to keep the session going, or an `Outcome` that ends it; one that
runs long starts a task in `session.nursery`.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Awaitable, Callable, Protocol

import trio

from bpfs.node import facts as node_facts, usage as node_usage
from bpfs.node.config import NodeConfig
from bpfs.node.restorer import NodeRestorer
from bpfs.wire import framing as wire, messages

log = logging.getLogger("bpslave")


class Outcome(enum.Enum):
    REBOOT = "reboot"
    HALT = "halt"
    LOST = "lost"


class NodeSide(Protocol):
    """What a session uses of its node (bpfs.node.service.Node)."""
    number: int | None
    cfg: NodeConfig
    procs: Any                  # bpfs.node.procs.ProcessTable, which stands above this module
    fs_client: Any              # bpfs.node.fsclient.FsClient: /bproc on the node
    restorer: NodeRestorer
    supervisor: Any             # bpfs.node.supervisor.Supervisor | None (above this module)


Handler = Callable[["Session", wire.Message], Awaitable["Outcome | None"]]

CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Session:
    """One authenticated connection to the master, from `register` to its end."""

    def __init__(self, node: NodeSide, fs: wire.FrameStream,
                 table: dict[type[messages.Msg], Handler]) -> None:
        self.node = node
        self.fs = fs
        self.table = table
        self.nursery: trio.Nursery | None = None     # set while `run` runs
        self.heartbeat = 1.0
        self.pid_max: int | None = None     # the master's (bpfs/node/supervisor.py)
        self.usage_interval: float | None = None     # `welcome` says; None: no reports
        self.usage_wanted = trio.Event()             # set by the master's `sample`
        self.mount: str | None = None                # where the master's /bproc is
        self.files: dict[int, trio.MemorySendChannel[Any]] = {}   # restores awaiting `files`
        self.streams: dict[int, Any] = {}   # restores whose image streams in (streamin.py)
        self.streamed: dict[int, int] = {}  # announced (`streamed`): id -> the image's size
        self.again: dict[int, int] = {}     # moved processes' restores: their stdin read
        self.early: dict[int, Any] = {}     # ... and their links, made early (earlylinks.py)
        self.takes: dict[int, Any] = {}     # restores whose pages come straight (direct.py)
        self._reports, self._report_queue = trio.open_memory_channel[wire.Message | None](
            float("inf"))
        self._unsent = 0        # reports queued and not yet written (under fs.thread_lock)

    async def send(self, msg: wire.Message) -> None:
        await self.fs.send(msg)

    def report(self, msg: wire.Message) -> None:
        """Send `msg` (`restored`, `exited`, `failed`) from synchronous code, in order: at
        once when nothing is queued and the stream is free (no wake-up of the sending task,
        the usual case), else through the queue; dropped once the session is over: the
        master that should hear it is gone."""
        try:
            queued = self._reports.statistics().current_buffer_used
            if not queued and self.fs.send_nowait(msg):
                if self.fs.pending:             # the rest of it: from the sending task
                    self._queue(None)
                return
        except trio.BrokenResourceError:
            log.debug("not reported, the connection broke: %s", msg)
            return
        self._queue(msg)

    def _queue(self, msg: wire.Message | None) -> None:
        try:
            with self.fs.thread_lock:
                self._reports.send_nowait(msg)
                self._unsent += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            log.debug("not reported, the session is over: %s", msg)

    def report_threadsafe(self, msg: wire.Message,
                          post: Callable[..., None]) -> None:
        """`report` from another thread: written at once if nothing queued is still to
        go before it, else handed to trio's thread (`post(fn, *args)`: run there soon)."""
        sent = self.fs.send_threadsafe(msg, lambda: self._unsent == 0)
        if sent is False:
            post(self.report, msg)
        elif sent is None:                      # the rest of it: from the sending task
            post(self._queue, None)

    def write_threadsafe(self, msg: wire.Message, post: Callable[..., None]) -> bool:
        """`report_threadsafe`, but nothing is handed over if it cannot be written now:
        False (the caller then does it all from trio's thread, in order)."""
        sent = self.fs.send_threadsafe(msg, lambda: self._unsent == 0)
        if sent is None:                        # the rest of it: from the sending task
            post(self._queue, None)
        return sent is not False

    async def send_reports(self) -> Outcome:
        """Send what `report` queued; what queued up meanwhile goes in the same write
        (None: only the rest of a report written in part)."""
        async for first in self._report_queue:
            batch = [first]
            while True:
                try:
                    batch.append(self._report_queue.receive_nowait())
                except trio.WouldBlock:
                    break
            msgs = [m for m in batch if m is not None]
            if msgs:
                await self.fs.send_many(msgs)
            else:
                await self.fs.flush()
            self._unsent -= len(batch)
            del first, batch, msgs      # a sent `part` holds its process's dump: let it go
        return Outcome.LOST

    async def register(self) -> int:
        """Raises BpfsError when the master refuses us (number taken, unknown node...)."""
        await self.send(messages.Register(node=self.node.number, facts=_facts()))
        welcome = await self.fs.expect(messages.Welcome)
        self.heartbeat = welcome.heartbeat
        self.pid_max = welcome.pid_max
        self.usage_interval = welcome.usage
        self.mount = welcome.mount
        return welcome.node

    def beat(self) -> None:
        """A heartbeat now: a long step on this thread follows (restoring a big image holds
        the event loop for seconds), and the master's silence clock starts from here."""
        self.report(messages.Facts(facts=_facts()))

    async def heartbeats(self) -> Outcome:
        while True:
            await trio.sleep(self.heartbeat)
            await self.send(messages.Facts(facts=_facts()))

    async def usage_reports(self) -> Outcome:
        await node_usage.report_usage(self)
        return Outcome.LOST

    async def run(self) -> Outcome:
        """Heartbeats and dispatch until a handler or a failure ends the session.

        Each of the two tasks turns its own failure into an outcome, so no
        exception group ever leaves the nursery; tasks that handlers start in
        `self.nursery` must do the same.
        """
        outcomes: list[Outcome] = []
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for task in (self.heartbeats, self.dispatch, self.send_reports):
                    nursery.start_soon(self._guard, task, outcomes, nursery.cancel_scope)
                if self.usage_interval:
                    nursery.start_soon(self._guard, self.usage_reports, outcomes,
                                       nursery.cancel_scope)
        finally:
            self._reports.close()
            for _, links in self.early.values():
                links.close()
            self.early.clear()
        return outcomes[0] if outcomes else Outcome.LOST

    async def _guard(self, task: Callable[[], Awaitable[Outcome]], outcomes: list[Outcome],
                     scope: trio.CancelScope) -> None:
        try:
            outcomes.append(await task())
        except wire.ProtocolError as exc:
            log.error("protocol error from the master at %s: %s", self.node.cfg.address, exc)
            outcomes.append(Outcome.LOST)
        except CONNECTION_ERRORS as exc:
            log.warning("connection to the master lost: %s", why(exc))
            outcomes.append(Outcome.LOST)
        scope.cancel()

    async def dispatch(self) -> Outcome:
        while True:
            try:
                msg = await self.fs.receive()
            except EOFError:
                log.warning("the master closed the connection")
                return Outcome.LOST
            fn = self.table.get(type(msg))
            if fn is None:
                raise wire.ProtocolError(f"{messages.tag(type(msg))!r} is not a message of a "
                                         "session")
            outcome = await fn(self, msg)
            if outcome is not None:
                return outcome


def _facts() -> messages.NodeFacts:
    return messages.NodeFacts.of(node_facts.facts())


def why(exc: BaseException) -> str:
    """The reason in a few words; trio hides the errno of a failed connect in __cause__."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return why(cause.exceptions[-1])
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return str(exc) or type(exc).__name__

"""The node daemon proper: connect, authenticate, register, heartbeat, obey.

    run(cfg) -> exit status          (blocking; trio.run inside)

One `Node` lives as long as the process; it makes one `Session` per
connection. A session registers (`register` -> `welcome` | `refused`), reports
`state up`, sends `facts` every `heartbeat` seconds, and dispatches every
message from the master through `HANDLERS`, a table of
`message name -> async handler(session, msg)`. Every message from the master
is checked against its row of bpfs/wire/messages.py's table before a handler sees
it; one that does not fit, or that no handler takes (`challenge` or `welcome`
again...), is a protocol error that ends the session (LOST, one log line). A
handler returns None to keep the session going, or an `Outcome` that ends it. Later features (restore a
migrated image, forward a signal, ...) add entries with `@handler("name")`; a
handler that runs long starts a task in `session.nursery`.

Migration (restore, files, signal; exited reports) is bpfs/node/procs.py; the
ptrace-based Restorer (used from the event loop's thread) is bpfs/node/restorer.py,
the reaper bpfs/node/init.py. The Restorer is made when the daemon
starts, so its helper is ready before the first migration.

Signals: SIGTERM, SIGINT and SIGHUP stop the daemon; they are read from a signalfd with
their sender, and as PID 1 of the node's namespace the daemon ignores (and logs) those
sent from inside it: a root job's `kill -TERM 1` does not take the node down.

Outcomes: REBOOT closes the connection, kills what the node holds, and comes
back on a fresh connection asking for the same number; HALT (halt, pwroff)
exits 0; LOST (the connection dropped or broke the protocol) exits 1, or with
`-r` reconnects after an exponential back-off. Authentication and registration
refusals are logged and exit 3 (or are retried with `-r`).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import signal
from typing import Any, Awaitable, Callable

import trio

from bpfs.errors import BpfsError
from bpfs.node import facts as node_facts
from bpfs.node import nsutil
from bpfs.node import procs
from bpfs.node.config import EXIT_LOST, EXIT_OK, EXIT_REFUSED, NodeConfig
from bpfs.node.init import Reaper, kill_namespace
from bpfs.node.restorer import NodeRestorer, setup_cache_dir
from bpfs.wire import framing as wire

log = logging.getLogger("bpslave")


class Outcome(enum.Enum):
    REBOOT = "reboot"
    HALT = "halt"
    LOST = "lost"


Handler = Callable[["Session", wire.Message], Awaitable["Outcome | None"]]
HANDLERS: dict[str, Handler] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of master -> node message `name`."""
    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn
    return register


_CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

CTL_OUTCOMES = {"reboot": Outcome.REBOOT, "halt": Outcome.HALT, "pwroff": Outcome.HALT}


@handler("ctl")
async def _on_ctl(session: "Session", msg: wire.Message) -> Outcome | None:
    cmd = msg["cmd"]
    outcome = CTL_OUTCOMES.get(cmd)
    if outcome is None:
        log.warning("ignoring unknown ctl command %r", cmd[:40])
        return None
    log.info("master says %s", cmd)
    return outcome


@handler("restore")
async def _on_restore(session: "Session", msg: wire.Message) -> None:
    await procs.on_restore(session, msg)


@handler("files")
async def _on_files(session: "Session", msg: wire.Message) -> None:
    await procs.on_files(session, msg)


@handler("signal")
async def _on_signal(session: "Session", msg: wire.Message) -> None:
    await procs.on_signal(session, msg)


class Backoff:
    """0.1 s, 0.2 s, 0.4 s ... capped; `reset` after every successful registration."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high, self.next = low, high, low

    def reset(self) -> None:
        self.next = self.low

    def step(self) -> float:
        delay, self.next = self.next, min(self.next * 2, self.high)
        return delay


class Session:
    """One authenticated connection to the master, from `register` to its end."""

    def __init__(self, node: "Node", fs: wire.FrameStream) -> None:
        self.node = node
        self.fs = fs
        self.nursery: trio.Nursery | None = None     # set while `run` runs
        self.heartbeat = 1.0
        self.files: dict[int, trio.MemorySendChannel[Any]] = {}   # restores awaiting `files`
        self._reports, self._report_queue = trio.open_memory_channel[wire.Message | None](
            float("inf"))

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
            self._reports.send_nowait(msg)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            log.debug("not reported, the session is over: %s", msg)

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
        return Outcome.LOST

    async def register(self) -> int:
        """Raises BpfsError when the master refuses us (number taken, unknown node...)."""
        await self.send({"t": "register", "node": self.node.number, "facts": node_facts.facts()})
        welcome = await self.fs.expect("welcome")
        self.heartbeat = welcome["heartbeat"]
        return welcome["node"]

    async def heartbeats(self) -> Outcome:
        while True:
            await trio.sleep(self.heartbeat)
            await self.send({"t": "facts", "facts": node_facts.facts()})

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
        finally:
            self._reports.close()
        return outcomes[0] if outcomes else Outcome.LOST

    async def _guard(self, task: Callable[[], Awaitable[Outcome]], outcomes: list[Outcome],
                     scope: trio.CancelScope) -> None:
        try:
            outcomes.append(await task())
        except wire.ProtocolError as exc:
            log.error("protocol error from the master at %s: %s", self.node.cfg.address, exc)
            outcomes.append(Outcome.LOST)
        except _CONNECTION_ERRORS as exc:
            log.warning("connection to the master lost: %s", _why(exc))
            outcomes.append(Outcome.LOST)
        scope.cancel()

    async def dispatch(self) -> Outcome:
        while True:
            try:
                msg = await self.fs.receive()
            except EOFError:
                log.warning("the master closed the connection")
                return Outcome.LOST
            fn = HANDLERS.get(msg["t"])
            if fn is None:
                raise wire.ProtocolError(f"{msg['t']!r} is not a message of a session")
            outcome = await fn(self, msg)
            if outcome is not None:
                return outcome


class Node:
    def __init__(self, cfg: NodeConfig, key: bytes) -> None:
        self.cfg = cfg
        self.key = key
        self.number: int | None = cfg.node
        self.reaper = Reaper()
        self.procs = procs.ProcessTable(self.reaper)
        self.restorer = NodeRestorer(None, self.procs.jobs_w)
        self.backoff = Backoff(cfg.backoff_min, cfg.backoff_max)

    def start(self) -> None:
        """Mount the file cache and make the Restorer (in the event loop's thread)."""
        self.restorer.cache_dir = setup_cache_dir()
        self.restorer.start()

    async def serve(self) -> int:
        """Sessions until halted, or until a failure ends us without -r. Returns the exit status."""
        while True:
            outcome, code = await self._one_connection()
            if outcome is Outcome.HALT:
                return EXIT_OK
            self.drop_held_processes()
            if outcome is Outcome.REBOOT:
                await trio.sleep(self.cfg.reboot_delay)
                continue
            if not self.cfg.reconnect:
                return code
            delay = self.backoff.step()
            log.info("reconnecting in %.2g s", delay)
            await trio.sleep(delay)

    async def _one_connection(self) -> tuple[Outcome, int]:
        try:
            fs = await wire.connect(self.cfg.host, self.cfg.port, self.key)
        except wire.AuthError as exc:
            log.error("authentication with %s failed: %s", self.cfg.address, exc)
            return Outcome.LOST, EXIT_REFUSED
        except (OSError, trio.TooSlowError, wire.ProtocolError, EOFError) as exc:
            log.log(logging.INFO if self.cfg.reconnect else logging.ERROR,
                    "cannot reach the master at %s: %s", self.cfg.address, _why(exc))
            return Outcome.LOST, EXIT_LOST
        except BpfsError as exc:            # refused during the handshake (protocol version)
            log.error("the master at %s refused us: %s", self.cfg.address, exc)
            return Outcome.LOST, EXIT_REFUSED
        try:
            return await self._session(fs)
        finally:
            with trio.CancelScope(shield=True):
                await fs.aclose()

    async def _session(self, fs: wire.FrameStream) -> tuple[Outcome, int]:
        try:
            session = Session(self, fs)
            self.number = await session.register()
            self.backoff.reset()
            await session.send({"t": "state", "state": "up"})
            log.info("registered as node %d with %s (heartbeat %.1f s)",
                     self.number, self.cfg.address, session.heartbeat)
            return await session.run(), EXIT_LOST
        except wire.ProtocolError as exc:
            log.error("protocol error from the master at %s: %s", self.cfg.address, exc)
        except BpfsError as exc:
            log.error("the master refused node %s: %s", _num(self.number), exc)
            return Outcome.LOST, EXIT_REFUSED
        except _CONNECTION_ERRORS as exc:
            log.warning("connection to the master lost: %s", _why(exc))
        return Outcome.LOST, EXIT_LOST

    def drop_held_processes(self) -> None:
        """bproc: a node that loses (or reboots away from) its master kills what it held."""
        if kill_namespace():
            log.info("killed the processes of the node's PID namespace")
            self.restorer.renew()               # kill(-1) took the Restorer's helper too
        self.reaper.reap()


def _why(exc: BaseException) -> str:
    """The reason in a few words; trio hides the errno of a failed connect in __cause__."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return _why(cause.exceptions[-1])
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _num(n: int | None) -> str:
    return "(any)" if n is None else str(n)


async def _main(cfg: NodeConfig, key: bytes) -> int:
    node = Node(cfg, key)
    node.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.reaper.run)
        nursery.start_soon(node.procs.watch_jobs)
        nursery.start_soon(_watch_signals, nursery.cancel_scope)
        code = await node.serve()
        nursery.cancel_scope.cancel()
        return code
    return EXIT_OK  # cancelled by SIGTERM/SIGINT


STOP_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _watch_signals(scope: trio.CancelScope) -> None:
    """Stop on SIGTERM, SIGINT or SIGHUP from outside the node's PID namespace (the launcher,
    `bpfs down`, a terminal). As PID 1 of that namespace, a signal from a process inside it
    (a root job's `kill -TERM 1`) is logged and ignored: no job can take its node down."""
    fd = nsutil.signalfd(STOP_ON)
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            for signum, sender in nsutil.read_signals(fd):
                if sender and os.getpid() == 1:
                    log.warning("ignoring %s from process %d of the node",
                                signal.Signals(signum).name, sender)
                    continue
                log.info("stopping on %s", signal.Signals(signum).name)
                scope.cancel()
                return
    finally:
        os.close(fd)


def run(cfg: NodeConfig) -> int:
    """Load the key and serve until halted or stopped; the process's exit status."""
    try:
        key = wire.load_key(cfg.key_file)
    except BpfsError as exc:
        log.error("%s", exc)
        return EXIT_REFUSED if exc.errno == errno.EACCES else EXIT_LOST
    log.info("node daemon pid %d (host view: see /proc), master %s", os.getpid(), cfg.address)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_ON)   # every thread: read by _watch_signals
    return trio.run(_main, cfg, key)

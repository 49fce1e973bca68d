"""The master's node links: accept, register, the node-message table, the watchdog.

    links = NodeLinks(cluster, key, procs, heartbeat, ping_timeout)
    trio.serve_listeners(links.handle_connection, listeners)    one node's connection
    nursery.start_soon(links.watchdog)                          silent nodes marked down
    await links.send_node(node, msg)                            EHOSTDOWN if it is not up

Node connections (protocol in bpfs/wire/framing.py, messages in bpfs/wire/messages.py):
authenticate (`wire.accept`), then `register` -> `welcome` (or `refused` and close),
then the node's messages are dispatched by `FROM_NODE`; every message counts as a
heartbeat. A node silent for `ping_timeout` seconds, or whose connection drops, is marked
down; silent means nothing arrived, which the watchdog asks the kernel before it believes
the master's own stamps, as frames wait unread while the master is busy
(bpfs/master/liveness.py). Every frame is decoded into its message class (bpfs/wire/
messages.py's FROM_NODE checks every field) before any handler sees it; a wrong key, a
malformed, oversized or unexpected frame (a message no registered node sends, one out
of order) closes that connection only, with one log line naming the peer. `need`, `restored`, `failed`, `exited`, `stopped` and
`continued` go to bpfs/master/procs.py, `usage` to bpfs/master/usage.py, and a lost
node's ghosts die with it. The
`fs_*` requests of a node's processes on /bproc go to that connection's
bpfs/fs/forwarded.py `NodeFs`, which answers each in a task of the connection's nursery
with the master's own filesystem handlers (`fs_ops`, set once the filesystem is made);
`welcome` tells the node where to mount it (`mount`).

Unauthenticated peers: anyone who can reach the node port gets at most MAX_HANDSHAKES
connections in their handshake at once (more are closed at once, unread) and
HANDSHAKE_TIMEOUT (wire/framing.py) for the whole handshake. Lines about them go
through `RefusalLog`: at most BURST a host in WINDOW seconds, then one line saying the
rest are counted, the count told with the host's next line.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from bpfs.errors import BpfsError
from bpfs.fs.forwarded import NodeFs
from bpfs.fs.ops import BpfsOperations
from bpfs.master import liveness
from bpfs.master.procs import ProcService
from bpfs.master.usage import UsageService
from bpfs.model import Cluster
from bpfs.ratelog import RateLog
from bpfs.wire import framing as wire, messages

log = logging.getLogger("bpfs.master")

MAX_NODE_FRAME = 16 * 1024 * 1024     # what a node may send us in one frame
REGISTER_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
MAX_HANDSHAKES = 64                   # unauthenticated connections at once


@dataclass
class NodeConn:
    number: int
    stream: wire.FrameStream
    peer: str
    scope: trio.CancelScope
    fs: NodeFs | None = None                # its processes' requests on /bproc
    nursery: trio.Nursery | None = None     # ... answered in tasks here


async def _send_on(conn: NodeConn, msg: messages.Msg) -> None:
    """Send on this very connection (a reply must not go to the node's next one)."""
    try:
        await conn.stream.send(msg, SEND_TIMEOUT)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
        conn.scope.cancel()
        raise BpfsError(errno.EHOSTDOWN, f"node {conn.number}: connection lost") from None


NodeHandler = Callable[["NodeLinks", NodeConn, Any, float], Awaitable[None]]


async def _on_facts(links: "NodeLinks", conn: NodeConn, msg: messages.Facts, now: float) -> None:
    links.cluster.heartbeat(conn.number, msg.facts.facts(), now)


async def _on_state(links: "NodeLinks", conn: NodeConn, msg: messages.State, now: float) -> None:
    try:
        links.cluster.reported_state(conn.number, msg.state, now)
    except BpfsError as exc:
        log.warning("node %d (%s): %s", conn.number, conn.peer, exc)


async def _on_usage(links: "NodeLinks", conn: NodeConn, msg: messages.Usage, now: float) -> None:
    links.cluster.heartbeat(conn.number, None, now)
    if links.usage is not None:
        links.usage.on_usage(conn.number, msg)


def _to_procs(cls: type[messages.Msg]) -> NodeHandler:
    name = f"on_{messages.tag(cls)}"

    async def handler(links: "NodeLinks", conn: NodeConn, msg: Any, now: float) -> None:
        links.cluster.heartbeat(conn.number, None, now)
        getattr(links.procs, name)(conn.number, msg)
    return handler


async def _to_moves(links: "NodeLinks", conn: NodeConn, msg: Any, now: float) -> None:
    """A move's image: awaited, so a fast source waits for the target (back-pressure)."""
    links.cluster.heartbeat(conn.number, None, now)
    await links.procs.on_part(conn.number, msg)


async def _to_fs(links: "NodeLinks", conn: NodeConn, msg: Any, now: float) -> None:
    links.cluster.heartbeat(conn.number, None, now)
    if conn.fs is not None and conn.nursery is not None:
        await conn.fs.take(conn.nursery, msg)
    elif not isinstance(msg, messages.FsCancel):        # a master without a filesystem
        try:
            await _send_on(conn, messages.FsReply(id=msg.id, errno=errno.ENOSYS))
        except BpfsError:
            pass


# What a registered node may send, by message class (bpfs.wire.messages.FROM_NODE decodes
# them); add a row for a new one. Any other is a protocol error: `register` again...
FROM_NODE: dict[type[messages.Msg], NodeHandler] = {
    messages.Facts: _on_facts, messages.State: _on_state, messages.Usage: _on_usage,
    **{cls: _to_procs(cls) for cls in (messages.Need, messages.Restored, messages.Failed,
                                       messages.Exited, messages.Stopped, messages.Continued,
                                       messages.Fork, messages.Unforked, messages.Took,
                                       messages.Execed,
                                       messages.Kill, messages.Exec, messages.Watch,
                                       messages.Relayed, messages.Taking)},
    messages.Part: _to_moves, messages.Dumped: _to_moves,

    **{cls: _to_fs for cls in (*messages.FS_REQUESTS, messages.FsCancel)},
}


async def _flush(conn: NodeConn) -> None:
    try:
        await conn.stream.flush(SEND_TIMEOUT)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
        conn.scope.cancel()


def _pid_max() -> int | None:
    """This kernel's pid_max: a node keeps the PIDs it numbers itself above it."""
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class RefusalLog(RateLog):
    """Warnings about unauthenticated peers, at most BURST a host per WINDOW seconds
    (bpfs/ratelog.py): anyone who can reach the node port can cause refusals as fast as
    they can connect."""
    WINDOW = 60.0
    HOSTS = RateLog.KEYS

    def __init__(self) -> None:
        super().__init__(log, logging.WARNING, "refusals")

    def warning(self, peer: str, now: float, fmt: str, *args: Any) -> None:
        self.log(peer.rsplit(":", 1)[0], now, fmt, *args)


class NodeLinks:
    """The connected nodes: their links, handshakes in progress, refusals logged."""

    def __init__(self, cluster: Cluster, key: bytes, procs: ProcService, heartbeat: float,
                 ping_timeout: float, usage: UsageService | None = None,
                 mount: str | None = None) -> None:
        self.mount = mount                  # told to nodes in `welcome`
        self.fs_ops: BpfsOperations | None = None
        self.cluster = cluster
        self.usage = usage
        self.key = key
        self.procs = procs
        self.heartbeat = heartbeat
        self.ping_timeout = ping_timeout
        self.conns: dict[int, NodeConn] = {}
        self.names: Callable[[], messages.Msg] | None = None   # sent after welcome
        self.handshakes = 0                 # connections in their handshake now
        self.refusals = RefusalLog()

    def send_now(self, node: int, msg: messages.Msg) -> bool:
        """Write `msg` from synchronous code if the connection takes it whole at once; False:
        nothing was written (send it with `send_node`)."""
        conn = self.conns.get(node)
        if conn is None or conn.stream.pending:
            return False
        try:
            if not conn.stream.send_nowait(msg):
                return False
        except trio.BrokenResourceError:
            return False
        if conn.stream.pending:     # the rest goes with the next send, or now from a task
            trio.lowlevel.spawn_system_task(_flush, conn)
        return True

    def send_threadsafe(self, node: int, msg: messages.Msg) -> bool | None:
        """`send_now` from any thread (the tracer's): True written whole, None in part
        (then `flush_soon(node)` from trio's thread), False nothing."""
        conn = self.conns.get(node)
        if conn is None:
            return False
        return conn.stream.send_threadsafe(msg)

    def flush_soon(self, node: int) -> None:
        conn = self.conns.get(node)
        if conn is not None and conn.stream.pending:
            trio.lowlevel.spawn_system_task(_flush, conn)

    def host_of(self, node: int) -> str | None:
        """The address node `node` connected from (where a bpsh running there listens)."""
        conn = self.conns.get(node)
        if conn is None:
            return None
        try:
            return conn.stream.stream.socket.getpeername()[0]
        except (OSError, AttributeError, IndexError):
            return None

    def local_of(self, node: int) -> str | None:
        """The master's own address on node `node`'s link (where that node reaches it)."""
        conn = self.conns.get(node)
        if conn is None:
            return None
        try:
            return conn.stream.stream.socket.getsockname()[0]
        except (OSError, AttributeError, IndexError):
            return None

    async def send_node(self, node: int, msg: messages.Msg) -> None:
        conn = self.conns.get(node)
        if conn is None:
            raise BpfsError(errno.EHOSTDOWN, f"node {node} is down")
        try:
            await conn.stream.send(msg, SEND_TIMEOUT)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            conn.scope.cancel()
            raise BpfsError(errno.EHOSTDOWN, f"node {node}: connection lost") from None

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """One node daemon's connection, start to end; never raises."""
        peer = _peer(stream)
        try:
            if self.handshakes >= MAX_HANDSHAKES:
                self.refusals.warning(peer, trio.current_time(), "closed the connection from %s "
                                      "at once: %d others are in their handshake", peer,
                                      self.handshakes)
                return
            await self._serve_connection(stream, peer)
        except Exception:
            log.exception("node connection from %s failed", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream, peer: str) -> None:
        self.handshakes += 1
        try:
            fs = await wire.accept(stream, self.key)
        except wire.AuthError as exc:
            self.refusals.warning(peer, trio.current_time(),
                                  "refused node connection from %s: %s", peer, exc)
            return
        except (BpfsError, EOFError, trio.BrokenResourceError, OSError) as exc:
            self.refusals.warning(peer, trio.current_time(), "bad handshake from %s: %s", peer,
                                  exc or type(exc).__name__)
            return
        finally:
            self.handshakes -= 1
        fs.max_frame = MAX_NODE_FRAME
        number = await self._register(fs, peer)
        if number is not None:
            await self._serve_node(NodeConn(number, fs, peer, trio.CancelScope()))

    async def _register(self, fs: wire.FrameStream, peer: str) -> int | None:
        try:
            with trio.fail_after(REGISTER_TIMEOUT):
                msg = await fs.expect(messages.Register)
            number = self.cluster.attach(msg.node, peer.rsplit(":", 1)[0], msg.facts.facts(),
                                         trio.current_time())
        except BpfsError as exc:
            log.warning("refused registration from %s: %s", peer, exc)
            await _refuse(fs, exc)
            return None
        except (trio.TooSlowError, EOFError, trio.BrokenResourceError, OSError) as exc:
            log.warning("no registration from %s: %s", peer, exc or type(exc).__name__)
            return None
        log.info("node %d registered from %s", number, peer)
        return number

    async def _serve_node(self, conn: NodeConn) -> None:
        n = conn.number
        self.conns[n] = conn
        try:
            with conn.scope:
                await conn.stream.send(messages.Welcome(
                    node=n, heartbeat=self.heartbeat, pid_max=_pid_max(), mount=self.mount,
                    usage=self.usage.interval if self.usage is not None else None))
                if self.names is not None:
                    await conn.stream.send(self.names())
                await self._receive_and_answer(conn)
        except wire.ProtocolError as exc:
            log.warning("node %d (%s): %s; closing its connection", n, conn.peer, exc)
        except EOFError:
            log.info("node %d (%s) closed its connection", n, conn.peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("node %d (%s): connection lost: %s", n, conn.peer, exc)
        finally:
            conn.stream.retire()        # the tracer thread writes no more to it
            current = self.conns.get(n)
            if current is conn:
                del self.conns[n]
                self.cluster.detach(n)
            if current in (conn, None):
                self.procs.node_lost(n)
                if self.usage is not None:
                    self.usage.node_lost(n)
        if conn.scope.cancelled_caught:
            log.info("node %d (%s): connection closed by the master", n, conn.peer)

    async def _receive_and_answer(self, conn: NodeConn) -> None:
        """The receive loop, with a nursery for the answers to the node's fs requests; the
        loop's failure is raised as itself (not in a group) once they are cancelled."""
        failed: list[BaseException] = []

        async def receive() -> None:
            try:
                await self._receive_loop(conn)
            except (wire.ProtocolError, EOFError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                failed.append(exc)
            nursery.cancel_scope.cancel()

        if self.fs_ops is not None:
            conn.fs = NodeFs(self.fs_ops, conn.number, lambda reply: _send_on(conn, reply))
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(receive)
        finally:
            conn.nursery = None
            if conn.fs is not None:
                conn.fs.close()
        if failed:
            raise failed[0]

    async def _receive_loop(self, conn: NodeConn) -> None:
        while True:
            msg = await conn.stream.receive()
            now = trio.current_time()
            handler = FROM_NODE.get(type(msg))
            if handler is None:
                raise wire.ProtocolError(f"{messages.tag(type(msg))!r} is not a registered "
                                         "node's message")
            self.procs.take_fresh()     # children answered from the tracer thread: whatever
            await handler(self, conn, msg, now)     # a node says next may be of them

    async def watchdog(self) -> None:
        """Close the connections of nodes silent for longer than ping_timeout (master/liveness.py).

        It may run late when the loop is busy; it then marks a silent node down late,
        never a node whose frames wait unread because the master was slow."""
        timeout = self.ping_timeout
        while True:
            await trio.sleep(liveness.check_interval(timeout))
            self.judge_silence(trio.current_time(), timeout)

    def judge_silence(self, now: float, timeout: float) -> None:
        """Mark down the nodes that sent nothing for `timeout`: by the master's stamp, unless
        the kernel received data on the connection since (then that is its heartbeat)."""
        unread: list[float] = []
        for n in self.cluster.stale(now, timeout):
            conn = self.conns.get(n)
            quiet = liveness.silence(conn.stream.stream) if conn is not None else None
            last = self.cluster.node(n).last_heartbeat
            if quiet is not None and quiet <= timeout:
                unread.append(now - last)
                self.cluster.heartbeat(n, None, now - quiet)
            else:
                self._mark_silent_down(n, conn, now - last if quiet is None else quiet)
        if unread:
            log.warning("master busy: %d node(s) unread for up to %.1f s; the kernel received "
                        "their frames in time, so they stay up", len(unread), max(unread))

    def _mark_silent_down(self, n: int, conn: NodeConn | None, silent_for: float) -> None:
        log.warning("node %d: no heartbeat for %.1f s; marking it down", n, silent_for)
        if conn is not None:
            del self.conns[n]
            conn.scope.cancel()
        self.cluster.detach(n)


async def _refuse(fs: wire.FrameStream, exc: BpfsError) -> None:
    try:
        with trio.move_on_after(2):
            await fs.send(messages.Refused(errno=exc.errno or errno.EIO,
                                           message=exc.message[:4096]))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError, AttributeError):
        return "?"

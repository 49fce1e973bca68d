"""The bpfs master daemon: node server, cluster model, /bproc mount.

    run_master(MasterConfig(...)) -> int        blocking; SIGTERM/SIGINT: unmount, return 0
    await nursery.start(serve_master, cfg)      for tests; started() with the bound port
    python -m bpfs.master --help                the same from a shell

Node connections (protocol in bpfs/wire/framing.py, messages in bpfs/wire/messages.py):
authenticate (`wire.accept`), then `register` -> `welcome` (or `refused` and
close), then the node's messages are dispatched by `NODE_MESSAGES`; every
message counts as a heartbeat. A node silent for `ping_timeout` seconds, or
whose connection drops, is marked down; silent means nothing arrived, which the
watchdog asks the kernel before it believes the master's own stamps, as frames
wait unread while the master is busy (bpfs/master/liveness.py). The heartbeat interval
told to nodes is a fifth of `ping_timeout`, at most 1 s, unless set. Every frame is checked against its
message's row of the table before any handler sees it; a wrong key, a
malformed, oversized or unexpected frame (a message no registered node sends,
one out of order) closes that connection only, with one log line naming the
peer. Data the user set (ACLs, admin states) is written to the
state file before the command that changed it returns.

Unauthenticated peers: anyone who can reach the node port gets at most
MAX_HANDSHAKES connections in their handshake at once (more are closed at
once, unread) and HANDSHAKE_TIMEOUT (wire/framing.py) for the whole handshake. Lines
about them go through `RefusalLog`: at most BURST a host in WINDOW seconds, then
one line saying the rest are counted, the count told with the host's next line.

Node numbers (bpfs/model.py `Cluster.attach`): with `--nodes K` (K > 0) only
0..K-1 exist; a node asking for another number is refused (ENODEV), one asking
for none gets the lowest free of them (EBUSY when all are connected). With
`--nodes 0` numbering is open: any number 0..MAX_NODE, or the lowest free; such
a node's entry is kept in the state file only once someone changed its ACL or
admin state (a key holder cannot grow the file).

Migrated processes (execmove, ghosts, signals, exits) are bpfs/master/procs.py's
`ProcService`, which owns the ptrace thread; `need`, `restored`, `failed` and
`exited` are handed to it, and a lost node's ghosts die with it. `exec` on
nodes/N/ctl (the master starts the command itself, as the writer, and keeps its
output) is bpfs/master/exec.py's `ExecService`, with its stdio endpoint listening
on the same host as the node server.

Errors that stop the master (unreadable key, corrupt state file, port in use,
mount point busy) are logged as one line and `run_master` returns 1.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import trio

from bpfs.errors import BpfsError
from bpfs.fs import mount as fsmount
from bpfs.fs.ops import BpfsOperations
from bpfs.master import liveness, statefile
from bpfs.master.exec import ExecService
from bpfs.master.procs import ProcService
from bpfs.model import MAX_NODE, Caller, Cluster, Facts
from bpfs.wire import execreq, framing as wire

log = logging.getLogger("bpfs.master")

MAX_NODE_FRAME = 16 * 1024 * 1024     # what a node may send us in one frame
REGISTER_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
MAX_HANDSHAKES = 64                   # unauthenticated connections at once


@dataclass
class MasterConfig:
    mount: str = "/bproc"
    listen: str = "0.0.0.0"           # host to listen on; the embedded cluster uses 127.0.0.1
    port: int = 2223
    key_file: str = "/etc/bpfs/cluster.key"
    state_file: str = "/var/lib/bpfs/state"
    nodes: int = 0                     # configured node count: nodes/0..K-1 exist (down) from the
                                       # start, no other registers; 0: open numbering
    ping_timeout: float = 5.0          # node marked down when no heartbeat for this long
    heartbeat: float | None = None     # interval told to nodes in `welcome`; None: derived
                                       # from ping_timeout (liveness.heartbeat_for)

    def __post_init__(self) -> None:
        if self.heartbeat is None:
            self.heartbeat = liveness.heartbeat_for(self.ping_timeout)


@dataclass
class NodeConn:
    number: int
    stream: wire.FrameStream
    peer: str
    scope: trio.CancelScope


NodeHandler = Callable[["Master", NodeConn, dict[str, Any], float], Awaitable[None]]


async def _on_facts(master: "Master", conn: NodeConn, msg: dict[str, Any], now: float) -> None:
    master.cluster.heartbeat(conn.number, Facts.from_wire(msg["facts"]), now)


async def _on_state(master: "Master", conn: NodeConn, msg: dict[str, Any], now: float) -> None:
    try:
        master.cluster.reported_state(conn.number, msg["state"], now)
    except BpfsError as exc:
        log.warning("node %d (%s): %s", conn.number, conn.peer, exc)


def _to_procs(name: str) -> NodeHandler:
    async def handler(master: "Master", conn: NodeConn, msg: dict[str, Any], now: float) -> None:
        master.cluster.heartbeat(conn.number, None, now)
        getattr(master.procs, f"on_{name}")(conn.number, msg)
    return handler


# Messages a registered node may send (checked by bpfs.wire.messages first); add a row for a
# new one. Any other is a protocol error: `hello`, `auth`, `register` again...
NODE_MESSAGES: dict[str, NodeHandler] = {
    "facts": _on_facts, "state": _on_state,
    **{name: _to_procs(name) for name in ("need", "restored", "failed", "exited",
                                                  "stopped", "continued")},
}


@dataclass
class RefusalLog:
    """Warnings about unauthenticated peers, at most BURST a host per WINDOW seconds.

    Anyone who can reach the node port can cause refusals as fast as they can connect:
    each gets its line, with the peer's address, until its host had BURST lines in the
    current window; one more line says so, and the rest of the window's refusals of that
    host are only counted; the count comes with the host's first line of a later window.
    At most HOSTS hosts are remembered (the one seen first is forgotten first).
    """
    BURST = 10
    WINDOW = 60.0
    HOSTS = 1024
    _hosts: dict[str, list[float]] = field(default_factory=dict)    # [start, lines, quiet]

    def warning(self, peer: str, now: float, fmt: str, *args: Any) -> None:
        host = peer.rsplit(":", 1)[0]
        entry = self._hosts.get(host)
        if entry is None or now - entry[0] >= self.WINDOW:
            quiet = int(entry[2]) if entry is not None else 0
            self._hosts.pop(host, None)
            while len(self._hosts) >= self.HOSTS:
                del self._hosts[next(iter(self._hosts))]
            entry = self._hosts[host] = [now, 0, 0]
            if quiet:
                fmt += " (and %d more refusals of %s before this were not logged)"
                args += (quiet, host)
        if entry[1] < self.BURST:
            entry[1] += 1
            log.warning(fmt, *args)
            return
        entry[2] += 1
        if entry[2] == 1:
            log.warning("%s: more than %d refusals in %g s; counting the rest without a line",
                        host, self.BURST, self.WINDOW)


class Master:
    """The master's services (ctl.Services): the model, node connections, persistence."""

    def __init__(self, cfg: MasterConfig, cluster: Cluster, key: bytes) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.key = key
        self.conns: dict[int, NodeConn] = {}
        self.handshakes = 0                 # connections in their handshake now
        self.refusals = RefusalLog()
        self._persist_lock = trio.Lock()
        self._saved_revision = -1
        self.procs = ProcService(cluster, self.send_node)
        self.execs = ExecService(cluster, self.procs, cfg.mount)

    # ---- ctl.Services ------------------------------------------------------------

    async def send_node(self, node: int, msg: dict[str, Any]) -> None:
        conn = self.conns.get(node)
        if conn is None:
            raise BpfsError(errno.EHOSTDOWN, f"node {node} is down")
        try:
            await conn.stream.send(msg, SEND_TIMEOUT)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            conn.scope.cancel()
            raise BpfsError(errno.EHOSTDOWN, f"node {node}: connection lost") from None

    async def execmove(self, node: int, caller: Caller, req: execreq.ExecMove,
                       rank_errors: Sequence[BpfsError | None] = ()) -> int:
        return await self.procs.execmove(node, caller, req, rank_errors=rank_errors)

    async def signal_proc(self, pid: int, sig: int) -> None:
        await self.procs.signal_proc(pid, sig)

    async def exec_command(self, node: int, caller: Caller, argv: list[str]) -> int:
        return await self.execs.start(node, caller, argv)

    async def persist(self) -> None:
        """Write the state file if ACLs, admin states or node numbers changed (EIO if it fails)."""
        async with self._persist_lock:
            revision = self.cluster.revision
            if revision == self._saved_revision:
                return
            saved = self.cluster.saved()
            try:
                await trio.to_thread.run_sync(statefile.save, self.cfg.state_file, saved)
            except OSError as exc:
                log.error("cannot write state file %s: %s", self.cfg.state_file, exc)
                raise BpfsError(errno.EIO, f"state not saved: {exc.strerror}") from None
            self._saved_revision = revision

    def save_now(self) -> None:
        """Blocking last save at shutdown, for a change whose persist() was cancelled."""
        if self.cluster.revision != self._saved_revision:
            try:
                statefile.save(self.cfg.state_file, self.cluster.saved())
                self._saved_revision = self.cluster.revision
            except OSError as exc:
                log.error("cannot write state file %s: %s", self.cfg.state_file, exc)

    # ---- node connections ----------------------------------------------------------

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
                msg = await fs.expect("register")
            number = self.cluster.attach(msg["node"], peer.rsplit(":", 1)[0],
                                         Facts.from_wire(msg["facts"]), trio.current_time())
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
                await conn.stream.send({"t": "welcome", "node": n, "heartbeat": self.cfg.heartbeat})
                await self._receive_loop(conn)
        except wire.ProtocolError as exc:
            log.warning("node %d (%s): %s; closing its connection", n, conn.peer, exc)
        except EOFError:
            log.info("node %d (%s) closed its connection", n, conn.peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("node %d (%s): connection lost: %s", n, conn.peer, exc)
        finally:
            current = self.conns.get(n)
            if current is conn:
                del self.conns[n]
                self.cluster.detach(n)
            if current in (conn, None):
                self.procs.node_lost(n)
        if conn.scope.cancelled_caught:
            log.info("node %d (%s): connection closed by the master", n, conn.peer)

    async def _receive_loop(self, conn: NodeConn) -> None:
        while True:
            msg = await conn.stream.receive()
            now = trio.current_time()
            handler = NODE_MESSAGES.get(msg["t"])
            if handler is None:
                raise wire.ProtocolError(f"{msg['t']!r} is not a registered node's message")
            await handler(self, conn, msg, now)

    async def watchdog(self) -> None:
        """Close the connections of nodes silent for longer than ping_timeout (master/liveness.py).

        It may run late when the loop is busy; it then marks a silent node down late,
        never a node whose frames wait unread because the master was slow."""
        timeout = self.cfg.ping_timeout
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
            await fs.send({"t": "refused", "errno": exc.errno or errno.EIO,
                           "message": exc.message[:4096]})
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError, AttributeError):
        return "?"


# ---- the daemon ------------------------------------------------------------------------

async def serve_master(cfg: MasterConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled or unmounted from outside; `task_status.started(port)`.

    Raises BpfsError (key, state file, mount) or OSError (port) before starting.
    """
    check_config(cfg)
    key = wire.load_key(cfg.key_file)
    cluster = Cluster(cfg.nodes)
    saved = statefile.load(cfg.state_file)
    if saved:
        ignored = cluster.restore(saved)
        if ignored:
            log.warning("state file %s: forgetting node%s %s, beyond --nodes %d", cfg.state_file,
                        "s" if len(ignored) > 1 else "", ", ".join(map(str, ignored)), cfg.nodes)
    master = Master(cfg, cluster, key)
    await master.persist()
    try:
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.listen)
    except OSError as exc:
        raise BpfsError(exc.errno or errno.EADDRNOTAVAIL,
                        f"cannot listen on {cfg.listen}:{cfg.port}: {exc.strerror or exc}") from None
    port = listeners[0].socket.getsockname()[1]
    ops = BpfsOperations(master)
    try:
        fsmount.mount(ops, cfg.mount)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    log.info("master serving %s, nodes on %s:%d (%d configured)", cfg.mount, cfg.listen, port,
             len(cluster.nodes()))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(master.procs.run)
            await nursery.start(master.execs.serve, cfg.listen)
            nursery.start_soon(_run_fuse, nursery.cancel_scope)
            nursery.start_soon(trio.serve_listeners, master.handle_connection, listeners)
            nursery.start_soon(master.watchdog)
            task_status.started(port)
    finally:
        fsmount.unmount()
        log.info("unmounted %s", cfg.mount)
        master.save_now()


def check_config(cfg: MasterConfig) -> None:
    """EINVAL for settings that cannot work (nodes would time out between heartbeats...)."""
    if not 0 <= cfg.nodes <= MAX_NODE + 1:
        raise BpfsError(errno.EINVAL, f"--nodes must be 0..{MAX_NODE + 1}, not {cfg.nodes}")
    problem = liveness.settings_problem(cfg.ping_timeout, cfg.heartbeat)
    if problem:
        raise BpfsError(errno.EINVAL, problem)
    if not 0 <= cfg.port <= 65535:
        raise BpfsError(errno.EINVAL, f"bad port {cfg.port}")


async def _run_fuse(scope: trio.CancelScope) -> None:
    await fsmount.serve()
    log.warning("the filesystem was unmounted from outside; stopping")
    scope.cancel()


async def _run(cfg: MasterConfig) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await serve_master(cfg, task_status=task_status)
                nursery.cancel_scope.cancel()
            await nursery.start(serve)
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")


def run_master(cfg: MasterConfig) -> int:
    """Run the master until SIGTERM/SIGINT (0) or a fatal error (logged, 1)."""
    setup_logging()
    try:
        return trio.run(_run, cfg)
    except BaseException as exc:
        leaves = _leaves(exc)
        if not all(isinstance(e, (BpfsError, OSError)) for e in leaves):
            raise
        for e in leaves:
            log.error("master: %s", e)
        return 1


def main(argv: list[str] | None = None) -> int:
    d = MasterConfig()
    p = argparse.ArgumentParser(prog="python -m bpfs.master", description="Run the bpfs master daemon.")
    p.add_argument("--mount", default=d.mount)
    p.add_argument("--listen", default=d.listen, help="host to listen on for node daemons")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--key-file", default=d.key_file)
    p.add_argument("--state-file", default=d.state_file)
    p.add_argument("--nodes", type=int, default=d.nodes,
                   help="configured node count: only 0..K-1 register; 0: any number")
    p.add_argument("--ping-timeout", type=float, default=d.ping_timeout)
    p.add_argument("--heartbeat", type=float, default=None,
                   help="default: a fifth of --ping-timeout, at most 1 s")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    setup_logging(logging.DEBUG if a.debug else logging.INFO)
    return run_master(MasterConfig(a.mount, a.listen, a.port, a.key_file, a.state_file, a.nodes,
                                   a.ping_timeout, a.heartbeat))


if __name__ == "__main__":
    sys.exit(main())

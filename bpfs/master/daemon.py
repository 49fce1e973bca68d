"""The bpfs master daemon: the cluster model, its persistence, the /bproc mount.

    run_master(MasterConfig(...)) -> int        blocking; SIGTERM/SIGINT: unmount, return 0
    await nursery.start(serve_master, cfg)      for tests; started() with the bound port
    bpfs master --help                          the same from a shell (bpfs/cli/bpfs_main.py)

`Master` is the ctl.Services the filesystem calls. Node links are bpfs/master/links.py;
the heartbeat interval told to nodes is a fifth of `ping_timeout`, at most 1 s, unless
set. Data the user set (ACLs, admin states) is written to the state file before the
command that changed it returns.

Node numbers (bpfs/model.py `Cluster.attach`): with `--nodes K` (K > 0) only
0..K-1 exist; a node asking for another number is refused (ENODEV), one asking
for none gets the lowest free of them (EBUSY when all are connected). With
`--nodes 0` numbering is open: any number 0..MAX_NODE, or the lowest free; such
a node's entry is kept in the state file only once someone changed its ACL or
admin state (a key holder cannot grow the file).

Migrated processes (execmove, ghosts, signals, exits) are bpfs/master/procs.py's
`ProcService`, which owns the ptrace thread. `exec` on nodes/N/ctl (the master starts
the command itself, as the writer, and keeps its output) is bpfs/master/exec.py's
`ExecService`, with its stdio endpoint listening on the same host as the node server.

Errors that stop the master (unreadable key, corrupt state file, port in use,
mount point busy) are logged as one line and `run_master` returns 1.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import trio

from bpfs import heap
from bpfs.errors import BpfsError
from bpfs.fs import mount as fsmount
from bpfs.fs.ops import BpfsOperations
from bpfs.master import liveness, names, statefile
from bpfs.master.exec import ExecService
from bpfs.master.links import NodeLinks
from bpfs.master.procs import ProcService
from bpfs.master.usage import INTERVAL as USAGE_INTERVAL, UsageService
from bpfs.model import MAX_NODE, Caller, Cluster
from bpfs.wire import execreq, framing as wire

log = logging.getLogger("bpfs.master")


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
    usage_interval: float = USAGE_INTERVAL   # seconds between a node's usage reports
    hosts_file: str | None = None      # where to write the names for libnss_bproc (None:
                                       # nowhere; nodes still get them: bpfs.master.names)

    def __post_init__(self) -> None:
        if self.heartbeat is None:
            self.heartbeat = liveness.heartbeat_for(self.ping_timeout)


class Master:
    """The master's services (ctl.Services): the model, node links, persistence."""

    def __init__(self, cfg: MasterConfig, cluster: Cluster, key: bytes) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self._persist_lock = trio.Lock()
        self._saved_revision = -1
        self.procs = ProcService(cluster, self.send_node)
        self.usage = UsageService(cluster, self.send_node, cfg.usage_interval)
        assert cfg.heartbeat is not None            # MasterConfig.__post_init__
        self.links = NodeLinks(cluster, key, self.procs, cfg.heartbeat, cfg.ping_timeout,
                               self.usage, os.path.abspath(cfg.mount))
        self.procs.send_now = self.links.send_now
        self.procs.send_threadsafe = self.links.send_threadsafe
        self.procs.flush_soon = self.links.flush_soon
        self.procs.host_of = self.links.host_of
        self.procs.local_of = self.links.local_of
        self.procs.link_host = "127.0.0.1" if cfg.listen in ("0.0.0.0", "::", "") \
            else cfg.listen
        self.execs = ExecService(cluster, self.procs, cfg.mount)
        self.procs.on_moving = self.execs.expect_again

    # ---- ctl.Services ------------------------------------------------------------

    async def send_node(self, node: int, msg: dict[str, Any]) -> None:
        await self.links.send_node(node, msg)

    async def execmove(self, node: int, caller: Caller, req: execreq.ExecMove,
                       rank_errors: Sequence[BpfsError | None] = ()) -> int:
        return await self.procs.execmove(node, caller, req, rank_errors=rank_errors)

    async def arm_from_node(self, node: int, caller: Caller, req: execreq.ExecMove,
                            rank_errors: Sequence[BpfsError | None] = ()) -> int:
        return await self.procs.arm_from_node(node, caller, req, rank_errors)

    async def signal_proc(self, pid: int, sig: int) -> None:
        await self.procs.signal_proc(pid, sig)

    async def fresh_usage(self, pid: int) -> None:
        """Before procs/P/stat or status is read: figures at most a moment old, if the
        node answers in time (bpfs/master/usage.py)."""
        await self.usage.fresh(pid)

    async def exec_command(self, node: int, caller: Caller, argv: list[str]) -> int:
        return await self.execs.start(node, caller, argv)

    async def move_proc(self, caller: Caller, pid: int, target: int | None,
                        gen: int | None = None) -> str:
        return await self.procs.move_proc(caller, pid, target, gen)

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
    master.links.fs_ops = ops           # nodes' processes ask through their daemons too
    try:
        fsmount.mount(ops, cfg.mount)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    log.info("master serving %s, nodes on %s:%d (%d configured)", cfg.mount, cfg.listen, port,
             len(cluster.nodes()))
    hosts = names.Names(cfg.hosts_file, cluster, names.master_address(cfg.listen))
    cluster.events.subscribe(hosts.update)         # node addresses change with node events
    hosts.update()
    master.links.names = hosts.message
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(master.procs.run)
            await nursery.start(master.procs.relay_forks.run)
            await nursery.start(master.usage.run)
            await nursery.start(master.execs.serve, cfg.listen)
            nursery.start_soon(_run_fuse, nursery.cancel_scope)
            nursery.start_soon(trio.serve_listeners, master.links.handle_connection, listeners)
            nursery.start_soon(master.links.watchdog)
            nursery.start_soon(hosts.broadcast, lambda: list(master.links.conns),
                               master.links.send_node)
            task_status.started(port)
    finally:
        fsmount.unmount()
        log.info("unmounted %s", cfg.mount)
        master.save_now()
        hosts.remove()


def check_config(cfg: MasterConfig) -> None:
    """EINVAL for settings that cannot work (nodes would time out between heartbeats...)."""
    if not 0 <= cfg.nodes <= MAX_NODE + 1:
        raise BpfsError(errno.EINVAL, f"--nodes must be 0..{MAX_NODE + 1}, not {cfg.nodes}")
    problem = liveness.settings_problem(cfg.ping_timeout, cfg.heartbeat)
    if problem:
        raise BpfsError(errno.EINVAL, problem)
    if not 0.05 <= cfg.usage_interval <= 1e6:
        raise BpfsError(errno.EINVAL, f"--usage-interval must be 0.05..1e6 s, not "
                        f"{cfg.usage_interval}")
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
    heap.keep_buffers()                     # a move's buffers stay warm (bpfs/heap.py)
    try:
        return trio.run(_run, cfg)
    except BaseException as exc:
        leaves = _leaves(exc)
        if not all(isinstance(e, (BpfsError, OSError)) for e in leaves):
            raise
        for e in leaves:
            log.error("master: %s", e)
        return 1


"""The node daemon proper: connect, authenticate, register, heartbeat, obey.

    run(cfg) -> exit status          (blocking; trio.run inside)

One `Node` lives as long as the process; it makes one `Session` per connection
(bpfs/node/session.py: register, heartbeats, reports, dispatch), which dispatches every
message from the master through `FROM_MASTER`, a table of `message class -> async
handler(session, msg)`. A session reports `state up` once registered.

/bproc on the node (bpfs/node/fsclient.py, with bpfs/fs/remote.py given as
`cfg.serve_fs` by the command line) is mounted at the master's mount point after the
first `welcome`, before the node reports `up`, and stays until the daemon stops;
`fs_reply` goes to it.

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

import errno
import ipaddress
import logging
import os
import signal
import sys

import trio

from bpfs import heap, hostsfile
from bpfs.errors import BpfsError
from bpfs.node import nsutil
from bpfs.node import direct, mover, ownpids, procs, streamin, usage
from bpfs.node.config import EXIT_LOST, EXIT_OK, EXIT_REFUSED, NodeConfig
from bpfs.node.fsclient import FsClient
from bpfs.node.init import Reaper, kill_namespace
from bpfs.node.mover import Mover
from bpfs.node.restorer import NodeRestorer, setup_cache_dir
from bpfs.node.supervisor import Supervisor
from bpfs.node.session import CONNECTION_ERRORS, Handler, Outcome, Session, why
from bpfs.node.standins import Standins
from bpfs.wire import framing as wire, messages

log = logging.getLogger("bpslave")


CTL_OUTCOMES = {"reboot": Outcome.REBOOT, "halt": Outcome.HALT, "pwroff": Outcome.HALT}


async def _on_ctl(session: Session, msg: messages.Ctl) -> Outcome | None:
    cmd = msg.cmd
    outcome = CTL_OUTCOMES.get(cmd)
    if outcome is None:
        log.warning("ignoring unknown ctl command %r", cmd[:40])
        return None
    log.info("master says %s", cmd)
    return outcome


async def _on_fs_reply(session: Session, msg: messages.FsReply) -> None:
    session.node.fs_client.on_reply(msg)


async def _on_names(session: Session, msg: messages.Names) -> Outcome | None:
    """The cluster's names: written where this node's libnss_bproc reads them, if this
    node keeps a hosts file of its own (an embedded node reads the master's)."""
    path = session.node.cfg.hosts_file
    if path is None:
        return None
    pairs = [(n, address) for n, address in msg.nodes if _is_address(address)]
    master = msg.master if _is_address(msg.master) else "127.0.0.1"
    try:
        await trio.to_thread.run_sync(hostsfile.write_atomically, path,
                                      hostsfile.render_hosts(master, pairs))
    except OSError as exc:
        log.error("cannot write the hosts file %s: %s", path, exc)
    return None


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# What the master may send a registered node, by message class (bpfs.wire.messages.
# FROM_MASTER decodes them); add a row for a new one. Any other is a protocol error that
# ends the session.
FROM_MASTER: dict[type[messages.Msg], Handler] = {
    messages.Ctl: _on_ctl, messages.Restore: streamin.on_restore, messages.Files: procs.on_files,
    messages.Signal: procs.on_signal, messages.Sample: usage.on_sample,
    messages.Forked: procs.on_answer, messages.Killed: procs.on_answer,
    messages.Execd: procs.on_answer, messages.Armed: procs.on_armed,
    messages.Spare: procs.on_spare, messages.NotTaken: procs.on_nottaken,
    messages.Ended: procs.on_ended,
    messages.FsReply: _on_fs_reply,
    messages.Names: _on_names,
    messages.Dump: mover.on_dump, messages.Drop: mover.on_drop, messages.Way: mover.on_way,
    messages.Resume: mover.on_resume, messages.Again: procs.on_again,
    messages.Streamed: streamin.on_streamed, messages.Piece: streamin.on_piece,
    messages.Abort: streamin.on_abort, messages.Take: direct.on_take,
}


class Backoff:
    """0.1 s, 0.2 s, 0.4 s ... capped; `reset` after every successful registration."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high, self.next = low, high, low

    def reset(self) -> None:
        self.next = self.low

    def step(self) -> float:
        delay, self.next = self.next, min(self.next * 2, self.high)
        return delay


class Node:
    def __init__(self, cfg: NodeConfig, key: bytes) -> None:
        self.cfg = cfg
        self.key = key
        self.number: int | None = cfg.node
        self.reaper = Reaper()
        self.procs = procs.ProcessTable(self.reaper)
        self.restorer = NodeRestorer(None, self.procs.jobs_w)
        self.backoff = Backoff(cfg.backoff_min, cfg.backoff_max)
        self.supervisor: Supervisor | None = None
        self.mover = Mover()
        self.standins = Standins(self)
        self.fs_client = FsClient(cfg.serve_fs)
        self.nursery: trio.Nursery | None = None    # the daemon's: /bproc is served there

    def start(self) -> None:
        """Mount the file cache, take the PID namespace's counter (bpfs/node/supervisor.py)
        and make the Restorer (in the event loop's thread)."""
        self.restorer.cache_dir = setup_cache_dir()
        self.supervisor = make_supervisor(self.procs)
        if self.supervisor is not None:
            self.restorer.settle = self.supervisor.settle
            self.restorer.numbering = self.supervisor.counter.guard
            # every thread and process of ours is numbered with the counter parked
            ownpids.install(self.supervisor.counter)
            # the supervisor's receiver thread takes the GIL at once when a call stops
            # (its caller is interruptible until then): 1 ms, not Python's 5
            sys.setswitchinterval(0.001)
        self.restorer.start()

    async def serve(self) -> int:
        """Sessions until halted, or until a failure ends us without -r. Returns the exit status."""
        while True:
            outcome, code = await self._one_connection()
            if outcome is Outcome.HALT:
                return EXIT_OK
            self.mover.session_over()
            self.standins.session_over()
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
            fs = await wire.connect(self.cfg.host, self.cfg.port, self.key,
                                    local_address=self.cfg.source)
        except wire.AuthError as exc:
            log.error("authentication with %s failed: %s", self.cfg.address, exc)
            return Outcome.LOST, EXIT_REFUSED
        except (OSError, trio.TooSlowError, wire.ProtocolError, EOFError) as exc:
            log.log(logging.INFO if self.cfg.reconnect else logging.ERROR,
                    "cannot reach the master at %s: %s", self.cfg.address, why(exc))
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
            session = Session(self, fs, FROM_MASTER)
            self.number = await session.register()
            # a master that sends its pid_max answers `fork` and `kill`: supervise
            self.restorer.supervised = self.supervisor is not None and session.pid_max is not None
            if self.supervisor is not None and session.pid_max is not None:
                self.supervisor.park(session.pid_max)
            self.backoff.reset()
            if self.nursery is not None:
                await self.fs_client.mount(session.mount, self.nursery)
                self.restorer.bproc = self.fs_client.mounted
            self.fs_client.attach(session)
            self.fs_client.number = self.number
            await session.send(messages.State(state="up"))
            log.info("registered as node %d with %s (heartbeat %.1f s)",
                     self.number, self.cfg.address, session.heartbeat)
            return await session.run(), EXIT_LOST
        except wire.ProtocolError as exc:
            log.error("protocol error from the master at %s: %s", self.cfg.address, exc)
        except BpfsError as exc:
            log.error("the master refused node %s: %s", _num(self.number), exc)
            return Outcome.LOST, EXIT_REFUSED
        except CONNECTION_ERRORS as exc:
            log.warning("connection to the master lost: %s", why(exc))
        finally:
            self.fs_client.detach()
        return Outcome.LOST, EXIT_LOST

    def drop_held_processes(self) -> None:
        """bproc: a node that loses (or reboots away from) its master kills what it held."""
        if kill_namespace():
            log.info("killed the processes of the node's PID namespace")
            self.restorer.renew()               # kill(-1) took the Restorer's helper too
        self.reaper.reap()


def make_supervisor(table: procs.ProcessTable) -> Supervisor | None:
    """The supervisor, if we are PID 1 of a PID namespace of our own (else the node's
    processes cannot get cluster PIDs: they run unsupervised, and say so)."""
    if os.getpid() != 1:
        log.warning("not PID 1 of a PID namespace: processes forked on this node get no "
                    "cluster PID")
        return None
    try:
        return Supervisor(park_at=DEFAULT_PARK, on_child=table.hold_child,
                          on_end=table.drop_child)
    except OSError as exc:
        log.warning("cannot steer this namespace's PIDs (%s): processes forked on this node "
                    "get no cluster PID", exc)
        return None


DEFAULT_PARK = 1 << 21      # until the master says its pid_max


def _num(n: int | None) -> str:
    return "(any)" if n is None else str(n)


async def _main(cfg: NodeConfig, key: bytes) -> int:
    node = Node(cfg, key)
    node.start()
    async with trio.open_nursery() as nursery:
        node.nursery = nursery
        if node.supervisor is not None:
            await nursery.start(node.supervisor.run)
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
    heap.keep_buffers()                                 # a move's buffers stay warm
    return trio.run(_main, cfg, key)

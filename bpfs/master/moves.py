"""Moving a running process (bproc_move): `move N` on procs/P/ctl, master side.

    await procs.move_proc(caller, pid, target, gen)    target: a node, or None (the master)

From the master to a node: the tracer seizes P (pinned, proven the caller's to move),
stops it, and dumps it where it stands while a stdio relay holding P's fds 0-2 starts
(bpfs/master/relay.py, forked by bpfs/master/relayfork.py's server); the node restores
it with P's PID and links to the relay; at its
`restored` the stopped P is parked as its own ghost (bpfs/migrate/ghost_move.py).
From a node A: A stops P and dumps it (`dump` -> `part`s, `dumped`, bpfs/node/mover.py)
and holds it; to node B: B restores it (`restore` with `again`: its links are made
again, stdin from the byte it had read), its pages straight from A when B takes them
and A reaches B (bpfs/master/tonode.py); back to the master: its image streams into its
ghost as the parts come, and the tracer restores the rest (bpfs/master/homecoming.py),
with links made again from here. Then A drops its copy; if
anything failed, A lets it go on (`resume`) and nothing else changed.

While a move is under way P is in `_by_pid` as a migration that has not started: signals
for it wait, and go where it runs once the move is over. A process that writes its own
move (libbproc's bproc_move) is stopped before its write is answered; the write then
"returns" in the moved copy, and if the move fails, it fails with the errno where it was.

Errors (the write's errno): ESRCH no such process; EPERM not the caller's to move, or the
caller may not use the target node; ENODEV no such node; EHOSTDOWN the node is down;
EBUSY a move or a start under way, threads, children, a tracer, an fd that cannot move;
ETIMEDOUT a node that did not answer in time.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Awaitable, Callable

import trio

from bpfs import procstatus
from bpfs.errors import BpfsError
from bpfs.master import relay as relays
from bpfs.master.relayfork import RelayForks
from bpfs.master.tonode import ToNode
from bpfs.migrate import ptrace as pt
from bpfs.master.migrations import Migration, Reply, _command, wait_future
from bpfs.master.homecoming import Home, HomeComing
from bpfs.master.outpages import DIRECT_MIN, OutPages, OutRoute, worth_a_stream
from bpfs.model import Caller, Cluster, Proc, StdioLinks
from bpfs.pin import Pin
from bpfs.wire import execreq, messages, relaystart

log = logging.getLogger("bpfs.master.procs")

DUMP_TIMEOUT = 120.0            # `dump` sent -> `dumped` (a big process takes a while)
DUMP_QUEUE = 8                  # parts (8 MiB) queued for a move's task at most
SETTLE_TIMEOUT = 10.0           # a start, or a move that has started, finishing its steps
ALL_STDIO = frozenset({0, 1, 2})


class Moves(ToNode, HomeComing, OutPages):
    """Mixed into ProcService (which brings the tracer, the tables and the steps)."""

    cluster: Cluster
    tracer: Any
    _migrations: dict[int, Migration]
    _by_pid: dict[int, Migration]
    _ids: Any
    send_node: Callable[[int, messages.Msg], Awaitable[None]]

    def __init__(self) -> None:
        super().__init__()
        self._dumping: set[int] = set()     # moves whose `part`s and `dumped` we take
        self.link_host = "127.0.0.1"        # where the master's own links go (a relay)
        self._relays: dict[int, relays.Relay] = {}
        self.relay_forks = RelayForks(relaystart.environment())    # run by the daemon
        self._home: dict[int, Home] = {}    # master processes back from a node, by pid
        # the exec endpoint's (bpfs/master/exec.py expect_again): a move of `pid` begins
        # (True) or failed (False), so the end of its old links does not end its output
        self.on_moving: Callable[[int, bool], Any] = lambda pid, moving: None

    # ---- the request ----------------------------------------------------------------

    async def move_proc(self, caller: Caller, pid: int, target: int | None,
                        gen: int | None = None) -> str:
        self.check_ready()                                  # type: ignore[attr-defined]
        if target is not None:
            self._check_target(target, caller)
        await self._settled(pid)
        if pid in self._by_pid:
            raise BpfsError(errno.EBUSY, f"process {pid} is moving or starting: try again "
                            "once it runs")
        p = self.cluster.procs.get(pid)
        if p is None and gen:               # the file was of a migrated process, gone since
            raise BpfsError(errno.ESRCH, f"process {pid} is gone (or back on the master)")
        if p is None:
            if target is None:
                _master_process(pid, caller)
                return f"ok: process {pid} is on the master already"
            return await self._from_master(caller, pid, target)
        p = self.cluster.check_signal(pid, caller, gen)
        if p.state != "running":
            raise BpfsError(errno.EBUSY, f"process {pid} is {p.state}: only a running "
                            "process moves")
        if target == p.node:
            return f"ok: process {pid} is on node {target} already"
        self.check_children(pid)                            # type: ignore[attr-defined]
        return await self._from_node(caller, p, target)

    async def _settled(self, pid: int) -> None:
        """A migration of `pid` whose process runs already (its `restored` came) is over
        but for its task's last steps: wait for those (a move written right after the
        process's first output found it "starting"). A start (bpsh's: it has a request) is
        waited for whole: its process may run, and print, before its `restored` is read
        here (a busy master; seen in CI: a move written after the first output failed
        EBUSY). A move under way is not waited for: EBUSY, try again."""
        m = self._by_pid.get(pid)
        if m is None or not (m.started or m.req is not None):
            return
        with trio.move_on_after(SETTLE_TIMEOUT):
            while self._by_pid.get(pid) is m:
                await trio.sleep(0.001)

    def _check_target(self, n: int, caller: Caller) -> None:
        if not self.cluster.has_node(n):
            raise BpfsError(errno.ENODEV, f"no node {n}")
        try:
            self.cluster.check_run(n, caller)
        except BpfsError as exc:
            if exc.errno == errno.EACCES:
                raise BpfsError(errno.EPERM, exc.message) from None
            raise

    # ---- from the master ------------------------------------------------------------

    async def _from_master(self, caller: Caller, pid: int, target: int) -> str:
        own = caller.node is None and caller.pid == pid
        pin = caller.pin if own and caller.pin is not None and caller.pin.tid == pid \
            else Pin.take(pid)
        try:
            who = _master_process(pid, caller)
            self.check_ready()                              # type: ignore[attr-defined]
            await wait_future(self.tracer.seize_running(pid, pin.check, stop=not own))
        finally:
            if pin is not caller.pin:
                pin.close()
        send, receive = trio.open_memory_channel[Reply](64)
        m = Migration(next(self._ids), target, pid, Caller(*who), None,  # type: ignore[arg-type]
                      send, receive)
        self._by_pid[pid] = m
        self._migrations[m.id] = m
        if own:
            self._spawn(self._guard_move, m, self._master_to_node(m, own))  # type: ignore[attr-defined]
            return "ok"
        await self._guard_move(m, self._master_to_node(m, own), raise_=True)
        return "ok"

    async def _master_to_node(self, m: Migration, own: bool) -> None:
        pid, relay = m.pid, None
        home = self._home.pop(pid, None)
        if home is not None and not home.still_of(pid):
            home = None
        route = OutRoute(m.id)      # its pages straight to the node (outpages.py)
        try:
            links = set(home.inodes) if home is not None else ALL_STDIO
            dumped: list[Any] = []

            def dump() -> None:
                # its pages are read as they are sent, all before it is parked (`restored`)
                dumped.append(self.tracer.dump_moving(pid, links, lazy=True))
            if worth_a_stream(pid):     # the node asked, and connected to, while it dumps
                self._spawn(self._open_route, m, route)     # type: ignore[attr-defined]
            else:
                route.decided.set()
            if home is None:    # stopped, its relay is asked for, and starts while it dumps
                if own:                 # else stopped already (seize_running)
                    await wait_future(self.tracer.stop_moving(pid))
                c = m.caller
                relay = await relays.start(pid, c.uid, c.gid, sorted(c.groups), self.link_host,
                                           self.relay_forks, on_asked=dump)
                m.req = execreq.ExecMove(relay.port, relay.token, 0, "socket", "socket",
                                         "socket")
            else:
                dump()
            image = await wait_future(dumped[0])
            await route.decided.wait()
            m.cmd = _command(image.argv, image.comm)
            if home is not None:    # back from a node: its links go on from here (no relay)
                ln = home.links
                m.req = execreq.ExecMove(ln.port, ln.token, 0, *(
                    spec if fd in home.inodes else "null" for fd, spec in enumerate(ln.io)))
                m.host = ln.host
                m.again = home.base + (_stdin_read(pid) if 0 in home.inodes else 0)
            parked: list[Any] = []
            close = tuple(sorted(home.inodes)) if home is not None else ()
            m.on_started = lambda: parked.append(self.tracer.park_moved(pid, close))
            self._publish(m)                                # type: ignore[attr-defined]
            p = self.cluster.procs[pid]
            p.stdin_base = m.again or 0
            if home is not None:
                p.links = home.links
            way = await self._restore_out(m, image, route)
            self.back_home(pid, m.node)                     # type: ignore[attr-defined]
            await wait_future(parked[0])
        except BaseException as exc:
            await route.close()
            await self._abort(m)    # a take, or a stream, the node may hold for it
            if relay is not None:
                relay.kill()
                self._spawn(relays.reap, relay)             # type: ignore[attr-defined]
            if m.started:       # it runs on the node: the master's copy must not run too
                self._kill_ghost(                           # type: ignore[attr-defined]
                    pid, f"move {m.id} to node {m.node} failed after its process ran "
                    f"there ({exc!r})")
            else:
                self.cluster.remove_proc(pid, m.gen or None)
                self._forget(m)     # before it goes on: its next move is not "moving"
                await self._let_go(pid, exc, own)
            raise
        if relay is not None:
            self._relays[pid] = relay
            self._spawn(self._reap_relay, relay)            # type: ignore[attr-defined]
        log.info("move %d: pid %d (%s) from the master to node %d (its pages %s)", m.id, pid,
                 m.cmd, m.node, way)

    async def _let_go(self, pid: int, exc: BaseException, own: bool) -> None:
        err = getattr(exc, "errno", None) or errno.EIO
        with trio.CancelScope(shield=True):
            try:
                await wait_future(self.tracer.release_moving(pid, err if own else None))
            except BpfsError as exc2:
                self._kill_ghost(                           # type: ignore[attr-defined]
                    pid, f"it did not move, and cannot go on ({exc2})")

    async def _reap_relay(self, relay: relays.Relay) -> None:
        await relays.reap(relay)
        if self._relays.get(relay.pid) is relay:
            del self._relays[relay.pid]

    # ---- from a node ----------------------------------------------------------------

    async def _from_node(self, caller: Caller, p: Proc, target: int | None) -> str:
        own = caller.node == p.node and caller.pid == p.pid
        links = p.links.fds if p.links is not None else ()
        who = _ghost_credentials(p.pid)
        send, receive = trio.open_memory_channel[Any](DUMP_QUEUE)
        d = Migration(next(self._ids), p.node, p.pid, Caller(*who), None,  # type: ignore[arg-type]
                      send, receive, cmd=p.cmd)
        self._by_pid[p.pid] = d
        self._migrations[d.id] = d
        self._dumping.add(d.id)
        self.on_moving(p.pid, True)
        self.spares_leaving(p.pid)              # type: ignore[attr-defined]
        m = None
        try:
            way: bool | None = None
            where: dict[str, Any] = {}
            if target is not None:      # its restore there, which may take the pages straight
                m = self._target(d, p, target)
                way = self.host_of(target) is not None or None
            elif p.usage is None or p.usage.rss >= DIRECT_MIN // 2:    # home, not small
                where = await self._take_home(d)    # (its last report): pages straight to us
            await self.send_node(p.node, messages.Dump(id=d.id, pid=p.pid, links=links or None,
                                                       way=way, **where))
            if m is not None and way:   # the target asked while the source dumps
                self._ask_way(d, m)
        except BaseException:
            self.on_moving(p.pid, False)
            self._forget(d)
            if m is not None:
                await self._abort(m)                        # type: ignore[attr-defined]
                self._migrations.pop(m.id, None)
            raise
        work = self._node_to(d, p, target, own, m)
        if own:
            self._spawn(self._guard_move, d, work)          # type: ignore[attr-defined]
            return "ok"
        await self._guard_move(d, work, raise_=True)
        return "ok"

    async def _node_to(self, d: Migration, p: Proc, target: int | None, own: bool,
                       m: Migration | None) -> None:
        """The dump comes in `part`s: to a node (`m`, its restore there) they go on as
        they come, or straight from the source (bpfs/master/tonode.py); home, they stream
        into the ghost (bpfs/master/homecoming.py). Then the source drops its copy; on any
        failure it lets it go on (`resume`), and the target discards what it had
        (`abort`)."""
        source, pid = d.node, d.pid
        deadline = trio.current_time() + DUMP_TIMEOUT
        old_links, relayed = p.links, False
        way = ""
        try:
            first = await self._next_of_dump(d, deadline)
            if m is not None and m.took is not None:    # `take`'s answer, then m's own
                await m.took.wait()
            relayed = self.take_relay(d.id, p, source)      # type: ignore[attr-defined]
            consumed = p.stdin_base + (first.consumed or 0)   # the link counts from its start
            if relayed:                                 # new links, to a relay that has
                consumed = 0                            # read nothing for it yet
            if m is None:
                await self._home_from(d, p, first, consumed, deadline)
            else:
                through, straight = await self._to_node(d, m, p, first, consumed, deadline)
                way = (f" ({straight} bytes straight, {through} through the master)"
                       if straight else f" (all {through} bytes through the master)")
        except BaseException as exc:
            self.on_moving(pid, False)
            if m is not None:
                if m.taking is not None:
                    m.taking.cancel()
                await self._abort(m)                        # type: ignore[attr-defined]
            if d.ghost_gone:
                await self._verdict(messages.Drop(id=d.id, pid=pid), source)
            else:
                p.links = old_links
                if relayed:
                    self.no_standin(pid)                    # type: ignore[attr-defined]
                self._forget(d)     # before it goes on: its next move is not "moving"
                err = getattr(exc, "errno", None)
                await self._verdict(messages.Resume(id=d.id, pid=pid,
                                                    errno=err if own and err else None),
                                    source)
            raise
        finally:
            self._end_take_home(d)
            self._dumping.discard(d.id)
            if m is not None:
                self._migrations.pop(m.id, None)
        await self._verdict(messages.Drop(id=d.id, pid=pid), source)
        if target is None:
            self.watch_home(pid)                            # type: ignore[attr-defined]
        log.info("move %d: pid %d (%s) from node %d to %s%s", d.id, pid, p.cmd, source,
                 "the master" if target is None else f"node {target}", way)


    async def _verdict(self, msg: messages.Drop | messages.Resume, node: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.send_node(node, msg)
            except BpfsError as exc:
                log.info("pid %d: %s not sent to node %d: %s", msg.pid, messages.tag(type(msg)),
                         node, exc)

    # ---- common ---------------------------------------------------------------------

    async def _guard_move(self, m: Migration, work: Awaitable[None], raise_: bool = False
                          ) -> None:
        """One move's steps; whatever happens it is forgotten after, and the signals that
        waited for it go where the process is now."""
        try:
            await work
        except BpfsError as exc:
            log.warning("move %d of pid %d failed: %s", m.id, m.pid, exc)
            if raise_:
                raise
        except Exception:
            log.exception("move %d of pid %d failed", m.id, m.pid)
            if raise_:
                raise BpfsError(errno.EIO, "internal error in the master") from None
        finally:
            self._forget(m)
            if m.ghost_gone:
                self._ghost_gone(m.pid, 9)                  # type: ignore[attr-defined]
                self.standin_over(m.pid, 9)                 # type: ignore[attr-defined]
            for sig in m.signals:
                if m.pid in self.cluster.procs:
                    self._forward(m.pid, sig)               # type: ignore[attr-defined]
                else:
                    _kill_quietly(m.pid, sig)

    def _forget(self, m: Migration) -> None:
        self._end_take_home(m)
        self._migrations.pop(m.id, None)
        if self._by_pid.get(m.pid) is m:
            del self._by_pid[m.pid]
        self._dumping.discard(m.id)
        self.forget_relay(m.id)                             # type: ignore[attr-defined]

    # ---- node messages -------------------------------------------------------------

    async def on_part(self, node: int, msg: messages.Part | messages.Dumped) -> None:
        """A `part` or the `dumped` of a move under way, to its task, in order; awaited, so
        a source faster than the target waits (its link is not read meanwhile)."""
        m = self._migrations.get(msg.id)
        if m is None or m.node != node or msg.id not in self._dumping:
            log.warning("node %d: %s of unknown move %d; ignored", node,
                        messages.tag(type(msg)), msg.id)
            return
        try:
            with trio.fail_after(DUMP_TIMEOUT):
                await m.send.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            log.warning("node %d: %s of move %d, which is over; ignored", node,
                        messages.tag(type(msg)), msg.id)

    on_dumped = on_part


def _master_process(pid: int, caller: Caller) -> tuple[int, int, frozenset[int], int, None]:
    """Who `pid`, a process of the master, runs as, if `caller` may move it: (uid, gid,
    groups, pid, None). ESRCH none; EPERM not the caller's (every uid), or the master's
    own; EBUSY threads, a tracer, children."""
    if pid <= 1 or pid == os.getpid():
        raise BpfsError(errno.EPERM, f"process {pid} cannot move")
    try:
        st = procstatus.read(pid)
    except OSError:
        raise BpfsError(errno.ESRCH, f"no process {pid}") from None
    try:
        uids = [int(x) for x in st["Uid"].split()]
        gids = [int(x) for x in st["Gid"].split()]
        groups = frozenset(int(x) for x in st.get("Groups", "").split())
        threads, tracer = int(st.get("Threads", "1")), int(st.get("TracerPid", "0"))
    except (KeyError, ValueError):
        raise BpfsError(errno.ESRCH, f"no process {pid}") from None
    if not (caller.is_root or set(uids) == {caller.uid}):
        raise BpfsError(errno.EPERM, f"not allowed to move process {pid}")
    if st.get("Kthread", "0") == "1" or not os.path.exists(f"/proc/{pid}/exe"):
        raise BpfsError(errno.EPERM, f"process {pid} is a kernel thread")
    if tracer:
        raise BpfsError(errno.EBUSY, f"process {pid} is traced (by process {tracer})")
    if threads != 1:
        raise BpfsError(errno.EBUSY, f"process {pid} has {threads} threads: only a "
                        "single-threaded process moves yet")
    if _has_children(pid):
        raise BpfsError(errno.EBUSY, f"process {pid} has children: it cannot move while "
                        "they live")
    if len(set(gids)) != 1:
        raise BpfsError(errno.EPERM, f"process {pid} runs set-group-ID: it cannot move")
    return uids[0], gids[0], groups, pid, None


def _ghost_credentials(pid: int) -> tuple[int, int, frozenset[int], int, None]:
    """Who the ghost of `pid` is: the master's word on whom it runs as, not the node's."""
    try:
        st = procstatus.read(pid)
        return (int(st["Uid"].split()[0]), int(st["Gid"].split()[0]),
                frozenset(int(x) for x in st.get("Groups", "").split()), pid, None)
    except (OSError, KeyError, ValueError):
        raise BpfsError(errno.ESRCH, f"process {pid} has no ghost") from None


def _stdin_read(pid: int) -> int:
    """How many bytes the stopped master process `pid` has read from its stdin link (0:
    it has none that is a socket)."""
    from bpfs.wire.stdiolink import stdin_consumed
    (fd,) = pt.copy_fds(pid, [0])
    if fd is None:
        return 0
    try:
        return stdin_consumed(fd)
    except BpfsError:               # not a TCP socket
        return 0
    finally:
        os.close(fd)


def _has_children(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return bool(f.read().split())
    except OSError:
        return False


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass

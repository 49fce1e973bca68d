"""The cluster model: nodes, their ACLs and states, migrated processes, events.

Pure: no I/O, no trio, no clock but the one passed in. The master daemon, the
FUSE adapter and the ctl commands are thin layers around one `Cluster`; every
rule of DESIGN §2 lives here and every refusal is a `BpfsError` whose errno the
caller of a /bproc file gets.

Node state is *derived*, never stored, so it cannot drift from the facts:

    not connected                      -> "down"
    connected, reboot/halt/pwroff sent -> that command (until the link drops)
    connected, not yet reported "up"   -> "boot"
    booted, admin state set            -> "unavailable" or "error"
    booted                             -> "up"

The rules for ACLs, chmod/chown/chgrp, node numbers, the admin state, reboot/halt/
pwroff and who may run where are listed in docs/model.md (tests/unit/test_model.py
holds them).

Events (see bpfs/formats.py for the line format): `node N state S` on every
change of the derived state, `node N mode 0MMM`, `node N owner UID GID`;
`proc PID start N`, `proc PID signal SIG`, `proc PID exit CODE|signal N`.

Processes: `start_proc` gives each migrated process a fresh generation (a
serial, 1 to PROC_GENERATIONS - 1 and round again), so a reused PID never
reaches a stale inode (unless 2**24 - 1 processes have had that very PID
since); `mid` is the id of the migration that put it on its node (the id the
node knows it by, bpfs/wire/framing.py). Signalling one
(`check_signal`) is for its uid or root (EPERM), like kill(2); `exited` records
the real status once, and `remove_proc` drops it when the ghost is gone.

A process is published (`start_proc`, event `proc PID start N`) as soon as the
master holds its ghost, in state "starting", before the node has restored it:
so procs/PID exists before the program can print anything. `proc_running`
makes it "running" once the node has restored it; `start_failed` ends one that
never ran: event `proc PID exit failed ENAME` (the errno's name), and it is
removed at once.

Output (`ProcOutput`, for processes started by `exec` on nodes/N/ctl) is bpfs/output.py's.
`Cluster.subscribe` hears every event and every change of any output.
"""

from __future__ import annotations

import errno
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NewType

from bpfs.errors import BpfsError
from bpfs.formats import Event, Facts
from bpfs.output import ProcOutput
from bpfs.usage import Sample, Usage, from_sample

# The model's node numbers and process IDs, in its signatures and records: a checker tells
# one from the other and from uids and counts; at run time they are plain ints.
NodeId = NewType("NodeId", int)
Pid = NewType("Pid", int)

ADMIN_STATES = ("up", "unavailable", "error")
POWER_COMMANDS = ("reboot", "halt", "pwroff")
NEW_NODE_MODE = 0o111
ACL_BITS = 0o111
MAX_NODE = 65535
EVENT_CAPACITY = 1024
STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
PROC_GENERATIONS = 1 << 24          # generations 1..2**24-1, then 1 again: what an inode
                                    # number has room for (bpfs/fs/inodes.py)


@dataclass(frozen=True)
class Caller:
    """Who asks: uid, gid, supplementary groups, and the (thread) id of the process.

    `pid` is only a number, good for messages and lookups: acting on that process later
    needs `pin` (a bpfs.pin.Pin taken while the caller was known to hold the number), which
    proves it is still the same process. None: not pinned, so nothing may act on it.

    `node`: None for a caller on the master; a node's number for a caller on that node
    whose request its daemon forwarded (bpfs/fs/forwarded.py): `pid` is then that node's
    number for it, which nothing on the master may take for one of its own."""
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    pid: Pid = Pid(0)
    pin: Any = field(default=None, compare=False, repr=False)
    node: NodeId | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


@dataclass
class Node:
    number: NodeId
    mode: int = NEW_NODE_MODE
    uid: int = 0
    gid: int = 0
    admin: str | None = None          # "unavailable" | "error" | None
    connected: bool = False
    booted: bool = False
    transient: str | None = None      # "reboot" | "halt" | "pwroff" | None
    address: str = ""
    facts: Facts = field(default_factory=Facts)
    last_heartbeat: float = 0.0       # the master's monotonic clock

    @property
    def state(self) -> str:
        if not self.connected:
            return "down"
        if self.transient:
            return self.transient
        if not self.booted:
            return "boot"
        return self.admin or "up"


@dataclass(frozen=True)
class SavedNode:
    """What the state file keeps of a node: its number, ACL and admin state."""
    number: NodeId
    mode: int = NEW_NODE_MODE
    uid: int = 0
    gid: int = 0
    admin: str | None = None


@dataclass
class Proc:
    """A migrated process. `gen` tells a reused PID from the process it replaced."""
    pid: Pid
    node: NodeId
    uid: int
    gid: int
    cmd: str
    started: float
    state: str = "running"            # "starting" | "running" | "stopped" | "exited"
    exit: str = "-"                   # "-", "0".."255", "signal N", or "failed ENAME"
    gen: int = 0
    output: ProcOutput | None = field(default=None, repr=False)
    mid: int = 0                      # the migration's id (0: unknown)
    usage: Usage | None = None        # the node's last report (bpfs/usage.py), None before
    usage_at: float = -1e18           # when it came: the master's monotonic clock
    links: "StdioLinks | None" = field(default=None, repr=False)   # where its stdio goes
    stdin_base: int = 0               # its stdin link's first byte in its stdin (a move's)


@dataclass(frozen=True)
class StdioLinks:
    """The stdio server a migrated process's "socket" fds are links to (bpsh, the master's
    exec endpoint, or a relay): what a move needs to make them again elsewhere."""
    port: int
    token: str
    io: tuple[str, str, str]
    host: str | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        """The fds that are links: "socket" ones, and fd 2 when it shares fd 1's."""
        return tuple(fd for fd, spec in enumerate(self.io)
                     if spec == "socket" or (spec == "stdout" and self.io[1] == "socket"))


class EventLog:
    """A bounded ring of events with sequence numbers.

    A reader keeps a cursor (the sequence number of the next event it wants);
    `cursor()` is where a new reader starts. A reader that falls more than
    `capacity` events behind silently skips the lost ones.
    """

    def __init__(self, capacity: int = EVENT_CAPACITY,
                 clock: Callable[[], float] = time.time) -> None:
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._next = 0
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []

    def cursor(self) -> int:
        return self._next

    def append(self, kind: str, id: int, what: str, detail: str = "") -> Event:
        ev = Event(self._clock(), kind, id, what, detail)
        self._ring.append(ev)
        self._next += 1
        for fn in list(self._listeners):
            fn()
        return ev

    def last(self) -> Event | None:
        """The latest event (None before the first)."""
        return self._ring[-1] if self._ring else None

    def since(self, cursor: int) -> tuple[list[Event], int]:
        """Events from `cursor` on, and the cursor to use next time."""
        first = self._next - len(self._ring)
        start = max(cursor, first) - first
        return list(self._ring)[start:], self._next

    def subscribe(self, fn: Callable[[], None]) -> None:
        """Call `fn()` after every append (the fs layer wakes blocked readers)."""
        self._listeners.append(fn)


class Cluster:
    """All nodes and processes. Methods raise BpfsError with the errno to return."""

    def __init__(self, configured: int = 0, *, clock: Callable[[], float] = time.time,
                 event_capacity: int = EVENT_CAPACITY) -> None:
        self.configured = configured      # nodes 0..configured-1; 0: open numbering
        self._nodes: dict[int, Node] = {n: Node(n) for n in range(configured)}
        self.procs: dict[int, Proc] = {}
        self.events = EventLog(event_capacity, clock)
        self.revision = 0        # bumped when persistent data (SavedNode fields) changes
        self._proc_serial = 0
        self.clock = clock
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, fn: Callable[[], None]) -> None:
        """Call `fn()` after every event and every change of a process's output."""
        self._listeners.append(fn)
        self.events.subscribe(fn)

    def output_changed(self) -> None:
        """A ProcOutput's `notify`: wake the subscribers."""
        for fn in list(self._listeners):
            fn()

    # ---- lookup --------------------------------------------------------------

    def node(self, n: NodeId) -> Node:
        try:
            return self._nodes[n]
        except KeyError:
            raise BpfsError(errno.ENOENT, f"no node {n}") from None

    def has_node(self, n: NodeId) -> bool:
        return n in self._nodes

    def nodes(self) -> list[Node]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    def _add_node(self, n: NodeId) -> Node:
        """A node of open numbering, seen for the first time (nothing to save yet)."""
        node = self._nodes[n] = Node(n)
        return node

    def _changed(self, node: Node, before: str) -> None:
        if node.state != before:
            self.events.append("node", node.number, "state", node.state)

    # ---- ACL -------------------------------------------------------------------

    def chmod(self, n: NodeId, mode: int, caller: Caller) -> None:
        node = self.node(n)
        if not (caller.is_root or caller.uid == node.uid):
            raise BpfsError(errno.EPERM, f"only the owner or root may chmod node {n}")
        self._require_connected(node, errno.EBUSY)
        mode &= ACL_BITS
        if mode != node.mode:
            node.mode = mode
            self.revision += 1
            self.events.append("node", n, "mode", f"{mode:04o}")

    def chown(self, n: NodeId, uid: int | None, gid: int | None, caller: Caller) -> None:
        """Change owner and/or group (None: unchanged), all or nothing."""
        node = self.node(n)
        if uid is not None and uid != node.uid and not caller.is_root:
            raise BpfsError(errno.EPERM, f"only root may change the owner of node {n}")
        if gid is not None and gid != node.gid and not caller.is_root:
            if caller.uid != node.uid:
                raise BpfsError(errno.EPERM, f"only the owner or root may change the group of node {n}")
            if not caller.in_group(gid):
                raise BpfsError(errno.EPERM, f"you are not a member of group {gid}")
        self._require_connected(node, errno.EBUSY)
        new_uid = node.uid if uid is None else uid
        new_gid = node.gid if gid is None else gid
        if (new_uid, new_gid) != (node.uid, node.gid):
            node.uid, node.gid = new_uid, new_gid
            self.revision += 1
            self.events.append("node", n, "owner", f"{new_uid} {new_gid}")

    def may_run(self, n: NodeId, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        node = self._nodes.get(n)
        if node is None or node.state != "up":
            return False
        if uid == 0:
            return True
        if uid == node.uid:
            return bool(node.mode & 0o100)
        if gid == node.gid or node.gid in set(groups):
            return bool(node.mode & 0o010)
        return bool(node.mode & 0o001)

    def check_run(self, n: NodeId, caller: Caller) -> None:
        """Raise EHOSTDOWN if node `n` is not up, EACCES if the caller may not use it."""
        node = self.node(n)
        if node.state != "up":
            raise BpfsError(errno.EHOSTDOWN, f"node {n} is {node.state}")
        if not self.may_run(n, caller.uid, caller.gid, caller.groups):
            raise BpfsError(errno.EACCES, f"no permission to run on node {n}")

    # ---- states set by root ------------------------------------------------------

    def set_admin_state(self, n: NodeId, state: str, caller: Caller) -> None:
        node = self.node(n)
        _require_root(caller, f"only root may set the state of node {n}")
        if state not in ADMIN_STATES:
            raise BpfsError(errno.EINVAL, f"bad state {state!r}: must be one of {', '.join(ADMIN_STATES)}")
        self._require_connected(node, errno.EHOSTDOWN)
        admin = None if state == "up" else state
        if admin != node.admin:
            before = node.state
            node.admin = admin
            self.revision += 1
            self._changed(node, before)

    def check_power(self, n: NodeId, cmd: str, caller: Caller) -> None:
        """May `caller` send reboot/halt/pwroff to node `n`? EPERM, EHOSTDOWN."""
        node = self.node(n)
        _require_root(caller, f"only root may {cmd} node {n}")
        self._require_connected(node, errno.EHOSTDOWN)

    def mark_power(self, n: NodeId, cmd: str) -> None:
        """Show `cmd` as the node's state until its connection drops."""
        if cmd not in POWER_COMMANDS:
            raise BpfsError(errno.EINVAL, f"not a power command: {cmd!r}")
        node = self.node(n)
        if node.connected:
            before = node.state
            node.transient = cmd
            self._changed(node, before)

    def _require_connected(self, node: Node, err: int) -> None:
        if not node.connected:
            raise BpfsError(err, f"node {node.number} is down")

    # ---- node daemon lifecycle (called by the master's node server) --------------

    def attach(self, requested: int | None, address: str, facts: Facts, now: float) -> int:
        """A node daemon registers: give it `requested`, or the lowest free number.

        EBUSY if another live connection holds `requested` (or, configured, holds every
        number); ENODEV for a number that is not configured, EINVAL for one outside
        0..MAX_NODE (open numbering). The node starts in "boot".
        """
        n = self._pick_number(requested)
        node = self._nodes.get(n) or self._add_node(n)
        before = node.state
        node.connected, node.booted, node.transient = True, False, None
        node.address, node.facts, node.last_heartbeat = address, facts, now
        self._changed(node, before)
        return n

    def _pick_number(self, requested: int | None) -> int:
        k = self.configured
        if requested is not None:
            if isinstance(requested, bool) or not 0 <= requested <= MAX_NODE:
                raise BpfsError(errno.EINVAL, f"node number {requested!r} out of range 0..{MAX_NODE}")
            if k and requested >= k:
                raise BpfsError(errno.ENODEV, f"node {requested} is not configured: this master "
                                f"has nodes 0..{k - 1} (--nodes {k})")
            node = self._nodes.get(requested)
            if node is not None and node.connected:
                raise BpfsError(errno.EBUSY, f"node {requested} is held by another connection")
            return requested
        free = next((n for n in sorted(self._nodes) if not self._nodes[n].connected), None)
        if free is not None:
            return free
        if k:
            raise BpfsError(errno.EBUSY, f"all {k} configured nodes are connected")
        nxt = max(self._nodes, default=-1) + 1
        if nxt > MAX_NODE:
            raise BpfsError(errno.ENOSPC, "no free node number")
        return nxt

    def reported_state(self, n: NodeId, state: str, now: float) -> None:
        """The node daemon says "up" (booted) or "boot"; anything else is EINVAL."""
        node = self.node(n)
        if state not in ("up", "boot"):
            raise BpfsError(errno.EINVAL, f"node {n} reported unknown state {state!r}")
        node.last_heartbeat = now
        before = node.state
        node.booted = state == "up"
        self._changed(node, before)

    def heartbeat(self, n: NodeId, facts: Facts | None, now: float) -> None:
        node = self.node(n)
        node.last_heartbeat = now
        if facts is not None:
            node.facts = facts

    def detach(self, n: NodeId) -> None:
        """The node's connection is gone: it is down (an event if it was not)."""
        node = self.node(n)
        before = node.state
        node.connected, node.booted, node.transient = False, False, None
        self._changed(node, before)

    def stale(self, now: float, timeout: float) -> list[int]:
        """Connected nodes whose last heartbeat is older than `timeout`."""
        return [n.number for n in self.nodes()
                if n.connected and now - n.last_heartbeat > timeout]

    # ---- processes -----------------------------------------------------------------

    def add_proc(self, proc: Proc) -> None:
        self.procs[proc.pid] = proc

    def proc(self, pid: Pid, gen: int | None = None) -> Proc:
        p = self.procs.get(pid)
        if p is None or (gen is not None and p.gen != gen):
            raise BpfsError(errno.ESRCH, f"no process {pid}")
        return p

    def remove_proc(self, pid: Pid, gen: int | None = None) -> None:
        """Drop `pid` (only if it is still generation `gen`, when given)."""
        p = self.procs.get(pid)
        if p is not None and (gen is None or p.gen == gen):
            del self.procs[pid]

    def start_proc(self, pid: Pid, node: NodeId, uid: int, gid: int, cmd: str, now: float,
                   state: str = "running", output: ProcOutput | None = None) -> Proc:
        """A migrated process is (or is about to be) on `node`: record it with a new
        generation; event `start`. It replaces an exited one of the same pid."""
        self._proc_serial = self._proc_serial % (PROC_GENERATIONS - 1) + 1
        p = Proc(pid, node, uid, gid, cmd, now, state, gen=self._proc_serial, output=output)
        self.procs[pid] = p
        self.events.append("proc", pid, "start", str(node))
        return p

    def proc_moved(self, pid: Pid, node: NodeId | None, mid: int = 0) -> None:
        """The running `pid` moved to `node` (restore `mid` made it there), or back to
        the master (None): it is a master process again, no longer listed; event `move`."""
        p = self.procs.get(pid)
        if p is None:
            return
        self.events.append("proc", pid, "move", "master" if node is None else str(node))
        if node is None:
            del self.procs[pid]
            return
        p.node, p.mid = node, mid
        self._moved_usage(p)

    def move_undone(self, p: Proc) -> None:
        """A move back to the master failed before the process ran here: `p` is listed
        again as it was (unless its pid went to another process meanwhile); event."""
        if self.procs.setdefault(p.pid, p) is p:
            self.events.append("proc", p.pid, "move", str(p.node))

    def _moved_usage(self, p: Proc) -> None:
        p.usage, p.usage_at = None, -1e18       # the old node's figures are not the new's

    def proc_running(self, pid: Pid) -> None:
        """The node restored a "starting" process: it runs."""
        p = self.procs.get(pid)
        if p is not None and p.state == "starting":
            p.state = "running"

    def start_failed(self, pid: Pid, err: int, gen: int | None = None) -> None:
        """A "starting" process never ran: event `exit failed ENAME`, and it is removed."""
        p = self.procs.get(pid)
        if p is None or p.state != "starting" or (gen is not None and p.gen != gen):
            return
        p.state = "exited"
        p.exit = f"failed {errno.errorcode.get(err, str(err))}"
        self.events.append("proc", pid, "exit", p.exit)
        if p.output is not None:
            p.output.close()
        del self.procs[pid]

    def check_signal(self, pid: Pid, caller: Caller, gen: int | None = None) -> Proc:
        """ESRCH if `pid` is not a live migrated process (of generation `gen`, if given),
        EPERM unless its uid or root."""
        p = self.proc(pid, gen)
        if p.state == "exited":
            raise BpfsError(errno.ESRCH, f"process {pid} has exited")
        if not (caller.is_root or caller.uid == p.uid):
            raise BpfsError(errno.EPERM, f"not allowed to signal process {pid}")
        return p

    def signalled(self, pid: Pid, sig: int) -> None:
        """A signal went to `pid`'s real process: event; stop/cont change its state."""
        p = self.procs.get(pid)
        if p is None or p.state == "exited":
            return
        if sig == signal.SIGSTOP:       # cannot fail; TSTP/TTIN/TTOU wait for `stopped`
            p.state = "stopped"
        elif sig == signal.SIGCONT:
            p.state = "running"
        self.events.append("proc", pid, "signal", str(sig))

    def stopped(self, pid: Pid) -> None:
        """The node says the real process is stopped."""
        p = self.procs.get(pid)
        if p is not None and p.state in ("running", "stopped"):
            p.state = "stopped"

    def continued(self, pid: Pid) -> None:
        """The node says the real process was continued."""
        p = self.procs.get(pid)
        if p is not None and p.state == "stopped":
            p.state = "running"

    def exited(self, pid: Pid, code: int | None, sig: int | None) -> None:
        """The process ended with exit `code` or by signal `sig` (the first report counts)."""
        p = self.procs.get(pid)
        if p is None or p.state == "exited":
            return
        p.state = "exited"
        p.exit = f"signal {sig}" if sig else str(code if code is not None else 0)
        self.events.append("proc", pid, "exit", p.exit)
        if p.output is not None:
            p.output.end()

    def record_usage(self, n: NodeId, hz: int, at: float, samples: Iterable[Sample],
                     mono: float) -> int:
        """Node `n`'s report (bpfs/usage.py): each sample updates its process if that is
        a live process on `n` (of restore `id`, when both know it); the others are ignored:
        a node speaks only for what it holds. Returns how many were taken."""
        now, taken = self.clock(), 0
        for s in samples:
            p = self.procs.get(s.pid)
            if p is None or p.node != n or p.state in ("exited", "starting") \
                    or (s.id and p.mid and s.id != p.mid):
                continue
            p.usage, p.usage_at = from_sample(s, hz, at, now, p.usage), mono
            taken += 1
        return taken

    def procs_on(self, n: NodeId) -> list[Pid]:
        return sorted(p.pid for p in self.procs.values() if p.node == n and p.state != "exited")

    # ---- persistence -------------------------------------------------------------------

    def saved(self) -> list[SavedNode]:
        """What the state file keeps: every configured node; of open numbering, the nodes
        whose ACL or admin state someone changed."""
        out = [SavedNode(n.number, n.mode, n.uid, n.gid, n.admin) for n in self.nodes()]
        return out if self.configured else [s for s in out if s != SavedNode(s.number)]

    def restore(self, saved: Iterable[SavedNode]) -> list[int]:
        """Load numbers, ACLs and admin states (at start, before any node connects).
        Returns the numbers ignored because they are not configured."""
        ignored = []
        for s in saved:
            if self.configured and s.number >= self.configured:
                ignored.append(s.number)
                continue
            node = self._nodes.get(s.number) or Node(s.number)
            node.mode, node.uid, node.gid = s.mode & ACL_BITS, s.uid, s.gid
            node.admin = s.admin if s.admin in ADMIN_STATES[1:] else None
            self._nodes[s.number] = node
        return ignored


def _require_root(caller: Caller, message: str) -> None:
    if not caller.is_root:
        raise BpfsError(errno.EPERM, message)

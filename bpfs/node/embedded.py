"""The embedded cluster: a master and K simulated nodes on one machine.

    up(layout, UpOptions) -> exit status        `bpfs up`
    down(layout) -> exit status                 `bpfs down`

`up` creates the cluster key if missing, starts the master (its own process,
listening on 127.0.0.1) and K node daemons, each PID 1 of its own PID, mount
and UTS namespaces (hostname nN, own /proc, private tmpfs on /scratch, the
master's FUSE mount lazily detached, optional --hide directories covered by an
empty tmpfs), then waits until the mount answers and every node is connected.

Nodes are forked from this process rather than exec'd: the node code (trio,
msgpack, psutil) is imported once here and shared copy-on-write, which makes
`bpfs up --nodes 64` take well under a second of CPU instead of one interpreter
start-up per node. Each is forked straight into its own new PID namespace (no
launcher process in between, unlike `bpslave`), sets its namespaces up as
`bpslave` does (bpfs.node.launcher.setup_namespaces), runs exactly bpslave's
daemon (bpfs.node.daemon.start), and rewrites its command line to the
equivalent `bpslave ...` so ps shows what it is. One process per node.

Everything started is recorded in STATE_DIR/pids/NAME.pid as "PID STARTTIME"
(STARTTIME: field 22 of /proc/PID/stat), and `down` signals a PID only through
a pidfd opened while the start time still matched, so a reused PID is never
hit. Layout of the state directory:

    cluster.key   the cluster key (0600)     state      the master's state file
    cluster       key: value (mount, port, nodes) of the running cluster
    pids/*.pid    PID STARTTIME              logs/*.log master.log, node-N.log
    lock          held (flock) while `up` or `down` runs

Errors are raised as BpfsError with a message naming what failed; bpfs/cli/bpfs_main.py
prints them (and checks the options first: --nodes at least 1, --hide directories).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from bpfs import formats
from bpfs.errors import BpfsError
from bpfs.node.config import NodeConfig
from bpfs.node.launcher import NamespaceSpec

DEFAULT_MOUNT = "/bproc"
DEFAULT_STATE_DIR = "/var/lib/bpfs"
SCRATCH = "/scratch"
CONNECTED_STATES = frozenset({"up", "unavailable", "error"})  # persisted admin states count
GRACE = 5.0


def default_state_dir(mount: str) -> str:
    """/var/lib/bpfs for /bproc; /var/lib/bpfs/mounts/<escaped mount> for any other."""
    mount = os.path.abspath(mount)
    if mount == DEFAULT_MOUNT:
        return DEFAULT_STATE_DIR
    return os.path.join(DEFAULT_STATE_DIR, "mounts", urllib.parse.quote(mount, safe=""))


@dataclass
class Layout:
    mount: str
    state_dir: str

    @classmethod
    def make(cls, mount: str, state_dir: str | None = None) -> "Layout":
        mount = os.path.abspath(mount)
        return cls(mount, os.path.abspath(state_dir or default_state_dir(mount)))

    def path(self, *parts: str) -> str:
        return os.path.join(self.state_dir, *parts)

    @property
    def key_file(self) -> str:
        return self.path("cluster.key")


@dataclass
class UpOptions:
    nodes: int
    port: int = 2223
    ping_timeout: float = 5.0
    hide: list[str] = field(default_factory=list)
    detach: bool = False
    timeout: float | None = None            # default: 30 s + 0.25 s a node
    usage_interval: float = 2.0             # seconds between the nodes' usage reports
    serve_fs: Callable[..., Any] | None = None   # each node's /bproc (NodeConfig.serve_fs)


# ---- processes, recorded by PID and start time ---------------------------------

def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat; None if the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if rest[0] == b"Z" else int(rest[19])


@dataclass(frozen=True)
class Record:
    name: str
    pid: int
    start: int

    def alive(self) -> bool:
        _reap(self.pid)
        return start_time(self.pid) == self.start

    def signal(self, sig: int) -> bool:
        """Send `sig` if this is still the same process (race-free via a pidfd)."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return False
        try:
            if start_time(self.pid) != self.start:
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def _reap(pid: int) -> None:
    """If `pid` is our own child (foreground `up`), collect it so it is not a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def record(layout: Layout, name: str, pid: int) -> Record | None:
    st = start_time(pid)
    if st is None:
        return None
    rec = Record(name, pid, st)
    tmp = layout.path("pids", f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{pid} {st}\n")
    os.replace(tmp, layout.path("pids", f"{name}.pid"))
    return rec


def read_records(layout: Layout) -> list[Record]:
    out = []
    for p in sorted(Path(layout.path("pids")).glob("*.pid")):
        try:
            pid, st = p.read_text().split()[:2]
            out.append(Record(p.stem, int(pid), int(st)))
        except (OSError, ValueError):
            continue
    return out


# ---- mounts ---------------------------------------------------------------------

def mount_type(path: str) -> str | None:
    """The filesystem type mounted at `path` per /proc/self/mounts (never touches the mount)."""
    fstype = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[1]) == path:
                fstype = fields[2]          # the last one listed is the visible one
    return fstype


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def unmount(path: str) -> None:
    """Unmount a FUSE mount at `path`: politely, then lazily; nothing else is touched."""
    for cmd in (["fusermount3", "-u", path], ["fusermount3", "-u", "-z", path],
                ["umount", "-l", path]):
        if not (mount_type(path) or "").startswith("fuse"):
            return
        try:
            subprocess.run(cmd, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue


@contextmanager
def locked(layout: Layout) -> Iterator[None]:
    fd = os.open(layout.path("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BpfsError(errno.EBUSY, f"{layout.mount}: another bpfs up/down is running "
                            f"on {layout.state_dir}") from None
        yield
    finally:
        os.close(fd)


# ---- up -------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def up(layout: Layout, opts: UpOptions) -> int:
    """Start the cluster; with detach, return once it is ready, else serve until a signal."""
    _prepare(layout, opts)
    started: list[Record] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        with locked(layout):
            _refuse_if_busy(layout)
            _write_cluster_file(layout, opts)
            master = _start_master(layout, opts)
            started.append(master)
            started += _start_nodes(layout, opts)
            _wait_ready(layout, opts, master, started[1:])
        print(f"bpfs: cluster up on {layout.mount}: master (port {opts.port}) and "
              f"{opts.nodes} node{'s' if opts.nodes != 1 else ''}"
              + ("" if opts.detach else "; Ctrl-C stops it"), flush=True)
        if opts.detach:
            return 0
        return _foreground(layout, master)
    except Interrupted as exc:
        if started:     # never stop a cluster this `up` did not start (it may be refusing)
            print(f"bpfs: {exc}: stopping the cluster", file=sys.stderr, flush=True)
            _stop(layout, quiet=True)
        return 130
    except BaseException:
        if started:
            _stop(layout, quiet=True)
        raise


def _prepare(layout: Layout, opts: UpOptions) -> None:
    for d in (layout.state_dir, layout.path("pids"), layout.path("logs")):
        os.makedirs(d, mode=0o700, exist_ok=True)
    os.makedirs(layout.mount, exist_ok=True)
    os.makedirs(SCRATCH, exist_ok=True)
    if not os.path.exists(layout.key_file):
        from bpfs.wire import framing as wire
        wire.create_key(layout.key_file)


def _refuse_if_busy(layout: Layout) -> None:
    live = [r for r in read_records(layout) if r.alive()]
    if live or mount_type(layout.mount):
        what = "a bpfs cluster is already up there" if live else "something is mounted there"
        raise BpfsError(errno.EBUSY, f"{layout.mount}: {os.strerror(errno.EBUSY)}: {what} "
                        f"(stop it with: bpfs down --mount {layout.mount})")
    for p in Path(layout.path("pids")).glob("*.pid"):
        p.unlink()          # stale records of a cluster that died


def _write_cluster_file(layout: Layout, opts: UpOptions) -> None:
    with open(layout.path("cluster"), "w") as f:
        f.write(formats.render_kv({"mount": layout.mount, "port": opts.port,
                                   "nodes": opts.nodes}))


def hosts_file(layout: Layout) -> str:
    """Where the master writes the names (bpfs.master.names): /run/bpfs/hosts for /bproc,
    STATE_DIR/hosts for a cluster on another mount (set BPFS_HOSTS to it to use them)."""
    return "/run/bpfs/hosts" if layout.mount == DEFAULT_MOUNT else layout.path("hosts")


def node_address(n: int) -> str:
    """Node n's own loopback address, 127.1.X.Y with X.Y = n + 1: the node connects from
    it, so the master registers one address per node and `n5` names a host of its own
    (an address that is one of this machine's interfaces, 127.0.0.1, would make
    launchers such as Open MPI's mpirun take every node for this machine)."""
    return f"127.1.{(n + 1) >> 8 & 255}.{(n + 1) & 255}"


def _child_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{path}" if path else root)


def _start_master(layout: Layout, opts: UpOptions) -> Record:
    argv = [sys.executable, "-m", "bpfs.cli.bpfs_main", "master", "--mount", layout.mount,
            "--listen", "127.0.0.1", "--port", str(opts.port), "--key", layout.key_file,
            "--state-file", layout.path("state"), "--nodes", str(opts.nodes),
            "--ping-timeout", str(opts.ping_timeout),
            "--usage-interval", str(opts.usage_interval), "--hosts-file", hosts_file(layout)]
    with open(layout.path("logs", "master.log"), "wb") as log:    # one run a log
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd="/", env=_child_env(), start_new_session=True)
    rec = record(layout, "master", proc.pid)
    if rec is None:
        raise BpfsError(errno.EIO, "the master exited at once; see "
                        f"{layout.path('logs', 'master.log')}")
    return rec


def node_argv(layout: Layout, opts: UpOptions, n: int) -> list[str]:
    """The bpslave command line equivalent to node n of this cluster."""
    argv = ["bpslave", "--master", f"127.0.0.1:{opts.port}", "--node", str(n),
            "--key", layout.key_file, "-r", "--hostname", f"n{n}", "--scratch", SCRATCH,
            "--unmount", layout.mount, "--mount", layout.mount]
    for d in opts.hide:
        argv += ["--hide", os.path.abspath(d)]
    return argv


def _start_nodes(layout: Layout, opts: UpOptions) -> list[Record]:
    from bpfs.node import daemon, service  # noqa: F401  (import once, share with every fork)
    out = []
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for n in range(opts.nodes):
            pid = _fork_node(layout, opts, n, own_pidns)
            rec = record(layout, f"node-{n}", pid)
            if rec is not None:
                out.append(rec)
    finally:
        os.close(own_pidns)
    return out


def _fork_node(layout: Layout, opts: UpOptions, n: int, own_pidns: int) -> int:
    """Fork node n straight into a new PID namespace, as its PID 1; return its PID.

    unshare(CLONE_NEWPID) only decides where our next child goes, and the
    kernel refuses a second one while it points elsewhere, so after each fork
    setns() points it back to our own namespace. Unlike `bpslave`, no launcher
    stays between us and the daemon: it is our child (or, detached, init's).
    """
    from bpfs.node import nsutil
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)     # no Interrupted inside the child
    nsutil.unshare(nsutil.CLONE_NEWPID)
    try:
        pid = os.fork()
    finally:
        if os.getpid() != 1:
            nsutil.setns(own_pidns, nsutil.CLONE_NEWPID)
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        return pid
    _node_main(layout, opts, n)


def _node_main(layout: Layout, opts: UpOptions, n: int) -> NoReturn:
    from bpfs.node import daemon, launcher, nsutil
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _redirect_stdio(layout.path("logs", f"node-{n}.log"))
        nsutil.set_cmdline(node_argv(layout, opts, n))
        nsutil.set_comm("bpslave")
        cfg = NodeConfig(host="127.0.0.1", port=opts.port, key_file=layout.key_file, node=n,
                         reconnect=True, backoff_min=0.05, backoff_max=1.0,
                         serve_fs=opts.serve_fs, source=node_address(n))
        spec = NamespaceSpec(f"n{n}", [SCRATCH], [os.path.abspath(d) for d in opts.hide],
                             [layout.mount])
        daemon.setup_logging(logging.INFO, f"n{n}")
        launcher.setup_namespaces(spec)
        code = daemon.start(cfg, spec, label=f"n{n}", namespaces=False)
    except BaseException as exc:
        print(f"bpfs: node {n}: {exc}", file=sys.stderr)
    finally:
        os._exit(code)


def _redirect_stdio(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.closerange(3, 1 << 16)     # the lock, the parent's pipes: nothing leaks into a node


def _wait_ready(layout: Layout, opts: UpOptions, master: Record, nodes: list[Record]) -> None:
    timeout = opts.timeout if opts.timeout is not None else 30 + 0.25 * opts.nodes
    deadline = time.monotonic() + timeout
    states: dict[int, str] = {}
    mounted = False
    while time.monotonic() < deadline:
        if not master.alive():
            raise BpfsError(errno.EIO, f"the master exited before the cluster was up:\n"
                            f"{_tail(layout.path('logs', 'master.log'))}")
        mounted = mounted or (mount_type(layout.mount) or "").startswith("fuse")
        if mounted:
            states = _node_states(layout.mount, deadline - time.monotonic())
            if len(states) >= opts.nodes and all(
                    states.get(n) in CONNECTED_STATES for n in range(opts.nodes)):
                return
        time.sleep(0.05)
    raise BpfsError(errno.ETIMEDOUT,
                    _not_ready_message(layout, opts, mounted, states, nodes, timeout))


def _node_states(mount: str, budget: float) -> dict[int, str]:
    """Read MOUNT/status in a helper thread, so a hung master cannot hang us past `budget`."""
    result: list[str] = []

    def read() -> None:
        try:
            with open(os.path.join(mount, "status")) as f:
                result.append(f.read())
        except OSError:
            pass

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(max(0.1, min(budget, 5.0)))
    try:
        return {r.number: r.state for r in formats.parse_status(result[0])} if result else {}
    except ValueError:
        return {}


def _not_ready_message(layout: Layout, opts: UpOptions, mounted: bool, states: dict[int, str],
                       nodes: list[Record], timeout: float) -> str:
    if not mounted:
        what = f"the master did not mount {layout.mount} (see {layout.path('logs', 'master.log')})"
    else:
        dead = {int(r.name.split("-")[1]) for r in nodes if not r.alive()}
        late = [n for n in range(opts.nodes) if states.get(n) not in CONNECTED_STATES]
        shown = ", ".join(f"{n} ({'exited' if n in dead else states.get(n, 'missing')})"
                          for n in late[:10]) + (" ..." if len(late) > 10 else "")
        what = (f"{len(late)} of {opts.nodes} nodes not up: {shown} "
                f"(see {layout.path('logs', f'node-{late[0]}.log')})")
    return f"cluster on {layout.mount} not ready after {timeout:.0f} s: {what}; stopping it"


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return f"(no log at {path})"


def _foreground(layout: Layout, master: Record) -> int:
    """Serve until a signal (Interrupted, handled by `up`) or until the master exits."""
    while master.alive():
        time.sleep(0.5)
    print("bpfs: the master exited; stopping the nodes", file=sys.stderr, flush=True)
    _stop(layout, quiet=True)
    return 1


# ---- down ----------------------------------------------------------------------------

def down(layout: Layout, grace: float = GRACE) -> int:
    """Stop what `up` started on this layout and unmount; idempotent."""
    if not os.path.isdir(layout.state_dir):
        print(f"bpfs: nothing is up on {layout.mount} (no state directory {layout.state_dir})")
        return 0
    with locked(layout):
        stopped = _stop(layout, grace)
    if stopped is None:
        print(f"bpfs: nothing is up on {layout.mount}")
    else:
        print(f"bpfs: stopped the cluster on {layout.mount} ({stopped} processes)")
    return 0


def _stop(layout: Layout, grace: float = GRACE, quiet: bool = False) -> int | None:
    """SIGTERM, then SIGKILL after `grace`; unmount; forget the records. None if nothing ran."""
    records = [r for r in read_records(layout) if r.alive()]
    was_mounted = (mount_type(layout.mount) or "").startswith("fuse")
    for r in records:
        r.signal(signal.SIGTERM)
    if not _wait_gone(records, grace):
        for r in records:
            r.signal(signal.SIGKILL)
        _wait_gone(records, 2.0)
    unmount(layout.mount)
    for p in Path(layout.path("pids")).glob("*.pid"):
        p.unlink()
    if not records and not was_mounted:
        return None
    return len(records)


def _wait_gone(records: list[Record], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(r.alive() for r in records):
            return True
        time.sleep(0.02)
    return not any(r.alive() for r in records)

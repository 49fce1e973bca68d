"""`exec` on nodes/N/ctl: the master runs a command as the writer and migrates it (DESIGN §2).

    $ echo "exec hostname" > /bproc/nodes/2/ctl      (or: exec -- argv...)
    reading the ctl handle back: "ok PID"
    /bproc/procs/PID/stdout, stderr: the output, readable like a pipe (see below)

    execs = ExecService(cluster, procs, mount)
    port = await nursery.start(execs.serve, host)     the stdio endpoint and the sweeper
    pid = await execs.start(node, caller, argv)       from the ctl write (nodes/N/ctl exec)

How one `exec` goes. It is bpsh's execmove path, with the master as bpsh, except that
the child does not write its execmove to nodes/N/ctl itself: FUSE holds a file's inode
lock during a direct-I/O write, so a child writing to the very ctl file whose write it
serves would wait forever. The master arms the migration for it, in process.

1. The handler reads the writer's environment (/proc/W/environ), cwd (an O_PATH fd of
   /proc/W/cwd, so a renamed cwd still works) and umask (/proc/W/status); W is the ctl
   handle's opener (its thread id), pinned at open (bpfs/pin.py): the reads go by number,
   so the pin is checked before and after them, and they count only if W is still alive
   and still the user it was (else ESRCH or EPERM: never another process's environment).
   It makes a token and the output rings, then forks.
2. The child (`_child`, plain os calls only: the master is multithreaded, so no locks,
   no logging, no imports there): its own session, default signal dispositions and an
   empty mask (all signals stay blocked from before the fork until the dispositions are
   reset, so none can run a master handler or reach trio's wakeup fd), fds 0-2 on
   /dev/null and every other fd closed, the writer's groups, gid and uid (setgroups,
   setresgid, setresuid), umask and cwd. It says READY on its status pipe and waits
   for one byte on its go pipe.
3. The handler (awaiting the pipe, never blocking the trio loop) checks the node's ACL
   again and calls ProcService.execmove for the child, exactly as a ctl write of
   `execmove --port P --token T --stdin null --stdout socket --stderr socket` by the
   child would: the child is seized. Then it sends "go".
4. The child execve's argv[0] looked up in the writer's PATH (as bpsh: an empty entry
   is "."), with the writer's environment plus BPROC_RANK=0000000 and
   BPROC_PROGNAME=the path found. Any failure in the child is one record (stage, errno)
   on the close-on-exec status pipe, then _exit(127): the write's error (ENOENT,
   "X: command not found", for a command not in PATH). EOF on the pipe after "go"
   means the exec happened. Then the handler awaits the Launch (bpfs.master.procs):
   captured (procs/PID appears, "starting"), restored ("running": the write returns
   `ok PID`) or failed (the write returns that errno; procs/PID is gone).
5. The node connects stdout and stderr back to our endpoint (a TCP listener on the host
   nodes reach us at, port chosen by the kernel) with the stdio-link header of
   bpfs.wire.execreq; a link whose token, pid or fd is not one we wait for is closed.

Reaping: the ghost's parent is the master, so the tracer reaps it (bpfs.migrate.ghost) and
its end comes through ProcService as for any ghost. A child that failed before it was
seized (never traced) is reaped here, by pid, in a worker thread.

Output and lifetime (the bounds):
- each of stdout and stderr keeps its newest 1 MiB (output.OUTPUT_CAPACITY); beyond, the
  oldest bytes are dropped and a reader that was behind skips them. The process never
  waits for readers.
- a read blocks until there is output or EOF (EAGAIN with O_NONBLOCK; EINTR as soon as
  the reader has a fatal or handled signal pending, as for events). EOF comes once the
  process has ended and its link has delivered everything; a link not connected by
  then gets LINK_GRACE seconds more.
- procs/PID stays while the process runs, then until READ_GRACE seconds after both
  stdout and stderr have been read to EOF (by anyone; the grace lets a script read
  status after the output), and at most LINGER seconds after the end; links still open
  then (a background child holding them) are closed. Handles already open keep reading
  what was kept after the directory is gone. The sweeper checks every SWEEP seconds.

Errors of `start` (BpfsError, the write's errno): EINVAL no command; ENOSYS no tracer;
ESRCH the writer is gone; EPERM the writer is not the user it was when it opened the file; the child's errno (ENOENT not found, EACCES not executable or
cwd not searchable, ...); EHOSTDOWN, EPERM (set-user-ID program), ENOEXEC... from the
migration; ETIMEDOUT if the child neither exec'd nor failed within LAUNCH_TIMEOUT.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from bpfs.child import reset_signals
from bpfs.errors import BpfsError
from bpfs.master.migrations import CAPTURE_TIMEOUT, RESTORE_TIMEOUT, Launch
from bpfs.master.procs import ProcService
from bpfs.model import Caller, Cluster
from bpfs.output import OUTPUT_STREAMS, ProcOutput
from bpfs.pin import Pin
from bpfs.wire import execreq

log = logging.getLogger("bpfs.master.exec")

LAUNCH_TIMEOUT = 10.0        # fork -> the child exec'd or failed
HEADER_TIMEOUT = 10.0        # a link's header line
LINK_GRACE = 1.0             # after the end, for a link not yet connected
READ_GRACE = 1.0             # after both streams were read to EOF
LINGER = 60.0                # after the end, at most
SWEEP = 0.25
CHUNK = 1 << 16

# the child's records on the status pipe: (stage, errno); READY is no failure
READY, STAGE_SETUP, STAGE_CWD, STAGE_EXEC = 0, 1, 2, 4
_RECORD = struct.Struct("=ii")
GO = b"g"


@dataclass
class Writer:
    """What the child takes from the writer: environment, cwd (an fd), umask."""
    env: dict[bytes, bytes]
    cwd_fd: int
    umask: int


def read_writer(pin: Pin | None) -> Writer:
    """The writer's environment, cwd and umask from /proc, read by its number and proven to
    be the pinned writer's (its pin checked before and after): ESRCH if it is gone (or was
    never pinned), EPERM if it is no longer the user it was (a set-user-ID program)."""
    if pin is None:
        raise BpfsError(errno.ESRCH, "exec: the writer is not pinned: nothing may act on it")
    tid = pin.tid
    pin.check()
    try:
        with open(f"/proc/{tid}/environ", "rb") as f:
            raw = f.read()
        with open(f"/proc/{tid}/status", "rb") as f:
            status = f.read()
        cwd_fd = os.open(f"/proc/{tid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise BpfsError(errno.ESRCH, f"cannot read the writer (thread {tid}): "
                        f"{exc.strerror}") from None
    try:
        pin.check()
    except BaseException:
        os.close(cwd_fd)
        raise
    env: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq and key:
            env[key] = value
    umask = 0o022
    for line in status.splitlines():
        if line.startswith(b"Umask:"):
            umask = int(line.split()[1], 8)
    return Writer(env, cwd_fd, umask)


@dataclass(eq=False)
class Record:
    """One exec'd process: its token, output and the times the sweeper goes by."""
    pid: int
    token: str
    output: ProcOutput
    links: set[str] = field(default_factory=set)       # streams whose link connected
    scopes: list[trio.CancelScope] = field(default_factory=list)
    live: bool = False            # the write returned `ok PID`
    ended_at: float | None = None
    read_at: float | None = None


class ExecService:
    """Processes the master starts for `exec`, their output, and when they go."""

    def __init__(self, cluster: Cluster, procs: ProcService, mount: str) -> None:
        self.cluster = cluster
        self.procs = procs
        self.mount = os.path.abspath(mount)
        self.port = 0
        self._records: dict[str, Record] = {}       # by token
        self._some = trio.Event()

    # ---- the endpoint and the sweeper ----------------------------------------------

    async def serve(self, host: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for stdio links on `host` (port chosen by the kernel); sweep; until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweeper)
            await nursery.start(trio.serve_listeners, self._serve_link, listeners)
            task_status.started(self.port)

    async def _serve_link(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(HEADER_TIMEOUT):
                    line, rest = await _read_line(stream)
            except (trio.TooSlowError, trio.BrokenResourceError, OSError, ValueError):
                return
            rec = self._records.get(line.split(b" ", 1)[0].decode("ascii", "replace"))
            header = execreq.parse_header(line, rec.token) if rec is not None else None
            if rec is None or header is None or header.pid != rec.pid \
                    or header.fd not in (1, 2) or OUTPUT_STREAMS[header.fd - 1] in rec.links:
                return
            name = OUTPUT_STREAMS[header.fd - 1]
            rec.links.add(name)
            await self._copy(rec, name, stream, rest)

    async def _copy(self, rec: Record, name: str, stream: trio.SocketStream, first: bytes) -> None:
        scope = trio.CancelScope()
        rec.scopes.append(scope)
        rec.output.append(name, first)
        with scope:
            try:
                while data := await stream.receive_some(CHUNK):
                    rec.output.append(name, data)
            except (trio.BrokenResourceError, OSError) as exc:
                log.info("pid %d: %s link: %s", rec.pid, name, exc)
        rec.output.link_over(name)

    async def _sweeper(self) -> None:
        while True:
            if not self._records:
                self._some = trio.Event()
                await self._some.wait()
            await trio.sleep(SWEEP)
            now = trio.current_time()
            for rec in list(self._records.values()):
                if rec.live:
                    self._sweep(rec, now)

    def _sweep(self, rec: Record, now: float) -> None:
        p = self.cluster.procs.get(rec.pid)
        if p is None or p.output is not rec.output:     # gone, or its pid reused
            self._drop(rec)
            return
        out = rec.output
        if not out.ended:
            return
        if rec.ended_at is None:
            rec.ended_at = now
        if now - rec.ended_at >= LINK_GRACE:
            for name in OUTPUT_STREAMS:
                if name not in rec.links:
                    out.link_over(name)
        if out.all_read and rec.read_at is None:
            rec.read_at = now
        if (rec.read_at is not None and now - rec.read_at >= READ_GRACE) \
                or now - rec.ended_at >= LINGER:
            self._drop(rec)
            self.cluster.remove_proc(rec.pid, p.gen)

    def _drop(self, rec: Record) -> None:
        """Forget `rec`: its links are closed, its streams at EOF."""
        self._records.pop(rec.token, None)
        for scope in rec.scopes:
            scope.cancel()
        rec.output.close()

    # ---- starting one ------------------------------------------------------------------

    async def start(self, node: int, caller: Caller, argv: list[str]) -> int:
        """Run `argv` as the writer `caller` and migrate it to `node`; its pid (see above)."""
        if not argv:
            raise BpfsError(errno.EINVAL, "exec: no command")
        self.procs.check_ready()
        if not self.port:
            raise BpfsError(errno.ENOSYS, "this master has no stdio endpoint")
        writer = read_writer(caller.pin)
        token = os.urandom(16).hex()
        rec = Record(0, token, ProcOutput(notify=self.cluster.output_changed))
        launch = Launch(rec.output)
        try:
            child = self._fork(caller, argv, writer)
        except OSError as exc:
            raise BpfsError(exc.errno or errno.EIO, f"exec: cannot fork: {exc.strerror}") from None
        finally:
            os.close(writer.cwd_fd)
        rec.pid = child.pid
        self._records[token] = rec
        self._some.set()
        try:
            await self._launch(child, node, caller, argv[0], launch, token)
            with trio.fail_after(CAPTURE_TIMEOUT + RESTORE_TIMEOUT + 5):
                await launch.done.wait()
        except BaseException:
            self._drop(rec)
            raise
        finally:
            child.close()
        if launch.error is not None:
            self._drop(rec)
            raise launch.error
        rec.live = True
        log.info("exec: pid %d (%s) runs on node %d for uid %d", child.pid, argv[0], node,
                 caller.uid)
        return child.pid

    def _fork(self, caller: Caller, argv: list[str], writer: Writer) -> "_Child":
        """Fork the child (see `_child`): it waits for "go" on its pipe."""
        env = dict(writer.env)
        env[b"BPROC_RANK"] = b"0000000"
        args = [os.fsencode(a) for a in argv]
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        groups = sorted(caller.groups)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                _child(args, env, (caller.uid, caller.gid, groups), writer, devnull,
                       status_w, go_r)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                for fd in (status_w, go_r, devnull):
                    os.close(fd)
                if pid < 0:
                    os.close(status_r)
                    os.close(go_w)
        return _Child(pid, trio.lowlevel.FdStream(status_r), go_w)

    async def _launch(self, child: "_Child", node: int, caller: Caller, command: str,
                      launch: Launch, token: str) -> None:
        """READY -> execmove for the child -> go -> it exec'd (EOF) or failed (raised)."""
        try:
            with trio.fail_after(LAUNCH_TIMEOUT):
                record = await child.record()
                if record is None:
                    raise BpfsError(errno.EIO, f"exec: the child for {command} died")
                if record[0] != READY:
                    raise _failure(*record, command)
                self.cluster.check_run(node, caller)
                req = execreq.ExecMove(self.port, token, 0, "null", "socket", "socket")
                pin = Pin.take(child.pid)   # our unreaped child: its number is its own
                try:
                    await self.procs.execmove(node, Caller(caller.uid, caller.gid,
                                                           caller.groups, child.pid, pin),
                                              req, launch)
                finally:
                    pin.close()
                child.go()
                record = await child.record()
                if record is not None:
                    raise _failure(*record, command)
        except trio.TooSlowError:
            await self._end_child(child.pid, launch, kill=True)
            raise BpfsError(errno.ETIMEDOUT, f"exec: {command} did not start in time") from None
        except BaseException:
            await self._end_child(child.pid, launch)
            raise

    async def _end_child(self, pid: int, launch: Launch, kill: bool = False) -> None:
        """A child that will not become a ghost: reap it unless the tracer holds it."""
        if launch.armed:
            if kill and self.procs.tracer is not None:
                self.procs.tracer.kill(pid)
            return                      # traced: its end goes to the tracer
        with trio.CancelScope(shield=True):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await trio.to_thread.run_sync(os.waitpid, pid, 0)


@dataclass(eq=False)
class _Child:
    """The master's end of a forked child's two pipes."""
    pid: int
    status: trio.lowlevel.FdStream
    go_w: int

    async def record(self) -> tuple[int, int] | None:
        """The child's next (stage, errno) record; None at EOF (it exec'd, or died)."""
        data = b""
        while len(data) < _RECORD.size:
            chunk = await self.status.receive_some(_RECORD.size - len(data))
            if not chunk:
                return None
            data += chunk
        stage, err = _RECORD.unpack(data)
        return stage, err

    def go(self) -> None:
        os.write(self.go_w, GO)
        os.close(self.go_w)
        self.go_w = -1

    def close(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)
            self.go_w = -1
        self.status.close()


def _failure(stage: int, err: int, command: str) -> BpfsError:
    text = os.strerror(err)
    if stage == STAGE_EXEC:
        return BpfsError(err, f"{command}: command not found" if err == errno.ENOENT
                         else f"{command}: {text}")
    where = {STAGE_CWD: "changing to the writer's cwd"}
    return BpfsError(err, f"exec: {where.get(stage, 'setting up the child')}: {text}")


async def _read_line(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """The header line (without NL) and what came after it; ValueError if none fits."""
    buf = b""
    while b"\n" not in buf:
        if len(buf) > execreq.HEADER_MAX:
            raise ValueError("header too long")
        chunk = await stream.receive_some(execreq.HEADER_MAX)
        if not chunk:
            raise ValueError("no header")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line + b"\n", rest


# ---- the child (after fork: os calls only) -----------------------------------------------

def _child(argv: list[bytes], env: dict[bytes, bytes], cred: tuple[int, int, list[int]],
           writer: Writer, devnull: int, status_w: int, go_r: int) -> None:
    """Become the writer, wait for "go", exec; never returns (see the module doc)."""
    stage = STAGE_SETUP
    try:
        reset_signals()
        os.setsid()
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        keep = sorted((status_w, go_r, writer.cwd_fd))
        for lo, hi in zip([2, *keep], [*keep, 1 << 20]):
            os.closerange(lo + 1, hi)
        uid, gid, groups = cred
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        os.umask(writer.umask)
        stage = STAGE_CWD
        os.fchdir(writer.cwd_fd)
        os.close(writer.cwd_fd)
        stage = STAGE_SETUP
        os.write(status_w, _RECORD.pack(READY, 0))
        if os.read(go_r, 1) != GO:
            os._exit(1)                 # the master gave up on us
        os.close(go_r)
        stage = STAGE_EXEC
        err = _exec(argv, env)
    except OSError as exc:
        err = exc.errno or errno.EIO
    except BaseException:
        err = errno.EIO
    try:
        os.write(status_w, _RECORD.pack(stage, err))
    finally:
        os._exit(127)


def _exec(argv: list[bytes], env: dict[bytes, bytes]) -> int:
    """execve argv[0] as execvp would find it in env's PATH; the errno if none ran."""
    name = argv[0]
    if b"/" in name:
        candidates = [name]
    else:
        path = env.get(b"PATH", b"/bin:/usr/bin")
        candidates = [(d or b".") + b"/" + name for d in path.split(b":")]
    err = errno.ENOENT
    for candidate in candidates:
        try:
            os.execve(candidate, argv, {**env, b"BPROC_PROGNAME": candidate})
        except OSError as exc:
            if exc.errno == errno.EACCES:
                err = exc.errno
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                return exc.errno or errno.EIO
    return err

"""`exec` on nodes/N/ctl: the master runs a command as the writer and migrates it (DESIGN §2).

    $ echo "exec hostname" > /bproc/nodes/2/ctl      (or: exec -- argv...)
    reading the ctl handle back: "ok PID"
    /bproc/procs/PID/stdout, stderr: the output, readable like a pipe

    execs = ExecService(cluster, procs, mount)
    port = await nursery.start(execs.serve, host)     the stdio endpoint and the sweeper
    pid = await execs.start(node, caller, argv)       from the ctl write (nodes/N/ctl exec)
    execs.expect_again(pid)                           a move of pid begins (links again)

The master forks a child as the writer (its environment, cwd, umask and credentials, read
from /proc through its pin), arms the migration for it in process (the child cannot write
to the ctl file whose write it serves), lets it exec and keeps its output. How one exec
goes, the output's bounds and lifetimes: docs/exec.md. The child's fork, reset, PATH rule
and status reports are bpfs.child's, shared with bpsh.

Errors of `start` (BpfsError, the write's errno): EINVAL no command; ENOSYS no tracer;
ESRCH the writer is gone; EPERM the writer is not the user it was when it opened the file;
the child's errno (ENOENT not found, EACCES not executable or cwd not searchable, ...);
EHOSTDOWN, EPERM (set-user-ID program), ENOEXEC... from the migration; ETIMEDOUT if the
child neither exec'd nor failed within LAUNCH_TIMEOUT.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import trio

from bpfs import procstatus
from bpfs.child import CWD, EXEC, READY, SETUP, Report, fork_reset, path_candidates
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

GO = b"g"                    # the master to its child: exec now


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
        status = procstatus.read(tid)
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
    umask = int(status["Umask"], 8) if "Umask" in status else 0o022
    return Writer(env, cwd_fd, umask)


@dataclass(eq=False)
class Record:
    """One exec'd process: its token, output and the times the sweeper goes by."""
    pid: int
    token: str
    output: ProcOutput
    links: set[str] = field(default_factory=set)       # streams whose link connected
    moving: set[str] = field(default_factory=set)      # streams whose link will be made again
    tails: dict[str, trio.Event] = field(default_factory=dict)  # set when a stream's newest
                                                                # link is over
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
                    or header.fd not in (1, 2) \
                    or (OUTPUT_STREAMS[header.fd - 1] in rec.links and not header.again):
                return
            name = OUTPUT_STREAMS[header.fd - 1]
            rec.links.add(name)
            if header.again:
                rec.moving.discard(name)
                rec.output.streams[name].link_done = False   # unless closed: it goes on here
            before, done = rec.tails.get(name), trio.Event()
            rec.tails[name] = done
            try:
                if before is not None:
                    await before.wait()         # the old link first, to its EOF
                await self._copy(rec, name, stream, rest)
            finally:
                done.set()
            if rec.tails.get(name) is done and name not in rec.moving:
                rec.output.link_over(name)      # no newer link: the stream is over

    async def _copy(self, rec: Record, name: str, stream: trio.SocketStream, first: bytes) -> None:
        """Pass what the link brings on, to its EOF (or reset: what came before it counts)."""
        scope = trio.CancelScope()
        rec.scopes.append(scope)
        rec.output.append(name, first)
        with scope:
            try:
                while data := await stream.receive_some(CHUNK):
                    rec.output.append(name, data)
            except (trio.BrokenResourceError, OSError) as exc:
                log.info("pid %d: %s link: %s", rec.pid, name, exc)
        rec.scopes.remove(scope)

    def expect_again(self, pid: int, moving: bool = True) -> bool:
        """A move of `pid` begins (`moving`) or is over without new links (not `moving`):
        while it moves, the EOF of its output links does not end its streams, the links
        made again (`again` headers) go on with them, after the old ones' EOF. False if
        `pid` is not a process of ours (its links are not ours to serve)."""
        rec = next((r for r in self._records.values() if r.pid == pid), None)
        if rec is None:
            return False
        if moving:
            rec.moving = set(rec.links)
            return True
        rec.moving.clear()
        for name in rec.links:
            tail = rec.tails.get(name)
            if tail is not None and tail.is_set():
                rec.output.link_over(name)      # the old link ended meanwhile: it was the last
        return True

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
                if name not in rec.links or (name in rec.moving and rec.tails[name].is_set()):
                    out.link_over(name)     # never connected, or not made again
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
        devnull = -1
        try:
            devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            cred = (caller.uid, caller.gid, sorted(caller.groups))
            pid = fork_reset(lambda: _child(args, env, cred, writer, status_w, go_r), status_w,
                             (go_r, writer.cwd_fd), setsid=True, stdio=devnull)
        except BaseException:
            os.close(status_r)
            os.close(go_w)
            raise
        finally:
            for fd in (status_w, go_r, devnull):
                if fd >= 0:
                    os.close(fd)
        return _Child(pid, trio.lowlevel.FdStream(status_r), go_w)

    async def _launch(self, child: "_Child", node: int, caller: Caller, command: str,
                      launch: Launch, token: str) -> None:
        """READY -> execmove for the child -> go -> it exec'd (EOF) or failed (raised)."""
        try:
            with trio.fail_after(LAUNCH_TIMEOUT):
                report = await child.record()
                if report is None:
                    raise BpfsError(errno.EIO, f"exec: the child for {command} died")
                if report.stage != READY:
                    raise _failure(report, command)
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
                report = await child.record()
                if report is not None:
                    raise _failure(report, command)
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
    buf: bytearray = field(default_factory=bytearray)

    async def record(self) -> Report | None:
        """The child's next report; None at EOF (it exec'd, or died)."""
        while (report := Report.take(self.buf)) is None:
            chunk = await self.status.receive_some()
            if not chunk:
                return None
            self.buf += chunk
        return report

    def go(self) -> None:
        os.write(self.go_w, GO)
        os.close(self.go_w)
        self.go_w = -1

    def close(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)
            self.go_w = -1
        self.status.close()


def _failure(report: Report, command: str) -> BpfsError:
    err = report.errno
    text = os.strerror(err)
    if report.stage == EXEC:
        return BpfsError(err, f"{command}: command not found" if err == errno.ENOENT
                         else f"{command}: {text}")
    where = {CWD: "changing to the writer's cwd"}
    return BpfsError(err, f"exec: {where.get(report.stage, 'setting up the child')}: {text}")


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
           writer: Writer, status_w: int, go_r: int) -> None:
    """After fork_reset: become the writer, wait for "go", exec; never returns."""
    stage = SETUP
    try:
        uid, gid, groups = cred
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        os.umask(writer.umask)
        stage = CWD
        os.fchdir(writer.cwd_fd)
        os.close(writer.cwd_fd)
        stage = SETUP
        os.write(status_w, Report(0, READY, 0).pack())
        if os.read(go_r, 1) != GO:
            os._exit(1)                 # the master gave up on us
        os.close(go_r)
        stage = EXEC
        err = _exec(argv, env)
    except OSError as exc:
        err = exc.errno or errno.EIO
    except BaseException:
        err = errno.EIO
    try:
        os.write(status_w, Report(0, stage, err).pack())
    finally:
        os._exit(127)


def _exec(argv: list[bytes], env: dict[bytes, bytes]) -> int:
    """execve argv[0] as execvp would find it in env's PATH (default "/bin:/usr/bin"); the
    errno if none ran."""
    err = errno.ENOENT
    for candidate in path_candidates(argv[0], env.get(b"PATH", b"/bin:/usr/bin")):
        try:
            os.execve(candidate, argv, {**env, b"BPROC_PROGNAME": candidate})
        except OSError as exc:
            if exc.errno == errno.EACCES:
                err = exc.errno
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                return exc.errno or errno.EIO
    return err

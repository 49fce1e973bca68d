"""The node side of migration: restore, files, signal; and the exit reports.

Messages (bpfs/wire/messages.py):

    master -> node  restore  id, image, uid, gid, groups, io, port, token [, pid [, rank]]
    node -> master  need     id, hashes              only if the node lacks file contents
    master -> node  files    id, contents
    node -> master  restored id, pid   |   failed id, errno, message
    master -> node  signal   pid, sig [, id] [, group]   group: to its process group
    node -> master  stopped  pid, sig                each time the process stops
    node -> master  continued pid                    each time it is continued
    node -> master  exited   pid, code, signal, id   once per restored process

A restore is an `Attempt`: done by the handler when nothing in it waits, else as a task
of the session, which keeps dispatching meanwhile. Any BpfsError before the process runs
is `failed` with its errno, and nothing runs; a bad IO spec is `failed` EINVAL. Each
restored process is a job of its own; `ProcessTable` reports its stops, continues and
exit on the session that restored it, and `signal` reaches only processes that session
holds, restored for that `id`. The steps and the reasons: docs/migration.md.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal as signals
import time
from dataclasses import dataclass
from typing import Any

import trio

from bpfs.errors import BpfsError, einval
from bpfs.migrate import Image, loads, set_rank
from bpfs.migrate.helper import JOB_RECORD
from bpfs.node import earlylinks, stdio
from bpfs.node.init import Reaper
from bpfs.node.restorer import NodeRestorer
from bpfs.node.session import Session
from bpfs.wire import execreq, messages

log = logging.getLogger("bpslave")

FILES_TIMEOUT = 60.0
MAX_PIECED = 16                     # moved processes' restores announced at once
DYING_WAIT = 2.0                    # a restore waits for a dropped copy of its PID


def check_restore(req: messages.Restore) -> None:
    """BpfsError EINVAL for what the message's types cannot say (bpfs/wire/messages.py
    checked the rest): the IO specs, a rank without a pid, socket IO's port and token."""
    for fd, spec in enumerate(req.io):
        execreq.parse_io(spec, fd)
    if req.rank is not None and req.pid is None:
        raise einval("restore: a rank needs a pid")
    if "socket" in req.io and not (0 < req.port < 65536
                                   and execreq.is_token(req.token)):
        raise einval("restore: socket IO needs a port and a 32-hex-digit token")
    if req.host is not None:
        try:
            ipaddress.ip_address(req.host)
        except ValueError:
            raise einval(f"restore: host {req.host[:64]!r} is not an address") from None


@dataclass
class Held:
    session: Session
    id: int
    argv0: str
    kept: bool = False              # a restored job's: its keeper reports its end


class ProcessTable:
    """The restored processes the node holds, each with the session it reports to.

    Each is a job of its own (bpfs/migrate/restore.py): its parent is its job's keeper,
    which writes every stop, continue and end of it to `jobs_w` (records of
    `JOB_RECORD`); `watch_jobs` reads them. If the keeper dies first (only root can kill
    it), the process is re-parented to us and the reaper reports its end instead.
    """

    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper
        self.held: dict[int, Held] = {}
        # copies that moved away, their ends not seen yet, oldest first: a process that
        # moves away, back and away again at once has two (the first one's end may be
        # read after the second is dropped)
        self.dropped: dict[int, list[Held]] = {}
        self.jobs_r, self.jobs_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def hold(self, pid: int, held: Held) -> None:
        # No reading of the keepers' records here: a process quick to end (`true`) has
        # its end written before it is held, and read now that end would find no one
        # (lost: its keeper's exit then took it for killed). Records come in order, so an
        # older copy's late end is still matched to `dropped` when read after this.
        self.held[pid] = held

    def drop(self, pid: int) -> None:
        """`pid` moved away: its copy here is killed, and its end reported to nobody. A
        restored job's end comes late (its keeper's record, the keeper's own end), maybe
        once `pid` is held again for a new copy that moved back here: that end is the
        dropped copy's (`dropped`), not the new one's."""
        held = self.held.pop(pid, None)
        if held is not None and held.kept:
            self.dropped.setdefault(pid, []).append(held)

    def _end_of_dropped(self, pid: int, held: Held | None = None) -> bool:
        """Forget the oldest dropped copy of `pid` (or `held`); False if there is none."""
        copies = self.dropped.get(pid)
        if not copies or (held is not None and held not in copies):
            return False
        copies.remove(copies[0] if held is None else held)
        if not copies:
            del self.dropped[pid]
        return True

    def dying(self, pid: int) -> bool:
        """A copy of `pid` that moved away (`drop`) may still hold its number here: its
        end not read yet from its keeper, who writes it once it has reaped it (the number
        free then). A restore of `pid` now (it moved back at once) would find the number
        taken (clone3: EEXIST), so it waits (`until_gone`). Not /proc: a reaped process
        leaves /proc a moment before its number is free (EEXIST once in 800 moves of a
        ping-pong). The keepers' records are read first (trio's thread)."""
        if pid in self.dropped:
            self.read_jobs()
        return pid in self.dropped

    async def until_gone(self, pid: int) -> None:
        """Until no dropped copy holds `pid` (DYING_WAIT at most: then the restore goes
        on, and fails EEXIST if the number is still taken)."""
        with trio.move_on_after(DYING_WAIT):
            while self.dying(pid):
                await trio.sleep(0.001)

    def hold_child(self, child: Any) -> None:
        """A process forked here (bpfs.node.supervisor.Child): signals reach it like a
        restored one's; its end is the supervisor's to report."""
        self.held[child.pid] = Held(child.job.session, child.id, "")

    def drop_child(self, pid: int) -> None:
        self.held.pop(pid, None)

    def adopt(self, pid: int, keeper: int | None = None) -> None:
        """From now on its exit is reaped and reported (after `restored` was sent)."""
        if keeper is None:
            self.reaper.adopt(pid, self._exited)
            return
        held = self.held.get(pid)
        if held is not None:
            held.kept = True
        self.reaper.on_exit(pid, self._exited)        # if it becomes ours (keeper killed)
        self.reaper.adopt(keeper, lambda _k, _st: self._keeper_gone(pid, held))

    async def watch_jobs(self) -> None:
        """Read the keepers' records as they come; runs until cancelled."""
        while True:
            await trio.lowlevel.wait_readable(self.jobs_r)
            self.read_jobs()

    def read_jobs(self) -> None:
        """Dispatch every record the keepers have written: stopped, continued, ended."""
        while True:
            try:
                data = os.read(self.jobs_r, JOB_RECORD.size * 512)
            except (BlockingIOError, InterruptedError):
                return
            for pid, status in JOB_RECORD.iter_unpack(data):
                self._job_event(pid, status)

    def _job_event(self, pid: int, status: int) -> None:
        if os.WIFSTOPPED(status) or os.WIFCONTINUED(status):
            held = self.held.get(pid)
            if held is not None:
                held.session.report(messages.Stopped(pid=pid, sig=os.WSTOPSIG(status))
                                    if os.WIFSTOPPED(status) else messages.Continued(pid=pid))
            return
        if self._end_of_dropped(pid):
            log.debug("process %d's dropped copy ended (status %#x)", pid, status)
            return                  # a copy that moved away, not the one held now
        self.reaper.forget(pid)
        self._exited(pid, status)

    def _keeper_gone(self, pid: int, held: Held | None) -> None:
        """The keeper of `pid` (`held`) ended: after its last record, or killed (by root).
        Only that copy's: `pid` may name another by now (it moved away and back)."""
        self.read_jobs()
        if held is not None:                    # its record was lost or never written
            self._end_of_dropped(pid, held)
        if held is None or self.held.get(pid) is not held:
            return
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:       # the keeper reaped it, then died before telling
            got, status = pid, signals.SIGKILL
        if got:
            self.reaper.forget(pid)
            self._exited(pid, status)

    def _exited(self, pid: int, status: int) -> None:
        held = self.held.pop(pid, None)
        if held is None:
            return
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        log.debug("process %d (%s) exited: code %s, signal %s", pid, held.argv0, code, sig)
        held.session.report(messages.Exited(pid=pid, code=code, signal=sig, id=held.id))

    def signal(self, session: Session, pid: int, sig: int, mid: int | None = None,
               group: bool = False) -> None:
        """Signal a process the session holds, if it is the one restore `mid` made (when
        given); with `group` (a terminal's Ctrl-C, Ctrl-Z on the master), its whole process
        group, as the terminal does for a local job, while it still leads its group (else
        the process alone)."""
        held = self.held.get(pid)
        if held is None or held.session is not session:
            log.debug("signal %d for pid %d, which this node does not hold: ignored", sig, pid)
            return
        if mid is not None and mid != held.id:
            log.debug("signal %d for pid %d of restore %r, but it is restore %d's: ignored",
                      sig, pid, mid, held.id)
            return
        if not 0 < sig < signals.NSIG:
            log.debug("bad signal number %d for pid %d: ignored", sig, pid)
            return
        try:
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            log.debug("signal %d for pid %d, which is gone", sig, pid)


# ---- handlers (bpfs/node/service.py's FROM_MASTER) ----------------------------------

async def on_again(session: Session, msg: messages.Again) -> None:
    """The next `restore` of this id is a moved process's: its links are made again."""
    if len(session.again) >= MAX_PIECED:
        session.again.pop(next(iter(session.again)))
    session.again[msg.id] = msg.consumed
    earlylinks.on_again(session, msg)       # its links connect while the image comes


async def on_restore(session: Session, msg: messages.Restore) -> None:
    """A restore whose whole image is in the request (a streamed one: bpfs/node/streamin.py)."""
    try:
        check_restore(msg)
    except BpfsError as exc:
        log.warning("restore %d refused: %s", msg.id, exc)
        session.report(messages.Failed(id=msg.id, errno=exc.errno, message=exc.message))
        return
    standins = getattr(session.node, "standins", None)
    if standins is not None and msg.pid in standins.held and session.nursery is not None:
        session.nursery.start_soon(standins.restore_in, session, msg)   # back in its
        return                                                          # stand-in
    attempt = Attempt(session, msg)
    if not attempt.at_once():
        assert session.nursery is not None
        session.nursery.start_soon(attempt.run)


async def on_files(session: Session, msg: messages.Files) -> None:
    waiter = session.files.pop(msg.id, None)
    if waiter is None:
        log.debug("files for %d, which no restore waits for: ignored", msg.id)
    else:
        waiter.send_nowait(msg.contents)


async def on_signal(session: Session, msg: messages.Signal) -> None:
    standins = getattr(session.node, "standins", None)
    if standins is not None and standins.job(msg.pid, msg.sig):
        return                          # its process stopped or went on (node/standins)
    session.node.procs.signal(session, msg.pid, msg.sig, msg.id, msg.group is True)


async def on_answer(session: Session, msg: messages.Forked | messages.Killed
                    | messages.Execd) -> None:
    if session.node.supervisor is not None:
        session.node.supervisor.answered(msg)


async def on_spare(session: Session, msg: messages.Spare) -> None:
    """A spare for `parent`'s next fork (bpfs/node/spares.py); back at once if it
    cannot be used (no supervisor, a process not ours, or moving)."""
    sup = session.node.supervisor
    if sup is None:
        session.report(messages.Unforked(pid=msg.pid, id=msg.id))
        return
    mover = getattr(session.node, "mover", None)
    sup.on_spare(session, msg, moving=mover is not None and msg.parent in mover.moves)


async def on_nottaken(session: Session, msg: messages.NotTaken) -> None:
    if session.node.supervisor is not None:
        session.node.supervisor.not_taken(msg)


async def on_armed(session: Session, msg: messages.Armed) -> None:
    if session.node.supervisor is not None:
        session.node.supervisor.arm(msg.pid)


async def on_ended(session: Session, msg: messages.Ended) -> None:
    standins = getattr(session.node, "standins", None)
    if standins is not None and standins.ended(msg.pid, msg.status):
        return                          # a process forked here that moved (node/standins)
    if session.node.supervisor is not None:
        session.node.supervisor.ended(msg.pid, msg.status)


class Attempt:
    """One restore, from request to reply (`restored` or `failed`, queued with `report`).

    `at_once` does it all in the handler when nothing needs waiting for, the usual case:
    the PID is in the request, the node has every file, the links are connected when
    connect() returns (loopback). Else it stops before anything waits and `run`, a task of
    the session, goes on from there: links still connecting, file contents to fetch.
    """

    def __init__(self, session: Session, req: messages.Restore) -> None:
        self.session, self.req = session, req
        self.node: NodeRestorer = session.node.restorer
        self.steps = Steps()
        self.links: stdio.Links | None = None
        self.fds: list[int | None] = [None, None, None]
        self.loaded: tuple[Image, list[str]] | None = None

    def _links(self, pid: int) -> stdio.Links:
        """Its stdio links: first ones, or made again for a process that moved here (an
        `again` came for this restore: fd 0 goes on from the stdin byte it had read)."""
        return earlylinks.links_for(self.session, self.req, pid)

    def take_links(self, pid: int) -> bool:
        """Its stdio links, if they are all connected by now (False: not yet)."""
        self.links = self._links(pid)
        if not self.links.ready():
            return False
        self.fds[:] = self.links.fds()
        self.steps.mark("links")
        return True

    def at_once(self) -> bool:
        """True if the restore is over (either way); False: `run` must finish it."""
        req = self.req
        try:
            if req.pid is None or self.session.node.procs.dying(req.pid):
                return False
            if not self.take_links(req.pid):
                return False
            image, missing, pid = _restore_job(self.node, req, self.fds, None, {})
            if pid is None:
                self.loaded = (image, missing)
                return False
        except BaseException as exc:
            self._failed(exc)
            return True
        self._restored(image, pid)
        return True

    async def run(self) -> None:
        """The rest of the restore; never raises but for cancellation (the session is over)."""
        try:
            image, pid = await self._prepare_and_restore()
        except BaseException as exc:
            self._failed(exc)
            return
        self._restored(image, pid)

    async def _prepare_and_restore(self) -> tuple[Image, int]:
        """Steps 1-4 of the module docstring, from where `at_once` stopped."""
        req, node = self.req, self.node
        if self.links is None:
            if req.pid is None:         # only the image knows the PID: load it first
                self.loaded = _load(node, req)
                self.steps.mark("load")
            pid = req.pid if self.loaded is None else self.loaded[0].pid
            self.links = self._links(pid)
        if self.links.socks:
            if not self.links.ready():
                await self.links.wait()
            self.fds[:] = self.links.fds()
            self.steps.mark("links")
        await self.session.node.procs.until_gone(
            req.pid if self.loaded is None else self.loaded[0].pid)
        image, missing, restored = _restore_job(node, req, self.fds, self.loaded, {})
        if restored is None:
            content = await _fetch(self.session, req.id, missing)
            self.steps.mark("wait for files")
            image, _, restored = _restore_job(node, req, self.fds, (image, []), content)
        self.steps.mark("restore")
        assert restored is not None
        return image, restored

    def _restored(self, image: Image, pid: int) -> None:
        stdio.close_all(self.fds)
        req, procs = self.req, self.session.node.procs
        procs.hold(pid, Held(self.session, req.id, image.argv[0] if image.argv else image.comm))
        # logged before anything is reported: who reads the log after the process's end
        # finds it there
        log.debug("restore %d: pid %d (%s) as uid %d: %s", req.id, pid, image.comm, req.uid,
                  self.steps)
        # `restored` goes through the report queue, and the process is adopted before
        # anything else can run: its `exited` (same queue) can only follow, and no sweep of
        # the reaper in between can take its status for an orphan's.
        self.session.report(messages.Restored(id=req.id, pid=pid))
        keeper, listener = self.node.restorer.last_keeper, self.node.restorer.last_listener
        procs.adopt(pid, keeper)                            # this restore's: no await since
        supervisor = self.session.node.supervisor
        if listener is not None:
            if supervisor is None:
                os.close(listener)
            else:
                supervisor.add_job(self.session, req.id, pid, listener, keeper, req.ppid,
                                   req.pgid, req.sid)
        self.node.prepare()                                 # the next one's, off its path

    def _failed(self, exc: BaseException) -> None:
        """Nothing runs: close what was opened; tell the master why (unless cancelled)."""
        stdio.close_all(self.fds)
        if self.links is not None:
            self.links.close()
        rid = self.req.id
        if isinstance(exc, BpfsError):
            log.warning("restore %d failed: %s", rid, exc)
            err, message = exc.errno, exc.message
        elif isinstance(exc, Exception):        # a bug of ours: say so, keep serving
            log.error("restore %d failed", rid, exc_info=exc)
            err, message = errno.EIO, f"node error: {type(exc).__name__}: {exc}"
        else:                                   # cancelled: the session is over
            raise exc
        self.session.report(messages.Failed(id=rid, errno=err or errno.EIO,
                                            message=message[:4096]))  # within messages.TEXT


class Steps:
    """Node-side time of one restore, by step; the wait for the master's `files` apart."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.steps: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.steps.append((name, now - self.t))
        self.t = now

    def __str__(self) -> str:
        node = sum(dt for name, dt in self.steps if name != "wait for files")
        parts = ", ".join(f"{name} {dt * 1e3:.1f}" for name, dt in self.steps)
        return f"{node * 1e3:.1f} ms on the node ({parts})"


async def _fetch(session: Session, rid: int, missing: list[str]) -> dict[str, bytes]:
    """Ask the master for the contents the node lacks; wait for its `files`."""
    send, receive = trio.open_memory_channel[Any](1)
    session.files[rid] = send
    try:
        await session.send(messages.Need(id=rid, hashes=missing))
        with trio.move_on_after(FILES_TIMEOUT):
            got = await receive.receive()
            if isinstance(got, BpfsError):
                raise got
            return got
        raise BpfsError(errno.ETIMEDOUT, f"the master did not send the {len(missing)} "
                        "file contents this node lacks")
    finally:
        session.files.pop(rid, None)


# ---- synchronous steps (the Restorer's thread is the event loop's) -------------------

def _load(node: NodeRestorer, req: messages.Restore) -> tuple[Image, list[str]]:
    return prepared(node, req, loads(req.image))


def prepared(node: NodeRestorer, req: messages.Restore, image: Image
             ) -> tuple[Image, list[str]]:
    """The request's PID and rank in the loaded `image`; the file contents it lacks."""
    if req.pid is not None:
        image.pid = req.pid
    if req.rank is not None and not set_rank(image, req.rank):
        log.debug("restore %d: no BPROC_RANK=XXXXXXX in the environment", req.id)
    return image, node.restorer.missing(image)


def _restore_job(node: NodeRestorer, req: messages.Restore, fds: list[int | None],
                 loaded: tuple[Image, list[str]] | None, content: dict[str, bytes],
                 begin: bool = False) -> tuple[Image, list[str], Any]:
    """Load the image (unless `loaded`); if file contents are missing and not in
    `content`, stop there: (image, missing, None). Else open the local stdio files as
    the user into `fds` (the caller closes them) and restore: (image, [], pid); with
    `begin`, only up to its pages: (image, [], Build) (bpfs/node/streamin.py)."""
    image, missing = loaded if loaded is not None else _load(node, req)
    if missing and not content:
        return image, missing, None
    content = _store(node, content)
    if node.bproc and (image.cwd + "/").startswith(node.bproc + "/"):
        image.cwd = "/"     # a chdir there would wait on this thread, which serves it
    with node.as_user(req.uid, req.gid, req.groups):
        stdio.open_local(req.io, fds, image.cwd, image.umask)
    how = node.restorer.begin if begin else node.restorer.restore
    pid = how(image, pid=image.pid, uid=req.uid, gid=req.gid,  # type: ignore[operator]
              groups=req.groups, fds=[int(fd) for fd in fds],  # type: ignore[arg-type]
              file_content=content)
    return image, [], pid


def _store(node: NodeRestorer, content: dict[str, bytes]) -> dict[str, bytes]:
    """Put received contents into the Restorer's cache (EINVAL if data is not its digest's),
    so the next migration of the same program goes by reference; what is left to pass to
    `restore` (everything when there is no cache)."""
    cache = node.restorer.cache
    if cache is None:
        return content
    for digest, data in content.items():
        cache.put(digest, data)
    return {}

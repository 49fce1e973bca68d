"""The node's restore thread: the one OS thread that owns the `Restorer`, and a reaper that
leaves the Restorer's children alone.

ptrace accepts requests only from the tracer *thread*, so every call to one `Restorer`
(create, missing, restore, close) runs in one dedicated thread fed by a queue; trio tasks
`await thread.call(fn, *args)` and the event loop keeps running (heartbeats go on) while a
restore works. trio.to_thread is no use here: it runs each call on whatever thread it has.
The thread creates the Restorer as soon as the daemon starts, so the pre-cleaned helper
exists before the first request and the first migration is as fast as the others.

The thread is also the only one of the daemon whose credentials ever change: it has its own
fs attributes (unshare(CLONE_FS): umask) and opens a user's stdio files with the user's
fsuid, fsgid and groups set on itself alone (raw syscalls, not glibc's process-wide setxid
broadcast), restoring root's right after the open.

Reaping (the daemon is PID 1, see bpfs/node/init.py): everything the Restorer forks (its
helper, a process under construction) is a child of this thread, and PID 1's blanket sweep
would steal their ptrace stops. `NodeReaper` therefore
  * never sweeps while a job runs (the job holds `lock`; the sweep is re-run when it ends), and
  * hides this thread's children, except the restored processes handed over by `adopt`.
A restored process that exits before it is adopted stays a zombie until then: its status is
never lost, and the master hears `restored` before `exited`.

Cache: received file contents are kept by hash in a tmpfs mounted on CACHE_DIR inside the
node's own mount namespace (the node daemon is PID 1 of new PID and mount namespaces, and its
mounts are private). Each node, real or simulated, so has its own cache: it lives as long as
the daemon, costs memory only for content the node had to be sent, and simulated nodes sharing
the host's filesystem do not see each other's. Only the empty mount point is created on the
host's filesystem. If it cannot be mounted, restores use memory files and nothing is cached.

Errors: a job's exception (BpfsError from the migration engine) is re-raised in the awaiting
task; if the Restorer cannot be created, every restore fails with that error until one can.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import outcome
import trio

from bpfs.errors import BpfsError
from bpfs.migrate import Restorer
from bpfs.node import nsutil
from bpfs.node.init import ExitCallback, Reaper, task_children

log = logging.getLogger("bpslave")

CACHE_DIR = "/var/cache/bpfs/node"
CLONE_FS = 0x00000200
SYS_SETGROUPS, SYS_SETFSUID, SYS_SETFSGID = 116, 122, 123   # x86_64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def setup_cache_dir() -> str | None:
    """Mount the node's private tmpfs cache on CACHE_DIR; None (no cache) if we cannot."""
    if os.getpid() != 1:       # not in namespaces of our own: a mount would reach the host
        log.info("not PID 1 of a namespace: received file contents are not cached")
        return None
    try:
        os.makedirs(CACHE_DIR, mode=0o755, exist_ok=True)
        nsutil.mount("bpfs-cache", CACHE_DIR, "tmpfs", nsutil.MS_NOSUID | nsutil.MS_NODEV,
                     "mode=0700")
    except OSError as exc:
        log.warning("no file cache (cannot mount a tmpfs on %s: %s)", CACHE_DIR,
                    exc.strerror or exc)
        return None
    return CACHE_DIR


class RestoreThread:
    """A thread running jobs `fn(self, *args)` one at a time; `self.restorer` is its Restorer."""

    def __init__(self, cache_dir: str | None) -> None:
        self.cache_dir = cache_dir
        self.lock = threading.Lock()          # held while a job runs (see NodeReaper)
        self.tid: int | None = None           # the thread's TID, once it runs
        self.on_idle: Callable[[], None] = lambda: None    # called after each job
        self._restorer: Restorer | None = None
        self._root_groups: list[int] = []
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple, Callable] | None] = \
            queue.SimpleQueue()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bpfs-restore", daemon=True)

    def start(self) -> None:
        """Start the thread and wait until its Restorer (with its clean helper) is made, so the
        node registers ready to restore. A failure is logged; restores retry it."""
        self._thread.start()
        self._started.wait()
        made = threading.Event()

        def done(result: outcome.Outcome) -> None:
            _log_failure(result)
            made.set()

        self.submit(lambda rt: rt.restorer, done)
        made.wait()

    def stop(self) -> None:
        self._jobs.put(None)

    @property
    def restorer(self) -> Restorer:
        """The Restorer (in the thread only); a new one if the last one was dropped."""
        if self._restorer is None:
            self._restorer = Restorer(self.cache_dir)
        return self._restorer

    def renew(self) -> None:
        """Drop the Restorer and make a fresh one (after kill(-1) took its helper)."""
        def job(rt: RestoreThread) -> None:
            rt._drop()
            rt.restorer
        self.submit(job, _log_failure)

    def submit(self, fn: Callable[..., Any], done: Callable[[outcome.Outcome], None],
               *args: Any) -> None:
        self._jobs.put((fn, args, done))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(self, *args)` in the thread; its result, or its exception raised here.

        A cancelled caller stops waiting but the job still runs to its end: shield the call
        when its result must not be lost (a restored process).
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome] = []

        def finished(result: outcome.Outcome) -> None:
            box.append(result)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self.submit(fn, finished, *args)
        await done.wait()
        return box[0].unwrap()

    def _main(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # main thread's job
        self.tid = threading.get_native_id()
        self._root_groups = os.getgroups()
        try:
            nsutil.unshare(CLONE_FS)           # our own umask, for users' stdio files
        except OSError as exc:
            log.warning("restore thread shares the daemon's umask: %s", exc)
        self._started.set()
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            with self.lock:
                result = outcome.capture(fn, self, *args)
            done(result)
            self.on_idle()
        with self.lock:
            self._drop()

    def _drop(self) -> None:
        if self._restorer is not None:
            restorer, self._restorer = self._restorer, None
            restorer.close()

    # ---- the user's credentials, on this thread only ----

    @contextmanager
    def as_user(self, uid: int, gid: int, groups: Sequence[int]) -> Iterator[None]:
        """Filesystem access as uid/gid/groups for the body (root: unchanged). EPERM if the
        kernel would not switch; root's credentials are back when the body ends."""
        if threading.get_native_id() != self.tid:
            raise RuntimeError("as_user outside the restore thread")
        if uid == 0:
            yield
            return
        try:
            _setgroups(groups)
            _setfsid(SYS_SETFSGID, gid)
            _setfsid(SYS_SETFSUID, uid)
            yield
        finally:
            _setfsid(SYS_SETFSUID, 0)
            _setfsid(SYS_SETFSGID, 0)
            _setgroups(self._root_groups)


def _setgroups(groups: Sequence[int]) -> None:
    arr = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    if _libc.syscall(ctypes.c_long(SYS_SETGROUPS), ctypes.c_long(len(groups)), arr) != 0:
        err = ctypes.get_errno()
        raise BpfsError(err, f"setgroups: {os.strerror(err)}")


def _setfsid(nr: int, value: int) -> None:
    """setfsuid/setfsgid never fail visibly: ask again (with -1) to learn what we are."""
    _libc.syscall(ctypes.c_long(nr), ctypes.c_long(value))
    if _libc.syscall(ctypes.c_long(nr), ctypes.c_long(0xFFFFFFFF)) != value:
        raise BpfsError(errno.EPERM, f"cannot take filesystem id {value}")


def _log_failure(result: outcome.Outcome) -> None:
    if isinstance(result, outcome.Error):
        log.error("cannot prepare the restorer: %s", result.error)


class NodeReaper(Reaper):
    """PID 1's reaper, kept off the restore thread's children (see the module docstring)."""

    def __init__(self, thread: RestoreThread) -> None:
        super().__init__()
        self.thread = thread
        self._adopted: set[int] = set()
        self._pending = False
        self._token: trio.lowlevel.TrioToken | None = None
        thread.on_idle = self._wake

    def adopt(self, pid: int, callback: ExitCallback) -> None:
        """`pid`, a restored process, is reaped like any child from now on (and now)."""
        self._adopted.add(pid)

        def exited(pid: int, status: int) -> None:
            self._adopted.discard(pid)
            callback(pid, status)

        self.on_exit(pid, exited)
        self.reap()

    def children(self) -> list[int]:
        tid = self.thread.tid
        if tid is None:
            return super().children()
        pids: list[int] = []
        for task in os.listdir("/proc/self/task"):
            kids = task_children(task)
            if task == str(tid):                # the Restorer's: only what was adopted
                kids = [p for p in kids if p in self._adopted]
            pids += kids
        return pids

    def reap(self) -> int:
        if not self.thread.lock.acquire(blocking=False):
            self._pending = True              # the restore thread is at work: later
            return 0
        try:
            self._pending = False
            return super().reap()
        finally:
            self.thread.lock.release()

    def _wake(self) -> None:
        """In the restore thread after a job: re-run a sweep that was put off."""
        if self._pending and self._token is not None:
            try:
                self._token.run_sync_soon(self.reap)
            except trio.RunFinishedError:
                pass

    async def run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        await super().run()

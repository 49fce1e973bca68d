"""The node's `Restorer`, run in the event loop's own thread.

ptrace answers only the thread that attached, so every call to one `Restorer` must come
from one thread. That thread is the daemon's main thread, the one trio runs in: a restore
is a synchronous call of about a millisecond, made from the session's task, and the loop
waits for it. An earlier design ran restores in a thread of their own; handing each job
over and back (a queue, a wake-up of the loop, two more trips through it, and the GIL
going back and forth) cost as much as the restore's own Python code, and 32 simulated
nodes on two cores pay that 32 times per `bpsh -a`. A restore has nothing to wait for
but its own new process's ptrace stops (microseconds), and a node's restores were
serialised in that one thread anyway.

The Restorer is made when the daemon starts, so its helper is ready before the first
request and the first migration is as fast as the others. After kill(-1) took the helper
(`renew`) a fresh one is made at once.

Credentials: user files (stdio `file:` specs) are opened with the user's fsuid, fsgid and
groups set on this thread alone (raw syscalls, not glibc's process-wide setxid broadcast),
and root's are back right after the open (`as_user`). Nothing else runs on the thread
meanwhile: the call is synchronous.

Reaping (the daemon is PID 1, see bpfs/node/init.py): the helper and a process under
construction are children of this thread whose ptrace stops the Restorer waits for, by
PID, inside a restore call, when the reaper (which waits for any child) cannot run; none
is left pending when the call returns. A restored process is adopted in the same
synchronous step that queues its `restored`: its status is never lost, and the master
hears `restored` before `exited`. Each restored process is a job whose parent is its
keeper (bpfs/migrate/restore.py): the keeper reports its stops, continues and end through
the jobs pipe (bpfs/node/procs.py), and the reaper reaps the keeper. The next restore's
keeper is made after each restore (`prepare`), and at start with the helper.

Cache: received file contents are kept by hash in a tmpfs mounted on CACHE_DIR inside the
node's own mount namespace (the node daemon is PID 1 of new PID and mount namespaces, and its
mounts are private). Each node, real or simulated, so has its own cache: it lives as long as
the daemon, costs memory only for content the node had to be sent, and simulated nodes sharing
the host's filesystem do not see each other's. Only the empty mount point is created on the
host's filesystem. If it cannot be mounted, restores use memory files and nothing is cached.
The mount is root's alone (0700), and a cached file is execute-only until a dumpable process
maps it (bpfs/migrate/filecache.py): content of a program its user may run but not read is
never readable by users on the node.

Errors: BpfsError from the migration engine reaches the caller; if the Restorer cannot be
created, every restore fails with that error until one can.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from bpfs.errors import BpfsError
from bpfs.migrate import Restorer
from bpfs.node import nsutil

log = logging.getLogger("bpslave")

CACHE_DIR = "/var/cache/bpfs/node"
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


class NodeRestorer:
    """The node's Restorer, used from the thread that calls `start` (the event loop's)."""

    def __init__(self, cache_dir: str | None, jobs_fd: int | None = None) -> None:
        self.cache_dir = cache_dir
        self.jobs_fd = jobs_fd                # each restore a job whose keeper reports here
        self._supervised = False              # seccomp filter + listener (supervisor.py)
        # called before each use: the supervisor's last directed fork has its PID (a
        # clone here may take a number only once the namespace's counter is parked)
        self.settle: Callable[[], None] = lambda: None
        self.numbering: Callable[[], Any] = contextlib.nullcontext    # (the counter's guard)
        self.bproc: str | None = None         # /bproc on the node, which this thread serves:
                                              # a restore must not wait on it (no cwd there)
        self.tid: int | None = None           # the owning thread, once started
        self._restorer: Restorer | None = None
        self._root_groups: list[int] = []

    def start(self) -> None:
        """Take the calling thread as the owner and make the Restorer (with its clean
        helper) now, so the node registers ready to restore. A failure is logged; the
        first restore tries again."""
        self.tid = threading.get_native_id()
        self._root_groups = os.getgroups()
        try:
            self.restorer.prepare()
        except BpfsError as exc:
            log.error("cannot prepare the restorer: %s", exc)

    @property
    def supervised(self) -> bool:
        return self._supervised

    @supervised.setter
    def supervised(self, on: bool) -> None:
        """Whether restores install the one-PID-space filter (bpfs/node/supervisor.py): only
        for a master that answers its questions (one that sent its pid_max)."""
        self._supervised = on
        if self._restorer is not None:
            self._restorer.supervised = on

    @property
    def restorer(self) -> Restorer:
        """The Restorer; a new one if the last one was dropped."""
        if threading.get_native_id() != self.tid:
            raise RuntimeError("the node's Restorer used outside its thread")
        self.settle()
        if self._restorer is None:
            self._restorer = Restorer(self.cache_dir, self.jobs_fd, self._supervised)
            self._restorer.numbering = self.numbering
        return self._restorer

    def prepare(self) -> None:
        """Make the next restore's keeper now, off its path (after a restore was reported,
        and at start); a failure is logged, and that restore makes its own."""
        try:
            self.restorer.prepare()
        except BpfsError as exc:
            log.warning("cannot prepare a job's keeper: %s", exc)

    def renew(self) -> None:
        """Drop the Restorer and make a fresh one (after kill(-1) took its helper)."""
        self.close()
        try:
            self.restorer.prepare()
        except BpfsError as exc:
            log.error("cannot prepare the restorer: %s", exc)

    def close(self) -> None:
        if self._restorer is not None:
            restorer, self._restorer = self._restorer, None
            restorer.close()

    # ---- the user's credentials, on this thread only ----

    @contextmanager
    def as_user(self, uid: int, gid: int, groups: Sequence[int]) -> Iterator[None]:
        """Filesystem access as uid/gid/groups for the body (root: unchanged). EPERM if the
        kernel would not switch; root's credentials are back when the body ends."""
        if threading.get_native_id() != self.tid:
            raise RuntimeError("as_user outside the restorer's thread")
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

"""Pinned processes: a PID the master may act on later, proven to name the same process.

A number names a process only while that process lives: once it is reaped, the kernel may
give the number to any new process (PIDs wrap, and /proc/sys/kernel/ns_last_pid picks the
next one at will). So the master never acts on a number it learnt earlier. It takes a `Pin`
when it learns the number (a nodes/N/ctl handle's opener, at open; a child it forked) and
checks the pin before and after it acts:

    pin = Pin.take(tid, uid, gid)
                            ESRCH if the task is gone (EMFILE... if no pidfd can be had);
                            EPERM if its filesystem uid/gid are not `uid`/`gid` (what
                            FUSE said the request's were; optional)
    pin.check()             ESRCH: the pinned task has ended, so its number may now name
                            another process; EPERM: it is alive but no longer the principal
                            it was (it ran a set-user-ID, set-group-ID or file-capability
                            program, or changed its ids, groups or capabilities)
    pin.close()             at the handle's release; `check` is ESRCH from then on

What a pin holds: a pidfd (pidfd_open with PIDFD_THREAD, since FUSE names the calling
*thread*, and a thread's own pidfd tells when that thread ends; before Linux 6.9, a plain
pidfd, which only a thread-group leader can have), the task's start time
(field 22 of /proc/TID/stat) and its credentials as /proc/TID/status shows them (Uid and
Gid: real, effective, saved, filesystem; Groups; CapPrm, CapEff). While the pidfd says the
task is alive, its number names it and nothing else; a task that ended never comes back.
So every read of /proc (which goes by number) is bracketed: the pidfd is checked after the
read, and only then is the read known to be of the pinned task. An act by number (ptrace)
is bracketed the same way by its caller: check, act, check again, undo if the second check
fails (bpfs.migrate.tracer.Tracer.seize).

A pin costs the master one file descriptor while it lives: bpfs/fs/ops.py pins only
handles that can start a migration (nodes/N/ctl opened for writing) and bounds how many a
user may hold (MAX_PINS_PER_UID there). "Alive" means not yet exited: a zombie still holds
its number, but nothing may be done to it either.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
from dataclasses import dataclass

from bpfs import procstatus
from bpfs.errors import BpfsError

PIDFD_THREAD = os.O_EXCL        # linux/pidfd.h: a pidfd for one thread (Linux 6.9)
CRED_KEYS = ("Uid", "Gid", "Groups", "CapPrm", "CapEff")


@dataclass(frozen=True)
class Identity:
    """Who a task is, as /proc says: its start time and its credentials."""
    start: int                          # clock ticks after boot (stat field 22)
    creds: tuple[str, ...]              # the CRED_KEYS lines of status, as written

    @property
    def uids(self) -> tuple[int, ...]:
        """Real, effective, saved and filesystem uid."""
        return tuple(int(x) for x in self.creds[0].split())

    @property
    def gids(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.creds[1].split())

    @property
    def groups(self) -> frozenset[int]:
        return frozenset(int(x) for x in self.creds[2].split())


def parse_start(stat: bytes) -> int:
    """Field 22 (starttime) of a /proc/TID/stat text; ValueError if malformed.

    The command name (field 2) is in parentheses and may itself hold spaces and ")", so
    the fields are counted from the *last* ")" (as psutil and procps do)."""
    _, paren, after = stat.rpartition(b")")
    rest = after.split()
    if not paren or len(rest) < 20:
        raise ValueError("short stat line")
    return int(rest[19])


def parse_creds(status: bytes) -> tuple[str, ...]:
    """The CRED_KEYS lines of a /proc/TID/status text, whitespace normalized; ValueError if
    one is missing."""
    fields = procstatus.parse(status)
    missing = [k for k in CRED_KEYS if k not in fields]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in status")
    return tuple(" ".join(fields[k].split()) for k in CRED_KEYS)


def read_identity(tid: int) -> Identity:
    """The start time and credentials of task `tid` *by number*: whichever task holds it
    now (the caller brackets the read with a pidfd check). OSError/ValueError if none."""
    with open(f"/proc/{tid}/stat", "rb") as f:
        stat = f.read()
    with open(f"/proc/{tid}/status", "rb") as f:
        status = f.read()
    return Identity(parse_start(stat), parse_creds(status))


def _pidfd_open(tid: int) -> int:
    try:
        return os.pidfd_open(tid, PIDFD_THREAD)
    except OSError as exc:
        if exc.errno != errno.EINVAL:      # EINVAL: a kernel before 6.9 (no PIDFD_THREAD)
            raise
    return os.pidfd_open(tid)              # a thread-group leader only


class Pin:
    """One task held by a pidfd, with who it was when pinned (see the module doc).

    `check` may run in another thread than `close` (the tracer's): a lock keeps the pidfd
    from being closed, and its number reused by some other fd, while it is in use."""

    def __init__(self, tid: int, fd: int, identity: Identity) -> None:
        self.tid = tid
        self.identity = identity
        self._fd = fd
        self._lock = threading.Lock()

    @classmethod
    def take(cls, tid: int, uid: int | None = None, gid: int | None = None) -> "Pin":
        """Pin task `tid`, alive now; ESRCH if it is gone, the pidfd_open errno otherwise;
        EPERM if its filesystem uid or gid is not `uid` or `gid` (when given: what FUSE
        said the request's were)."""
        if tid <= 0:
            raise _gone(tid, "has no process id")
        try:
            fd = _pidfd_open(tid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise _gone(tid, "has ended") from None
            raise BpfsError(exc.errno or errno.EIO,
                            f"cannot pin process {tid}: {exc.strerror}") from None
        pin = cls(tid, fd, Identity(0, ()))
        try:
            pin.identity = ids = pin._read()
            if (uid is not None and ids.uids[3] != uid) or (gid is not None and
                                                             ids.gids[3] != gid):
                raise BpfsError(errno.EPERM, f"process {tid} changed its credentials while "
                                "opening this file")
        except BaseException:
            pin.close()
            raise
        return pin

    @property
    def groups(self) -> frozenset[int]:
        """Supplementary groups when pinned."""
        return self.identity.groups

    def alive(self) -> bool:
        """True while the pinned task has not ended (so its number names it)."""
        with self._lock:
            return self._alive()

    def _alive(self) -> bool:
        if self._fd < 0:
            return False
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        if p.poll(0):                   # readable: the task has exited (zombie or reaped)
            return False
        try:
            signal.pidfd_send_signal(self._fd, 0)
        except ProcessLookupError:
            return False
        return True

    def _read(self) -> Identity:
        """The task's identity, read by number and proven to be the pinned task's."""
        with self._lock:
            if not self._alive():
                raise _gone(self.tid, "has ended")
            try:
                identity = read_identity(self.tid)
            except (OSError, ValueError):
                identity = None
            if identity is None or not self._alive():
                raise _gone(self.tid, "has ended")
            return identity

    def check(self) -> None:
        """ESRCH unless the pinned task lives; EPERM unless it is still who it was."""
        now = self._read()
        if now.start != self.identity.start:        # cannot happen while the pidfd lives
            raise _gone(self.tid, "has ended")
        if now.creds != self.identity.creds:
            raise BpfsError(errno.EPERM, f"process {self.tid}, which opened this file, is no "
                            "longer the user it was when it opened it (its ids, groups or "
                            "capabilities changed: a set-user-ID program?)")

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Pin(tid={self.tid}, fd={self._fd}, start={self.identity.start})"


def _gone(tid: int, what: str) -> BpfsError:
    return BpfsError(errno.ESRCH, f"process {tid}, which opened this file, {what}; its "
                     "number may name another process now, so nothing is done to it")

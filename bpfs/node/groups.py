"""getppid, getpgid, getpgrp, getsid and setpgid on a node: a job's leader is the child of
its keeper, in the keeper's session and a group of its own (bpfs/migrate/restore.py),
numbers that are the node's alone; the master's (the ghost's parent, group and session,
sent with the restore) are answered instead. Mixed into bpfs.node.supervisor.Supervisor,
in trio's thread (docs/pidspace.md)."""

from __future__ import annotations

import errno
import os
from typing import Any, Callable

from bpfs.migrate import seccomp
from bpfs.migrate.seccomp import SYSCALLS as NR
from bpfs.node import procread
from bpfs.standin import WAIT_ARG


class GroupCalls:
    """getppid, getpgid, getpgrp, getsid and setpgid for the Supervisor."""

    jobs: dict[int, Any]             # by leader: bpfs.node.supervisor.Job
    _go: Callable[..., None]
    _stand_in_waits: Callable[..., None]

    def _on_getppid(self, job: Any, n: seccomp.Notif) -> None:
        tgid = procread.tgid(n.pid)
        lead = self.jobs.get(tgid) if tgid is not None else None
        if lead is not None and lead.ppid is not None and procread.ppid(tgid) == lead.keeper:
            seccomp.answer(job.listener, n.id, val=lead.ppid)
        else:
            self._go(job, n)

    def _on_getpgid(self, job: Any, n: seccomp.Notif) -> None:
        if n.nr == NR["getpgid"] and procread.pid_arg(n.args[0]) == WAIT_ARG:
            pid = procread.tgid(n.pid)
            if pid is not None:
                return self._stand_in_waits(job, n, pid)
        target = procread.pid_arg(n.args[0]) if n.nr == NR["getpgid"] else 0
        self._translate(job, n, os.getpgid, target, self._group_of)

    def _on_getsid(self, job: Any, n: seccomp.Notif) -> None:
        self._translate(job, n, os.getsid, procread.pid_arg(n.args[0]), self._session_of)

    def _translate(self, job: Any, n: seccomp.Notif, get: Callable[[int], int], target: int,
                   master: Callable[[int], int | None]) -> None:
        if target < 0:
            return self._go(job, n)
        try:
            local = get(target or n.pid)
        except OSError:
            return self._go(job, n)         # the kernel says ESRCH itself
        value = master(local)
        if value is None:
            self._go(job, n)
        else:
            seccomp.answer(job.listener, n.id, val=value)

    def _group_of(self, pgid: int) -> int | None:
        """The master's group for a job leader's own group on the node."""
        job = self.jobs.get(pgid)
        return job.pgid if job is not None and job.pgid is not None else None

    def _session_of(self, sid: int) -> int | None:
        """The master's session for a keeper's session on the node."""
        for job in self.jobs.values():
            if job.keeper == sid and job.sid is not None:
                return job.sid
        return None

    def _on_setpgid(self, job: Any, n: seccomp.Notif) -> None:
        """setpgid to the master's number of a job's group (what getpgid told): the job's
        group here, which the process may only already be in."""
        pgid = procread.pid_arg(n.args[1])
        other = next((j for j in self.jobs.values()
                      if pgid > 0 and j.pgid == pgid and j.leader != pgid), None)
        if other is None:
            self._go(job, n)
            return
        try:
            now_in = os.getpgid(procread.pid_arg(n.args[0]) or n.pid)
        except OSError:
            seccomp.answer(job.listener, n.id, err=errno.ESRCH)
            return
        seccomp.answer(job.listener, n.id, err=0 if now_in == other.leader else errno.EPERM)

"""execve on a node, mixed into bpfs.node.supervisor.Supervisor: let through at once from a
receiver thread (the new name is looked for later, bpfs/node/execnames.py), or, for a
process the master armed to launch elsewhere (bpfs/standin.py), asked of the master, which
runs it in the ghost and migrates it (docs/pidspace.md, "Launching from a node")."""

from __future__ import annotations

import errno
import os
from typing import Any, Callable

from bpfs.migrate import seccomp
from bpfs.node import procread
from bpfs.wire import messages


class ExecCalls:
    """execve and execveat for the Supervisor; what each process's ghost is called."""

    jobs: dict[int, Any]                # by leader: bpfs.node.supervisor.Job
    children: dict[int, Any]            # by pid: bpfs.node.supervisor.Child
    armed: set[int]
    names: Any                          # bpfs.node.execnames.ExecNames
    _execs: dict[int, tuple[Any, seccomp.Notif, int]]
    _ends: dict[int, int]
    _waiting: dict[int, tuple[Any, seccomp.Notif]]
    _seq: Any
    _tgid: Callable[[int], int | None]
    _go: Callable[..., None]
    _post: Callable[..., None]
    execd: Callable[..., None]
    adopt_here: Callable[[Any], None]
    settled_by: Callable[[Any], None]

    def _shown(self, pid: int) -> bytes | None:
        """(Any thread) The command line `pid`'s ghost shows, as far as this node knows:
        a child's is its parent's at the fork (the master names a spare after its parent
        too), a job leader's is read once. None: not ours.

        Why not read /proc/PID/cmdline at each execve: the read (open, read, close in
        Python: ~0.1 ms) was on the execve's path, and a shell's `/bin/true` waits for
        it (with vfork its parent too). What the ghost shows is also the right thing
        to compare the new command line with: a failed execve, or one of the same
        command line, needs no rename."""
        child = self.children.get(pid)
        if child is not None:
            return child.cmdline
        job = self.jobs.get(pid)
        if job is None:
            return None
        if job.cmdline is None:
            job.cmdline = procread.cmdline(pid) or None
        return job.cmdline

    def _exec_here(self, job: Any, n: seccomp.Notif) -> bool:
        """(A receiver thread) an execve here is let through at once; its new name is
        looked for by trio's thread (`names`). One to run elsewhere is trio's."""
        pid = self._tgid(n.pid)
        if pid is None or pid in self.armed:
            return False
        self.execd(pid, self._post)     # a new program: its spares go back
        before = self._shown(pid)
        if before is None:
            before = procread.cmdline(pid)
        child = self.children.get(pid)
        if child is not None:
            self.adopt_here(child)      # it waits here: it exists (if not taken yet)
        self._go(job, n)
        if child is not None:
            self.settled_by(child)
        if child is not None or pid in self.jobs:
            self.names.add_soon(job, pid, before, self._post)
        return True

    def _on_exec(self, job: Any, n: seccomp.Notif) -> None:
        pid = self._tgid(n.pid)
        if pid is not None and pid in self.armed:
            return self._exec_elsewhere(job, n, pid)
        before = self._shown(pid) if pid is not None else b""
        if before is None:
            before = procread.cmdline(pid) if pid is not None else b""
        self._go(job, n)
        if pid is not None and (pid in self.children or pid in self.jobs):
            self.names.add(job, pid, before)

    def _renamed(self, job: Any, pid: int, cmdline: bytes) -> None:
        """`pid` exec'd a program with this new command line (`names`): its ghost's."""
        child = self.children.get(pid)
        if child is not None:
            child.cmdline = cmdline
            mid = child.id
        else:
            mid = job.id
            if self.jobs.get(pid) is job:
                job.cmdline = cmdline
        job.session.report(messages.Execed(pid=pid, id=mid, cmdline=cmdline))

    def _exec_elsewhere(self, job: Any, n: seccomp.Notif, pid: int) -> None:
        """An armed process's execve: the master runs it in its ghost and migrates it; the
        answer (0, or the execve's errno) waits for the master's `execd`."""
        try:
            words = procread.exec_args(n)
            cwd = os.readlink(f"/proc/{pid}/cwd").encode()
        except OSError as exc:
            seccomp.answer(job.listener, n.id, err=exc.errno or errno.EFAULT)
            return
        if words is None:
            seccomp.answer(job.listener, n.id, err=errno.E2BIG)
            return
        path, argv, envp = words
        self.execd(pid)
        seq = next(self._seq)
        self._execs[seq] = (job, n, pid)
        job.session.report(messages.Exec(seq=seq, pid=pid, path=path, argv=argv, envp=envp,
                                         cwd=cwd))

    def _stand_in_waits(self, job: Any, n: seccomp.Notif, pid: int) -> None:
        """A stand-in asks how its program ended (bpfs/standin.py): now, or once known."""
        status = self._ends.pop(pid, None)
        if status is not None:
            seccomp.answer(job.listener, n.id, val=status)
        else:
            self._waiting[pid] = (job, n)

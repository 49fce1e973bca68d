"""A pidfd on a node of a process elsewhere: a small local proxy stands for it.

A pidfd is a local kernel object: pidfd_open(P) of a P that runs on another node or on the
master has nothing to point at here. So the supervisor (bpfs/node/supervisor.py) asks the
master whether P exists (`watch`: kill(P, 0) with the caller's uids; EPERM still means it
does, as for pidfd_open) and starts a proxy, a tiny process running as the caller's user:
every signal sent to it (pidfd_send_signal, kill) goes on to P through the master with the
caller's uids (`kill`, kill(2)'s checks there), and when the master says P has ended
(`ended`) the proxy is killed, so a poll of the pidfd sees P's end. The caller gets a pidfd
of the proxy (SECCOMP_IOCTL_NOTIF_ADDFD), as pidfd_open's result. A SIGKILL the caller
sends through it (the proxy cannot catch that) goes on to P too.

Limits: at most MAX_PROXIES at once on a node (EAGAIN beyond); waitid(P_PIDFD) is for
children only anyway; the proxy lives until P ends, however soon the caller closes its fd.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import trio

from bpfs.migrate import seccomp
from bpfs.node import procread
from bpfs.wire import messages

log = logging.getLogger("bpslave")

MAX_PROXIES = 256
PROXY = (
    "import os, signal\n"
    "sigs = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, sigs)\n"
    "os.write(1, b'ready\\n')\n"
    "while True:\n"
    "    os.write(1, b'%d\\n' % signal.sigwaitinfo(sigs).si_signo)\n")

Forward = Callable[[int, int, int, int], None]      # (pid, sig, ruid, euid)


@dataclass(eq=False)
class Proxy:
    target: int
    uid: int
    process: subprocess.Popen
    forward: Forward                # through the session that asked for it
    ended: bool = False


class Proxies:
    def __init__(self) -> None:
        self.by_target: dict[int, list[Proxy]] = {}
        self.count = 0

    def start(self, target: int, uid: int, gid: int, forward: Forward,
              nursery: trio.Nursery) -> int:
        """A proxy for `target` as `uid`: its PID once it is ready (OSError otherwise:
        EAGAIN past MAX_PROXIES)."""
        if self.count >= MAX_PROXIES:
            raise OSError(11, "too many pidfds of processes elsewhere on this node")
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", PROXY], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             user=uid, group=gid, extra_groups=[], close_fds=True,
                             start_new_session=True)
        assert p.stdout is not None
        if p.stdout.readline() != b"ready\n":        # its signals are blocked from now on
            p.kill()
            raise OSError(11, "the pidfd proxy did not start")
        proxy = Proxy(target, uid, p, forward)
        self.by_target.setdefault(target, []).append(proxy)
        self.count += 1
        nursery.start_soon(self._pass_on, proxy)
        return p.pid

    async def _pass_on(self, proxy: Proxy) -> None:
        """The signals the proxy takes go to its target; its death by SIGKILL too."""
        stream = proxy.process.stdout
        assert stream is not None
        fd = stream.fileno()
        buf = b""
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.isdigit():
                        proxy.forward(proxy.target, int(line), proxy.uid, proxy.uid)
        finally:
            trio.lowlevel.notify_closing(fd)
            stream.close()
            self.count -= 1
            mine = self.by_target.get(proxy.target, [])
            if proxy in mine:
                mine.remove(proxy)
            if not mine:
                self.by_target.pop(proxy.target, None)
        if not proxy.ended:                 # killed by the caller: SIGKILL goes on
            proxy.forward(proxy.target, signal.SIGKILL, proxy.uid, proxy.uid)

    def ended(self, target: int) -> None:
        """`target` has ended: its proxies end (their pidfds read as ended)."""
        for proxy in self.by_target.get(target, []):
            proxy.ended = True
            try:
                proxy.process.kill()
            except OSError:
                pass


class PidfdCalls:
    """pidfd_open of a process elsewhere, for bpfs.node.supervisor.Supervisor."""

    _seq: Any
    _watches: dict[int, Any]
    _nursery: trio.Nursery | None
    proxies: Proxies
    _go: Callable[..., None]

    def _on_pidfd_open(self, job: Any, n: seccomp.Notif) -> None:
        pid, flags = procread.pid_arg(n.args[0]), int(n.args[1]) & 0xFFFFFFFF
        if pid <= 0 or procread.here(pid):
            self._go(job, n)
            return
        ids = procread.ids(n.pid)
        if ids is None:
            return                  # the caller is gone
        seq = next(self._seq)
        self._watches[seq] = (job, n, pid, ids, flags)
        job.session.report(messages.Watch(seq=seq, pid=pid, ruid=ids[0], euid=ids[1]))

    def _watched(self, job: Any, n: seccomp.Notif, pid: int, ids: tuple[int, int, int],
                 flags: int, err: int | None) -> None:
        """The master's answer to `watch`: no such process (ESRCH), or a proxy's pidfd."""
        if err not in (None, errno.EPERM):
            seccomp.answer(job.listener, n.id, err=err)
            return
        assert self._nursery is not None
        session = job.session

        def forward(target: int, sig: int, ruid: int, euid: int) -> None:
            session.report(messages.Kill(seq=next(self._seq), pid=target, sig=sig,
                                         ruid=ruid, euid=euid))
        try:
            proxy = self.proxies.start(pid, ids[0], ids[2], forward, self._nursery)
            pidfd = os.pidfd_open(proxy, flags & os.O_NONBLOCK)
        except OSError as exc:
            seccomp.answer(job.listener, n.id, err=exc.errno or errno.EAGAIN)
            return
        try:
            seccomp.answer_with_fd(job.listener, n.id, pidfd, cloexec=True)
        finally:
            os.close(pidfd)


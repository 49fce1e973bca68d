"""The relay fork-server: one small process per master that forks stdio relays on request.

    python -m bpfs.cli.bpsh.relayfork --fd N      (the master starts it: bpfs/master/relayfork.py)

A plain master process that moves to a node needs a relay (bpfs.cli.bpsh.relay). Started
as a new interpreter that costs 35-45 ms, paid by every such move; this server has the
relay imported already and forks one in about a millisecond. The master asks it over the
AF_UNIX SOCK_SEQPACKET socket N (one end of a socketpair it made: nobody else can ask):

    request   JSON {"pid": P, "uid": U, "gid": G, "groups": [..], "host": H}, with 5 fds
              (SCM_RIGHTS): P's fds 0, 1, 2, the write end of the ready pipe, the read end
              of the token pipe
    reply     JSON {"relay": R} with 1 fd, a pidfd of relay R (a child of this server),
              or JSON {"errno": E, "message": M} and no fd

The child runs as the spawned relay does: it leaves this server's session (setsid), names
itself `bprelay P` (/proc/R/comm), takes the user's groups, gid and uid (real, effective and
saved, checked) before it touches P's fds, makes them its fds 0-2, reads the token from its
pipe and serves (`relay.run_forked`: the port on the ready pipe, then P's links until P has
ended). This server never reads the token nor uses P's fds: it hands them to the child and
closes its copies at once. Unlike a spawned relay, a forked one is not dumpable (the kernel's
rule after a uid change without an exec): its user cannot ptrace it, nor read its fds in
/proc; it needs neither, and the memory it shares with this root process stays unread.

The server reaps its relays (their pidfds, in its one poll loop: no signal handler). At EOF
on N (the master stopped, or died) it gives the relays left GRACE seconds to end (each ends
once its process has ended and the output is through), kills the others, and exits 0. A bad
request is answered with EINVAL and its fds closed; the loop goes on.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from typing import NoReturn, Sequence

from bpfs.cli.bpsh import relay

GRACE = 2.0                         # seconds the relays get to end after the master's EOF
MAX_REQUEST = 4096
REQUEST_FDS = 5


def _become(uid: int, gid: int, groups: list[int]) -> None:
    """Drop to the user: the process's supplementary groups (as they are: its primary
    group among them or not), then gid, then uid; OSError (EPERM) if the ids are not all
    what was asked. Root keeps its own supplementary groups, as a relay spawned with
    `user=0` does."""
    if uid != 0:
        os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3:
        raise OSError(errno.EPERM, "the relay's ids are not its user's")


def _child(req: dict, fds: list[int], sock: socket.socket) -> NoReturn:
    """The relay, in the forked child: never returns (os._exit)."""
    status = 1
    try:
        sock.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)          # dies of them, as a spawned one
        # SIGPIPE stays ignored, as in any Python program: a closed pipe is EPIPE
        os.setsid()
        relay.name_self(req["pid"])                 # while root: /proc/self/comm is
        _become(req["uid"], req["gid"], req["groups"])  # root's once it is not dumpable
        for n in range(3):
            os.dup2(fds[n], n)
            os.close(fds[n])
        status = relay.run_forked(req["pid"], fds[4], req["host"], fds[3])
    except BaseException as exc:                    # never back into the server's loop
        try:
            os.write(2, f"{relay.PROG}: cannot start: {exc}\n".encode(errors="replace"))
        except OSError:
            pass
    finally:
        os._exit(status)


def _check(req: object, fds: list[int]) -> dict:
    """The request, checked: ValueError if it is not one."""
    if len(fds) != REQUEST_FDS or not isinstance(req, dict):
        raise ValueError(f"a request is a JSON object and {REQUEST_FDS} fds")
    ints = [req.get(k) for k in ("pid", "uid", "gid")] + list(req.get("groups") or [])
    if not all(isinstance(i, int) and i >= 0 for i in ints) or req["pid"] <= 0 \
            or not isinstance(req.get("host"), str):
        raise ValueError("pid, uid, gid, groups: numbers; host: a string")
    return req


class Server:
    """One server loop over the master's socket; its children by pidfd."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: dict[int, int] = {}          # pidfd -> pid

    def serve(self) -> None:
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        while True:
            for fd, _ in poll.poll():
                if fd != self.sock.fileno():
                    poll.unregister(fd)
                    self._reap(fd)
                elif not self._one_request(poll):
                    return

    def _one_request(self, poll: select.poll) -> bool:
        """Answer one request; False at EOF."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_REQUEST, REQUEST_FDS + 1)
        except InterruptedError:
            return True
        if not data and not fds:
            return False
        try:
            req = _check(json.loads(data), fds)
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            self._reply({"errno": errno.EINVAL, "message": str(exc)})
            return True
        try:
            pid, pidfd = self._fork(req, fds)
        except OSError as exc:
            self._reply({"errno": exc.errno or errno.EIO, "message": str(exc)})
            return True
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pidfd] = pid
        poll.register(pidfd, select.POLLIN)
        theirs = os.dup(pidfd)
        try:
            self._reply({"relay": pid}, [theirs])
        finally:
            os.close(theirs)
        return True

    def _fork(self, req: dict, fds: list[int]) -> tuple[int, int]:
        pid = os.fork()
        if pid == 0:
            _child(req, fds, self.sock)
        return pid, os.pidfd_open(pid)          # not reaped before this: only _reap does

    def _reply(self, msg: dict, fds: Sequence[int] = ()) -> None:
        try:
            socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))
        except OSError:
            pass                                # the master is gone: EOF comes next

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd, 0)
        os.close(pidfd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def finish(self, grace: float = GRACE) -> None:
        """The master is gone: the relays get `grace` seconds, then SIGKILL; all reaped."""
        deadline = time.monotonic() + grace
        poll = select.poll()
        for pidfd in self.children:
            poll.register(pidfd, select.POLLIN)
        while self.children and time.monotonic() < deadline:
            for fd, _ in poll.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                poll.unregister(fd)
                self._reap(fd)
        for pidfd in list(self.children):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            self._reap(pidfd)


SERVER_NAME = "bpfs-relayfork"     # /proc/PID/comm of the server (15 bytes at most)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpfs.cli.bpsh.relayfork",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--fd", type=int, required=True, help="the master's SOCK_SEQPACKET socket")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:                            # what `ps` shows beside the master's doorbell
        with open("/proc/self/comm", "w") as f:
            f.write(SERVER_NAME)
    except OSError:
        pass
    sock = socket.socket(fileno=args.fd)
    os.set_inheritable(args.fd, False)
    server = Server(sock)
    try:
        server.serve()
    finally:
        server.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())

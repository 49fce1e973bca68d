"""The master's relay fork-server: relays started in a millisecond, not an interpreter's start.

    forks = RelayForks(env)
    await nursery.start(forks.run)      starts the server (python -m bpfs.cli.bpsh.relayfork),
                                        starts it again if it ends; at cancel: stops it
    handle = await forks.fork(pid, uid, gid, groups, host, fds)
                                        a ForkedRelay, or None: no server now (the caller
                                        spawns the relay itself, bpfs/master/relay.py)

`fds` are P's fds 0-2, the ready pipe's write end and the token pipe's read end, sent by
SCM_RIGHTS; the protocol and what the child does (it becomes P's user before it touches
them) are in bpfs/cli/bpsh/relayfork.py. The server runs as the master (root) but holds a
user's fds only between receiving them and its fork; it never reads the token.

A server that died (killed, crashed) costs nothing but time: `fork` returns None (and the
relay is spawned the old way), `run` starts another one, after RESTART_MIN s and longer if it
keeps dying at once. When the master stops, `run` closes its socket: the server gives its
relays a grace to end, kills those left and exits; `run` waits for that (STOP_TIMEOUT), then
kills the server, so `bpfs down` leaves neither behind. Relays the master spawned itself
(`adopt`) get the same grace, then SIGKILL.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Callable, Protocol

import trio

log = logging.getLogger("bpfs.master.procs")

REPLY_TIMEOUT = 2.0             # a request's answer (a fork): else the server is killed
STOP_TIMEOUT = 4.0              # the server's own grace for its relays is 2 s
RESTART_MIN, RESTART_MAX = 0.05, 5.0
GRACE = 2.0                     # spawned relays' time to end when the master stops


class RelayProcess(Protocol):
    """A running relay, wherever it was started."""
    pid: int

    def kill(self) -> None: ...

    async def wait(self) -> None: ...


class ForkedRelay:
    """A relay forked by the server (its child, which reaps it): known by a pidfd."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid, self._pidfd = pid, pidfd

    def kill(self) -> None:
        if self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def wait(self) -> None:
        """Until it has ended; then the pidfd is closed."""
        if self._pidfd >= 0:
            await trio.lowlevel.wait_readable(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


class RelayForks:
    """One master's relay fork-server (module docstring)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env
        self._sock: trio.socket.SocketType | None = None
        self._server: trio.Process | None = None
        self._lock = trio.Lock()
        self._spawned: set[RelayProcess] = set()
        self.starts = 0                 # servers started (the tests see a restart)

    @property
    def server_pid(self) -> int | None:
        return self._server.pid if self._server is not None else None

    # ---- lifetime ---------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        delay = RESTART_MIN
        try:
            while True:
                began = trio.current_time()
                try:
                    await self._start()
                except OSError as exc:
                    log.warning("cannot start the relay fork-server: %s", exc)
                if task_status is not trio.TASK_STATUS_IGNORED:
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                if self._server is not None:
                    await self._server.wait()
                    log.warning("the relay fork-server (pid %d) ended (%s): starting another",
                                self._server.pid, self._server.returncode)
                self._drop()
                delay = RESTART_MIN if trio.current_time() - began > 10 else \
                    min(delay * 2, RESTART_MAX)
                await trio.sleep(delay)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop()

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._server = await trio.lowlevel.open_process(
                [sys.executable, "-m", "bpfs.cli.bpsh.relayfork", "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=self.env, cwd="/",
                start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        self.starts += 1
        log.debug("relay fork-server started: pid %d", self._server.pid)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._server = None, None

    async def _stop(self) -> None:
        server = self._server
        self._drop()                        # EOF: the server's relays get their grace
        with trio.move_on_after(GRACE):
            async with trio.open_nursery() as nursery:
                for relay in list(self._spawned):
                    nursery.start_soon(relay.wait)
        for relay in list(self._spawned):
            relay.kill()
        if server is not None:
            with trio.move_on_after(STOP_TIMEOUT):
                await server.wait()
            if server.returncode is None:
                server.kill()
                await server.wait()

    # ---- requests ---------------------------------------------------------------------

    async def fork(self, pid: int, uid: int, gid: int, groups: list[int], host: str,
                   fds: list[int], on_asked: Callable[[], None] = lambda: None
                   ) -> ForkedRelay | None:
        """A relay forked for `pid` (`fds`: module docstring; the caller still closes its
        own). None if there is no server, or it failed to answer: it is killed (`run`
        starts another), and the caller spawns the relay. OSError with the server's errno
        if it answered that it could not fork. `on_asked()` runs once the request is
        sent: work for this thread while the server forks (a move queues its dump)."""
        async with self._lock:
            sock, server = self._sock, self._server
            if sock is None or server is None or server.returncode is not None:
                return None
            req = json.dumps({"pid": pid, "uid": uid, "gid": gid, "groups": groups,
                              "host": host}).encode()
            try:
                with trio.fail_after(REPLY_TIMEOUT):
                    await sock.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                _fd_array(fds))])
                    on_asked()
                    data, anc, _, _ = await sock.recvmsg(4096, socket.CMSG_SPACE(4))
            except (OSError, trio.TooSlowError) as exc:
                log.warning("the relay fork-server (pid %d) did not answer (%s): killing "
                            "it; this relay is spawned", server.pid, type(exc).__name__)
                server.kill()
                return None
        got = _fds_of(anc)
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            reply = {}
        for fd in got:
            os.set_inheritable(fd, False)
        if "relay" in reply and len(got) == 1:
            return ForkedRelay(int(reply["relay"]), got[0])
        for fd in got:
            os.close(fd)
        if not data:
            server.kill()
            return None
        raise OSError(int(reply.get("errno") or errno.EIO),
                      str(reply.get("message") or "the relay fork-server refused"))

    def adopt(self, relay: RelayProcess) -> None:
        """A relay spawned by the master: stopped with the master (module docstring)."""
        self._spawned.add(relay)

    def forget(self, relay: RelayProcess) -> None:
        self._spawned.discard(relay)


def _fd_array(fds: list[int]) -> bytes:
    import array
    return array.array("i", fds).tobytes()


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    import array
    out: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            out.extend(a)
    return out

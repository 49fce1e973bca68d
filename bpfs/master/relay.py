"""A stdio relay for a master process that moves to a node (bpfs/master/moves.py).

A process bpsh started has its stdio links to bpsh; one that ran on the master by itself
has none. Before it moves, the master starts a relay for it: bpsh's link server for an
already-running process (bpfs.cli.bpsh.relay), as the process's user, whose fds 0-2 are
copies of the process's own (taken while it is stopped). The node connects the process's
links to it; the relay writes what comes to the files the process had and feeds it what
they give; it ends once the process has ended and its links are drained.

    relay = await start(pid, uid, gid, groups, host, forks)   BpfsError if it cannot start
    relay.port, relay.token                            for the restore's links
    relay.kill()                                       the move failed
    await reap(relay)                                  its end

It is forked by the master's relay fork-server (`forks`, bpfs/master/relayfork.py: about
a millisecond), or, with no server at hand, spawned as `python -m bpfs.cli.bpsh.relay`
(35-45 ms: an interpreter's start). Either way it runs as the process's user, in a
session of its own, and tells its port on a pipe.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass
from typing import Callable

import trio

from bpfs.errors import BpfsError
from bpfs.master.relayfork import RelayForks, RelayProcess
from bpfs.migrate import ptrace as pt
from bpfs.wire import relaystart

log = logging.getLogger("bpfs.master.procs")

READY_TIMEOUT = 10.0


@dataclass(eq=False)
class Relay:
    pid: int
    port: int
    token: str
    process: RelayProcess
    forks: RelayForks | None = None

    def kill(self) -> None:
        self.process.kill()


class _Spawned:
    """A relay the master spawned (its child: trio reaps it)."""

    def __init__(self, process: trio.Process) -> None:
        self.process, self.pid = process, process.pid

    def kill(self) -> None:
        try:
            self.process.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def wait(self) -> None:
        await self.process.wait()


def _stdio_of(pid: int) -> list[int]:
    """Copies of `pid`'s fds 0-2 (it is stopped under our ptrace); /dev/null for one that
    is closed: nothing to relay there."""
    return [os.open(os.devnull, os.O_RDWR) if fd is None else fd
            for fd in pt.copy_fds(pid, range(3))]


async def start(pid: int, uid: int, gid: int, groups: list[int], host: str,
                forks: RelayForks | None = None, on_asked: Callable[[], None] | None = None
                ) -> Relay:
    """Start the relay for stopped `pid`; returns once it listens. `on_asked()` runs once
    (unless an error comes first) as soon as the relay is on its way: the rest of the
    wait is for other processes (a move queues its dump then: the tracer's thread does
    not fight this one for the interpreter while the relay starts)."""
    asked = on_asked or (lambda: None)
    token = os.urandom(16).hex()
    try:
        fds = _stdio_of(pid)
    except (OSError, BpfsError) as exc:
        raise BpfsError(exc.errno or errno.EIO, f"cannot take the stdio of process {pid}: "
                        f"{os.strerror(exc.errno or errno.EIO)}") from None
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    token_r, token_w = os.pipe2(os.O_CLOEXEC)
    os.write(token_w, token.encode())           # 32 bytes: the pipe holds them
    os.close(token_w)
    try:
        proc: RelayProcess | None = None
        called: list[bool] = []

        def once() -> None:
            if not called:
                called.append(True)
                asked()
        if forks is not None:
            proc = await forks.fork(pid, uid, gid, groups, host, [*fds, ready_w, token_r],
                                    once)
        if proc is None:
            proc = _Spawned(await _spawn(pid, uid, gid, groups, host, fds, ready_w, token_r))
            if forks is not None:
                forks.adopt(proc)
        once()
    except OSError as exc:
        os.close(ready_r)
        raise BpfsError(exc.errno or errno.EIO, f"cannot start the stdio relay: "
                        f"{exc.strerror}") from None
    finally:
        for fd in (*fds, ready_w, token_r):
            os.close(fd)
    relay = Relay(pid, 0, token, proc, forks)
    try:
        with trio.fail_after(READY_TIMEOUT):
            async with trio.lowlevel.FdStream(ready_r) as stream:
                line = b""
                while not line.endswith(b"\n") and len(line) < relaystart.READY_MAX:
                    got = await stream.receive_some(relaystart.READY_MAX)
                    if not got:
                        break
                    line += got
        relay.port = relaystart.port_of(line)
    except (trio.TooSlowError, ValueError, OSError) as exc:
        relay.kill()
        raise BpfsError(errno.EIO, f"the stdio relay for process {pid} did not start "
                        f"({type(exc).__name__})") from None
    log.debug("relay %d for pid %d listens on %s:%d (%s)", proc.pid, pid, host, relay.port,
              type(proc).__name__)
    return relay


async def _spawn(pid: int, uid: int, gid: int, groups: list[int], host: str,
                 fds: list[int], ready_w: int, token_r: int) -> trio.Process:
    """`python -m bpfs.cli.bpsh.relay` as the user, P's fds its 0-2; OSError if it cannot."""
    return await trio.lowlevel.open_process(
        relaystart.argv(pid, token_r, host, ready_w), stdin=fds[0], stdout=fds[1], stderr=fds[2], pass_fds=(ready_w, token_r),
        env=relaystart.environment(), cwd="/", start_new_session=True, user=uid, group=gid,
        extra_groups=list(groups) if uid != 0 else None)


async def reap(relay: Relay) -> None:
    """Wait for the relay's end (it ends after its process): no zombie is left."""
    with trio.CancelScope(shield=True):
        await relay.process.wait()
    if relay.forks is not None:
        relay.forks.forget(relay.process)

"""Starting the relay for a process of the master's that moves (docs/bpsh.md, "The relay").

    relay = await start_relay(pid, stdio, fds, host, uid, gid, groups)
    relay.port, relay.token     what the restore's links connect to (LinkTarget)
    await relay.stop()          the move failed before any link: end it (SIGTERM), reap it
    status = await relay.wait() it ends by itself once P has ended and its output is through

A process that started on the master outside bpsh has no stdio server; when it moves, the
master starts `python -m bpfs.cli.bpsh.relay` for it as the process's user, in a new
session (no controlling terminal), fds 0-2 being `stdio` (the process's own, e.g. from
pidfd_getfd: the same open files), the token on a pipe (not in its command line, which
every user may read). The relay writes its port once it listens.

The relay is a child of the master: the tracer sees it as a stranger and leaves it; its
end is `wait()`'s (trio reaps it), which someone must await (or `stop()`).
Errors: BpfsError, the spawn's errno, or EIO if the relay ended or said nothing within
`timeout` (it is killed and reaped then).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import trio

import bpfs

from bpfs.errors import BpfsError

START_TIMEOUT = 10.0


@dataclass(eq=False)
class Relay:
    """One running relay: its process, and where its links go."""
    pid: int                    # the process it relays for
    port: int
    token: str
    process: trio.Process

    async def wait(self) -> int:
        """The relay's exit status (0: P ended and its output went through)."""
        return await self.process.wait()

    async def stop(self) -> None:
        """End it now (a move that failed before any link) and reap it."""
        if self.process.returncode is None:
            try:
                self.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        with trio.CancelScope(shield=True):
            await self.process.wait()


async def start_relay(pid: int, stdio: Sequence[int], fds: Iterable[int], host: str,
                      uid: int, gid: int, groups: Sequence[int], *,
                      timeout: float = START_TIMEOUT) -> Relay:
    """Start the relay for `pid` (see the module docstring); returns once it listens."""
    token = os.urandom(16).hex()
    token_r, token_w = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    os.write(token_w, token.encode())
    os.close(token_w)
    argv = [sys.executable, "-m", "bpfs.cli.bpsh.relay", "--pid", str(pid), "--token-fd",
            str(token_r), "--host", host, "--ready-fd", str(ready_w),
            "--fds", ",".join(str(fd) for fd in sorted(set(fds)))]
    try:
        process = await trio.lowlevel.open_process(
            argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2],
            pass_fds=(token_r, ready_w), start_new_session=True, cwd="/",
            env=_env(), user=uid, group=gid, extra_groups=list(groups))
    except OSError as exc:
        os.close(ready_r)
        raise BpfsError(exc.errno or errno.EIO, f"relay for pid {pid}: {exc.strerror}") from None
    finally:
        os.close(token_r)
        os.close(ready_w)
    relay = Relay(pid, 0, token, process)
    try:
        relay.port = await _port(ready_r, timeout)
    except BaseException:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    return relay


async def _port(ready_r: int, timeout: float) -> int:
    """The port the relay writes on its ready pipe; EIO if it ends or is silent."""
    stream = trio.lowlevel.FdStream(ready_r)
    got = b""
    async with stream:
        with trio.move_on_after(timeout):
            while len(got) < 16 and (chunk := await stream.receive_some(16)):
                got += chunk
    text = got.decode("ascii", "replace").strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BpfsError(errno.EIO, "the relay did not start (see the process's stderr)")
    return int(text)


def _env() -> dict[str, str]:
    """What the relay needs of ours: where this bpfs is (a checkout too) and PATH; nothing
    else of the master's environment."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(bpfs.__file__)))
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": root,
            "LANG": "C.UTF-8"}

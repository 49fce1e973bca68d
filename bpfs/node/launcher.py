"""The node launcher: give the daemon its own PID and mount (and UTS) namespaces.

A new PID namespace only takes effect for children, so the launcher
`unshare(CLONE_NEWPID)`s and forks: the child is PID 1 of the new namespace and
becomes the daemon proper. The child makes its own mount namespace, keeps it
private (nothing it mounts leaks out, nothing mounted later on the host leaks
in), mounts a /proc of its own PID namespace, and applies the simulation
options of `NamespaceSpec` (hostname, scratch tmpfs, hidden directories, lazily
detached copies of FUSE mounts it must never block on).

The launcher stays behind as a small supervisor: it forwards SIGTERM, SIGINT,
SIGHUP and SIGQUIT to the daemon and exits with the daemon's status (128+N for
death by signal N). The daemon gets PR_SET_PDEATHSIG(SIGKILL), so killing the
launcher outright takes the daemon, and with it, as PID 1, every process of its
namespace. Nothing here imports trio: the daemon proper imports it after the
fork, so the launcher's memory stays that of a bare interpreter.

Errors: `launch` raises OSError (EPERM when not root) before forking; a failure
while setting up the child's mounts is logged and the child exits 1.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable

from bpfs.node import nsutil

log = logging.getLogger("bpslave")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@dataclass
class NamespaceSpec:
    """What the node's namespaces look like; the empty spec is a real node's."""
    hostname: str | None = None                        # new UTS namespace with this name
    scratch: list[str] = field(default_factory=list)   # private tmpfs on each
    hide: list[str] = field(default_factory=list)      # empty read-only tmpfs over each
    unmount: list[str] = field(default_factory=list)   # lazily detached in the node (FUSE)


def launch(spec: NamespaceSpec, run: Callable[[], int]) -> int:
    """Run `run()` as PID 1 of new namespaces; return its exit status."""
    nsutil.unshare(nsutil.CLONE_NEWPID)
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        _child(spec, run, alive_r)
    os.close(alive_r)
    try:
        return supervise(pid)
    finally:
        os.close(alive_w)


def supervise(pid: int) -> int:
    """Forward termination signals to `pid` and wait for it (the launcher's whole job).

    Through a pidfd taken while `pid` is our unreaped child: the handlers stay until the
    launcher exits, and a signal that comes after the daemon was reaped must not reach
    whatever process has its number by then."""
    pidfd = os.pidfd_open(pid)

    def forward(signum: int, _frame: object) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _child(spec: NamespaceSpec, run: Callable[[], int], alive_r: int) -> None:
    code = 1
    try:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        nsutil.set_pdeathsig(signal.SIGKILL)
        _exit_if_orphaned(alive_r)
        setup_namespaces(spec)
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # the child must never return into the launcher's code
        if isinstance(exc, OSError):
            log.error("cannot set up the node's namespaces: %s", exc)
        else:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_if_orphaned(alive_r: int) -> None:
    """The launcher may have died before PDEATHSIG was armed: then its pipe end is closed."""
    os.set_blocking(alive_r, False)
    try:
        if os.read(alive_r, 1) == b"":
            os._exit(1)
    except BlockingIOError:
        pass
    finally:
        os.close(alive_r)


def setup_namespaces(spec: NamespaceSpec) -> None:
    """In the new PID namespace's first process: private mounts, own /proc, the spec's extras."""
    flags = nsutil.CLONE_NEWNS | (nsutil.CLONE_NEWUTS if spec.hostname else 0)
    nsutil.unshare(flags)
    nsutil.mount(None, "/", None, nsutil.MS_REC | nsutil.MS_PRIVATE)
    for path in spec.unmount:
        _detach(path)
    if spec.hostname:
        nsutil.sethostname(spec.hostname)
    nsutil.mount("proc", "/proc", "proc", nsutil.MS_NOSUID | nsutil.MS_NODEV | nsutil.MS_NOEXEC)
    for path in spec.scratch:
        nsutil.mount("scratch", path, "tmpfs", nsutil.MS_NOSUID | nsutil.MS_NODEV, "mode=1777")
    for path in spec.hide:
        nsutil.mount("hidden", path, "tmpfs",
                     nsutil.MS_RDONLY | nsutil.MS_NOSUID | nsutil.MS_NODEV, "mode=755,size=4k")


def _detach(path: str) -> None:
    """Lazily unmount `path` (and what is mounted under it); absent is fine.

    umount2 resolves the path without asking the filesystem behind it, so a
    hung FUSE daemon cannot block us here (a stat() could).
    """
    for _ in range(16):  # mounts may be stacked on the path
        try:
            nsutil.umount2(path, nsutil.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise

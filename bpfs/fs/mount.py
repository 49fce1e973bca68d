"""Mounting and serving the /bproc tree (pyfuse3 keeps one session per process).

Options: `allow_other` (users read /bproc; the master is root), no
`default_permissions` (see ops.py), fsname/subtype `bpfs` (so /proc/mounts
says `bpfs ... fuse.bpfs`). Blocked `events` readers each hold a pyfuse3
worker task, so the worker limit is high; they cost a trio task each.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess

import pyfuse3

from bpfs.errors import BpfsError
from bpfs.fs.unstick import Tick

log = logging.getLogger("bpfs.fs")

MOUNT_OPTIONS = frozenset({"fsname=bpfs", "subtype=bpfs", "allow_other"})
MIN_TASKS = 2
MAX_TASKS = 4096


def mount(ops: pyfuse3.Operations, mountpoint: str) -> None:
    """Mount `ops` (the master's BpfsOperations, a node's RemoteOperations) at
    `mountpoint` (created if missing). EBUSY if something is mounted there.

    A dead FUSE mount left by a crashed master (ENOTCONN) is lazily unmounted first.
    """
    _clear_stale(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    if os.path.ismount(mountpoint):
        raise BpfsError(errno.EBUSY, f"{mountpoint} is already a mount point (is a master running?)")
    try:
        pyfuse3.init(ops, mountpoint, set(MOUNT_OPTIONS))
    except RuntimeError as exc:
        raise BpfsError(errno.EIO, f"cannot mount {mountpoint}: {exc}") from None


def _clear_stale(mountpoint: str) -> None:
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
        log.warning("%s is a dead FUSE mount; unmounting it", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def serve() -> None:
    """Answer FUSE requests until unmounted or cancelled (with the tick that ends a read
    of an empty /dev/fuse: bpfs/fs/unstick.py)."""
    tick = Tick.start()
    try:
        await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
    finally:
        if tick is not None:
            tick.stop()


def unmount() -> None:
    """Unmount (lazily: blocked readers get ENOTCONN) and free the session."""
    try:
        pyfuse3.close(unmount=True)
    except Exception:   # a second close, or a session that never mounted
        log.exception("unmounting failed")

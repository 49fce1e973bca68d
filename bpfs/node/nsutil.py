"""Thin ctypes binding for the namespace and mount syscalls Python 3.11 lacks.

Constants come from <sched.h>, <sys/mount.h> and <sys/prctl.h>. Every wrapper
raises OSError with the errno and a message naming the call and its target, so
callers can tell EPERM (not root) from EINVAL (not a mount point) and report it.
This module imports nothing heavy: the node launcher runs it before the daemon
proper imports trio.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: Optional[str], target: str, fstype: Optional[str] = None,
          flags: int = 0, data: Optional[str] = None) -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount {fstype or ''} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname {name}")


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send `sig` to us when our parent dies."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl(PDEATHSIG)")


def set_comm(name: str) -> None:
    """Set the name `ps -o comm`, `top` and pgrep show (15 bytes at most)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)

"""The migration engine's error: a `BpfsError` that also names the process it concerns.

Every failure below `bpfs.migrate` (a ptrace request, a /proc read, a corrupt image, a refused
executable) is raised as `MigrateError`, so callers catch `BpfsError` and get an errno and a
message a user can read; `pid` is kept as a structured field (psutil's style) for logs.
"""

from __future__ import annotations

import errno as _errno
import os

from bpfs.errors import BpfsError


class MigrateError(BpfsError):
    """A migration step failed with `errno`; `pid` is the process concerned (or None)."""

    def __init__(self, errno: int, message: str = "", pid: int | None = None) -> None:
        super().__init__(errno, message)
        self.pid = pid

    def __reduce__(self):  # keep errno, message and pid across pickling
        return (type(self), (self.errno, self.message, self.pid))


def from_oserror(exc: OSError, what: str, pid: int | None = None) -> MigrateError:
    """Turn an OSError met at the OS boundary into a MigrateError saying what was being done."""
    code = exc.errno or _errno.EIO
    return MigrateError(code, f"{what}: {os.strerror(code)}", pid)


def corrupt(message: str) -> MigrateError:
    """An image that fails a check on load: EINVAL, never a half-restored process."""
    return MigrateError(_errno.EINVAL, f"corrupt image: {message}")

"""One error type for all of bpfs: an errno and a message a user can read.

Every layer raises `BpfsError`; exactly one place maps it to `pyfuse3.FUSEError`
(bpfs/fs) and one place to CLI messages and exit codes (bpfs/cli/common.py).
It survives msgpack (`to_wire`/`from_wire`) so a node's refusal reaches the user
with its errno intact.
"""

from __future__ import annotations

import errno as _errno
import os


class BpfsError(Exception):
    """An operation failed with `errno`; `message` says why in words."""

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message or os.strerror(errno)
        super().__init__(errno, self.message)

    def __str__(self) -> str:
        return self.message

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)

    def to_wire(self) -> dict:
        return {"errno": self.errno, "message": self.message}

    @classmethod
    def from_wire(cls, d: dict) -> "BpfsError":
        return cls(int(d.get("errno", _errno.EIO)), str(d.get("message", "")))


class ProtocolError(BpfsError):
    """A peer broke the master <-> node protocol (bpfs/wire/framing.py, bpfs/wire/messages.py): close
    its connection, keep serving others."""

    def __init__(self, message: str, err: int = _errno.EPROTO) -> None:
        super().__init__(err, message)


def einval(message: str) -> BpfsError:
    return BpfsError(_errno.EINVAL, message)

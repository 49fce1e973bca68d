"""File identity by content hash, and the node's cache of received file content.

A file-backed region travels by reference only when the node's file is the identical file; the
proof is its SHA-256 (never its path). Hashing libc for every migration would cost milliseconds,
so `HashCache` remembers hashes keyed by (device, inode, size, mtime, ctime): any write changes
mtime and ctime, and ctime cannot be set from user space.

`FileCache(dir)` stores content received from a master under its hash (written to a temporary
name, checked, then renamed), so the second migration of the same program sends references only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile

from bpfs.migrate.errors import MigrateError, from_oserror

_CHUNK = 1 << 20


def hash_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            return "sha256:" + h.hexdigest()
        h.update(chunk)
        offset += len(chunk)


def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HashCache:
    """Content hashes of files, recomputed only when a file's identity or times change."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int, int], str] = {}

    def hash_fd(self, fd: int) -> tuple[str, int]:
        """(hash, size) of the open regular file `fd`."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MigrateError(errno.EINVAL, "mapped file is not a regular file")
        key = _key(st)
        digest = self._known.get(key)
        if digest is None:
            digest = _hash_fd(fd)
            self._known[key] = digest
        return digest, st.st_size

    def hash_path(self, path: str) -> tuple[str, int]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, f"opening {path}") from exc
        try:
            return self.hash_fd(fd)
        finally:
            os.close(fd)


class FileCache:
    """Received file contents, one file per hash in `directory` (created 0700 if missing)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, digest.replace(":", "-"))

    def __contains__(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    def put(self, digest: str, data: bytes) -> str:
        """Store `data` under `digest` after checking it; EINVAL if the content does not match."""
        if hash_bytes(data) != digest:
            raise MigrateError(errno.EINVAL, f"received content does not match {digest}")
        final = self.path(digest)
        if os.path.exists(final):
            return final
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o555)  # mapped by every user's processes; PR_SET_MM_MAP wants an executable exe
            os.rename(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return final

    def open(self, digest: str) -> int | None:
        """An O_RDONLY fd of the cached content, or None if absent."""
        try:
            return os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

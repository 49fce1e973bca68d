"""File identity by content hash, and the node's cache of received file content.

A file-backed region travels by reference only when the node's file is the identical file; the
proof is its SHA-256 (never its path). Hashing libc for every migration would cost milliseconds,
so `HashCache` remembers hashes keyed by (device, inode, size, mtime, ctime): any write changes
mtime and ctime, and ctime cannot be set from user space.

`FileCache(dir)` stores content received from a master under its hash (written to a temporary
name, checked, then renamed), so the second migration of the same program sends references only.

Who may read a cached file: the directory is root's alone (0700, made so if it was not; EPERM
if another user owns it), and a file is stored execute-only (PRIVATE, 0511: root reads it,
any user may still execute it, as a process re-executing /proc/self/exe does) because the
content may be an execute-only program (mode 0711) that its user may run but not read. A file becomes readable by all
(PUBLIC, 0555) once a dumpable process maps it (`open(digest, public=True)`): the kernel made
that process dumpable only because its user could read the same content on the master (its
executable and interpreter by would_dump; its libraries, which its loader opened itself).
The only way in besides root's is /proc/PID/exe of a process one may trace (a dumpable one of
one's own; /proc/PID/map_files wants CAP_SYS_ADMIN), so a process's own executable stays
readable to its user exactly when it was on the master. Once public a file stays public: it holds content some user proved readable, and
nobody but root can reach it by path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile

from bpfs.migrate.errors import MigrateError, from_oserror

_CHUNK = 1 << 20
PRIVATE, PUBLIC = 0o511, 0o555  # cached content: execute-only, or readable by all


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
    """Received file contents, one file per hash in `directory` (root's alone: 0700)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.stat(directory)
            if st.st_uid != os.geteuid():
                raise MigrateError(errno.EPERM, f"file cache {directory} belongs to uid "
                                   f"{st.st_uid}: its content would not be root's alone")
            if st.st_mode & 0o077:
                os.chmod(directory, 0o700)
        except OSError as exc:
            raise from_oserror(exc, f"preparing the file cache {directory}") from exc

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
            os.chmod(tmp, PRIVATE)  # x: PR_SET_MM_MAP wants an executable exe; r: see above
            os.rename(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return final

    def open(self, digest: str, public: bool = False) -> int | None:
        """An O_RDONLY fd of the cached content, or None if absent. `public`: a dumpable
        process will map it, so its user could read this content: make it readable."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if public and os.fstat(fd).st_mode & 0o777 != PUBLIC:
                os.fchmod(fd, PUBLIC)
        except OSError as exc:
            os.close(fd)
            raise from_oserror(exc, f"making the cached {digest} readable") from exc
        return fd

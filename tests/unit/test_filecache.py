"""The node's file cache: who may read what it keeps (real files in a temporary directory)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from bpfs.errors import BpfsError
from bpfs.migrate.filecache import PRIVATE, PUBLIC, FileCache, hash_bytes

DATA = b"\x7fELF execute-only content"


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_content_is_kept_execute_only_until_a_dumpable_process_maps_it(tmp_path) -> None:
    cache = FileCache(str(tmp_path / "cache"))
    digest = hash_bytes(DATA)
    path = cache.put(digest, DATA)
    assert mode(path) == PRIVATE == 0o511
    os.close(cache.open(digest))                 # a process its user may not read: unchanged
    assert mode(path) == PRIVATE
    fd = cache.open(digest, public=True)         # its user read the same content on the master
    assert os.pread(fd, 64, 0) == DATA
    os.close(fd)
    assert mode(path) == PUBLIC == 0o555
    cache.put(digest, DATA)                      # sent again: stays as it is
    os.close(cache.open(digest))
    assert mode(path) == PUBLIC


def test_the_directory_is_roots_alone(tmp_path) -> None:
    d = tmp_path / "cache"
    FileCache(str(d))
    assert mode(str(d)) == 0o700
    os.chmod(d, 0o755)                           # made by someone else, too open: closed
    FileCache(str(d))
    assert mode(str(d)) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_directory_another_user_owns_is_refused(tmp_path) -> None:
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    os.chown(d, 1001, 1001)
    with pytest.raises(BpfsError) as info:
        FileCache(str(d))
    assert info.value.errno == errno.EPERM and "uid 1001" in info.value.message


def test_wrong_content_is_refused_and_nothing_is_kept(tmp_path) -> None:
    cache = FileCache(str(tmp_path / "cache"))
    digest = hash_bytes(DATA)
    with pytest.raises(BpfsError) as info:
        cache.put(digest, DATA + b"!")
    assert info.value.errno == errno.EINVAL
    assert os.listdir(cache.directory) == [] and digest not in cache

"""bpfs.libbproc's pure parts: node names (BProc 3's getnodebyname, which MPI launchers
still call), BProc's own errno values and messages, and the errno /bproc gives turned
into BProc's. The C library's names are checked against these in
tests/cluster/test_libbproc.py."""

from __future__ import annotations

import errno
import os

import pytest

from bpfs.libbproc import codes
from bpfs.libbproc.codes import (BE_INVALIDNODE, BE_NODEDOWN, NODE_MASTER, NODE_NONE, NODE_SELF,
                                 from_bpfs, node_by_name, strerror)


@pytest.mark.parametrize("name, node", [
    ("5", 5), ("n5", 5), (".5", 5), ("0", 0), ("n0", 0), ("007", 7), ("n1023", 1023),
    ("master", NODE_MASTER), ("-1", NODE_MASTER), ("self", NODE_SELF),
    ("", NODE_NONE), ("n", NODE_NONE), (".", NODE_NONE), ("x5", NODE_NONE), ("5x", NODE_NONE),
    ("n-1", NODE_NONE), ("-2", NODE_NONE), ("localhost", NODE_NONE), ("n 5", NODE_NONE),
    ("٣", NODE_NONE), ("1000000000", NODE_NONE), ("Master", NODE_NONE),
])
def test_node_names(name: str, node: int) -> None:
    assert node_by_name(name) == node


def test_bprocs_numbers_are_bproc_4s() -> None:
    assert (codes.NODE_MASTER, codes.NODE_SELF, codes.NODE_NONE, codes.NODE_ANY) == (-1, -2, -3, -4)
    assert (codes.BE_INVALIDNODE, codes.BE_NODEDOWN, codes.BE_SAMENODE, codes.BE_SLAVEDIED,
            codes.BE_INVALIDPROC) == (300, 301, 302, 303, 304)
    assert codes.X_OK == 1


def test_strerror_knows_bprocs_codes_and_the_systems() -> None:
    assert strerror(BE_INVALIDNODE) == "Invalid node number"
    assert strerror(-BE_NODEDOWN) == "Node is down"
    assert strerror(errno.EACCES) == os.strerror(errno.EACCES)


def test_bpfs_errnos_become_bprocs() -> None:
    assert from_bpfs(errno.ENODEV) == BE_INVALIDNODE
    assert from_bpfs(errno.EHOSTDOWN) == BE_NODEDOWN
    assert from_bpfs(errno.EACCES) == errno.EACCES
    assert from_bpfs(errno.EPERM) == errno.EPERM


def test_error_is_an_oserror_with_bprocs_message() -> None:
    e = codes.error(BE_NODEDOWN, "n3")
    assert isinstance(e, OSError) and (e.errno, e.strerror, e.filename) == (
        BE_NODEDOWN, "Node is down", "n3")

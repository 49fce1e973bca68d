"""BProc 4's numbers for programs: special node numbers, its own errno values and their
messages, and node names. Pure: no I/O, so the C library's tests and ours agree on them.

    NODE_MASTER -1   the front end          NODE_SELF -2   the caller's own node
    NODE_NONE   -3   no node (a bad name)   NODE_ANY  -4   any node (proclist)
    BE_INVALIDNODE 300  no such node        BE_NODEDOWN 301  the node is down
    BE_SAMENODE    302  already there       BE_SLAVEDIED 303, BE_INVALIDPROC 304

BProc 4's calls return its BE_ values for a target that is not a node or is down (its
master daemon's move request did), EACCES for a node the caller may not run on (its
kernel checked the node's x bits like a file's), and the plain errno of execve, fork and
the rest otherwise. /bproc answers ENODEV and EHOSTDOWN for the first two (a ctl file
carries only an errno the C library knows); `from_bpfs` turns those into BProc's.

Names (`node_by_name`, BProc 3's bproc_getnodebyname, kept by programs such as LAM's
and LA-MPI's boot code): "5", "n5", ".5" -> 5; "master", "-1" -> NODE_MASTER; "self" ->
NODE_SELF; anything else -> NODE_NONE. A name says nothing about whether the node exists.
"""

from __future__ import annotations

import errno as _errno
import os

NODE_MASTER, NODE_SELF, NODE_NONE, NODE_ANY = -1, -2, -3, -4
X_OK = 1                                    # bproc_access: may migrate to the node
STATE_LEN = 15                              # BPROC_STATE_LEN: the longest state name
BE_BASE = 300
BE_INVALIDNODE, BE_NODEDOWN, BE_SAMENODE, BE_SLAVEDIED, BE_INVALIDPROC = range(300, 305)

_MESSAGES = {BE_INVALIDNODE: "Invalid node number", BE_NODEDOWN: "Node is down",
             BE_SAMENODE: "Move to same node", BE_SLAVEDIED: "Slave node died",
             BE_INVALIDPROC: "Invalid process ID"}
_FROM_BPFS = {_errno.ENODEV: BE_INVALIDNODE, _errno.EHOSTDOWN: BE_NODEDOWN}
MAX_NODE = 999_999_999                      # = bpfs.wire.execreq.MAX_NODE


def strerror(err: int) -> str:
    """bproc_strerror: BProc's message for its own codes, the system's for the others."""
    err = abs(err)
    return _MESSAGES.get(err) or os.strerror(err)


def error(err: int, what: str | None = None) -> OSError:
    """The OSError a call raises for `err`, with BProc's message; `what` is its filename."""
    return OSError(err, strerror(err), what) if what else OSError(err, strerror(err))


def from_bpfs(err: int) -> int:
    """The errno BProc's calls give for the errno /bproc gave (ENODEV, EHOSTDOWN)."""
    return _FROM_BPFS.get(err, err)


def node_by_name(name: str) -> int:
    """A node's number from its name (see the top); NODE_NONE if `name` is none."""
    if name in ("master", "-1"):
        return NODE_MASTER
    if name == "self":
        return NODE_SELF
    digits = name[1:] if name[:1] in ("n", ".") else name
    if not digits.isascii() or not digits.isdigit() or int(digits) > MAX_NODE:
        return NODE_NONE
    return int(digits)

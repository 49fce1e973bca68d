"""What a program asks about the cluster: where it runs, how many nodes there are, their
states, addresses and who may run on them. Each call reads the /bproc files (the mount
is $BPROC_MOUNT, else /bproc) and raises OSError with BProc's errno (bpfs.libbproc.codes).

    currnode() -> int               the caller's node: NODE_MASTER (-1) on the front end
    numnodes() -> int               how many nodes the master has (not counting itself)
    nodestatus(node) -> str         "up", "down", "boot", "unavailable", "error", ...
    nodeaddr(node) -> str           the node's address, as nodes/N/info gives it
    nodenumber(address) -> int      the node with that address; NODE_NONE if none
    access(node, mode=X_OK) -> None  may the caller run on `node`? else EACCES
    pidnode(pid) -> int             the node process `pid` runs on; NODE_MASTER if none

Where a process runs (BProc 4's bproc_currnode read the symlink /bpfs/self): readlink of
$BPROC_MOUNT/self gives the caller's node number. On a node, the node daemon mounts a
small tmpfs of its own at that path in its mount namespace, where migrated processes
live, and points `self` at its number when it registers (bpfs/node/launcher.py,
bpfs/node/service.py). The master's tree has no `self`: as in BProc, a process that
finds none runs on the master. The environment (BPROC_RANK, the hostname nN of the
embedded cluster) would not do: the rank is an index in a node list, a real node's
hostname is anything, and an environment stays what it was when the process moved.

Errors: BE_INVALIDNODE for a number that is not a node of the cluster, BE_NODEDOWN for a
node that is down where the call needs it up; ENODATA for questions about the cluster
asked on a node (BProc: "available only on the front end"; issue 14 brings /bproc to
the nodes); ENOSYS where no cluster is mounted at all.
"""

from __future__ import annotations

import errno
import os

from bpfs import formats
from bpfs.libbproc.codes import (BE_INVALIDNODE, BE_NODEDOWN, NODE_MASTER, NODE_NONE, NODE_SELF,
                                 X_OK, error)

DEFAULT_MOUNT = "/bproc"


def mount_point() -> str:
    """$BPROC_MOUNT, else /bproc: where the master's files are (and `self`, on a node)."""
    return os.environ.get("BPROC_MOUNT") or DEFAULT_MOUNT


def node_dir(node: int, mount: str | None = None) -> str:
    return os.path.join(mount or mount_point(), "nodes", str(node))


def currnode() -> int:
    """The caller's node, or NODE_MASTER on the master (and where nothing says otherwise)."""
    try:
        return int(os.readlink(os.path.join(mount_point(), "self")))
    except (OSError, ValueError):
        return NODE_MASTER


def numnodes() -> int:
    """How many nodes the cluster has, whatever their state (BProc 4: not the highest
    number plus one)."""
    return len(_status_rows())


def nodestatus(node: int) -> str:
    """The node's state; the master is always "up"."""
    node = _resolve(node)
    if node == NODE_MASTER:
        return "up"
    return _node_file(node, "status").strip()


def nodeaddr(node: int) -> str:
    """The node's address (nodes/N/info); BE_NODEDOWN while it has none (down).
    The master's own address is not in /bproc: EADDRNOTAVAIL."""
    node = _resolve(node)
    if node == NODE_MASTER:
        raise error(errno.EADDRNOTAVAIL, "master")
    try:
        address = formats.parse_info(_node_file(node, "info")).address
    except ValueError:
        raise error(errno.EIO, node_dir(node) + "/info") from None
    if not address:
        raise error(BE_NODEDOWN)
    return address


def nodenumber(address: str) -> int:
    """The node whose address is `address` (as nodes/N/info gives it), else NODE_NONE."""
    try:
        rows = _status_rows()
    except OSError:
        return NODE_NONE
    return next((r.number for r in rows if r.address and r.address == address), NODE_NONE)


def access(node: int, mode: int = X_OK) -> None:
    """Return if the caller may run on `node` (its x bits, as the master checks them: the
    owner's, else the group's, else the others'; root anywhere), else raise EACCES;
    BE_NODEDOWN if the node is not up (nothing may run there now)."""
    if mode & ~X_OK:
        raise error(errno.EINVAL)
    node = _resolve(node)
    if node == NODE_MASTER:
        return
    if nodestatus(node) != "up":
        raise error(BE_NODEDOWN)
    st = os.stat(node_dir(node))
    uid = os.geteuid()
    if uid == 0 or not mode:
        return
    if uid == st.st_uid:
        bit = 0o100
    elif st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        bit = 0o010
    else:
        bit = 0o001
    if not st.st_mode & bit:
        raise error(errno.EACCES)


def pidnode(pid: int) -> int:
    """The node of a migrated process (procs/PID/node); NODE_MASTER for any other PID, as
    BProc's bproc_pidnode answered for a process that is not on a node."""
    try:
        with open(os.path.join(mount_point(), "procs", str(pid), "node")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return NODE_MASTER


# ---- reading the files -------------------------------------------------------------

def _resolve(node: int) -> int:
    if node == NODE_SELF:
        return currnode()
    if node < NODE_MASTER:
        raise error(BE_INVALIDNODE)
    return node


def _status_rows() -> list[formats.NodeRow]:
    path = os.path.join(mount_point(), "status")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise _no_cluster() from None
    try:
        return formats.parse_status(text)
    except ValueError:
        raise error(errno.EIO, path) from None


def _node_file(node: int, name: str) -> str:
    """nodes/N/NAME; BE_INVALIDNODE if the cluster has no node N."""
    try:
        with open(os.path.join(node_dir(node), name)) as f:
            return f.read()
    except FileNotFoundError:
        if os.path.exists(os.path.join(mount_point(), "status")):
            raise error(BE_INVALIDNODE) from None
        raise _no_cluster() from None


def _no_cluster() -> OSError:
    """On a node the master's files are not there (ENODATA); elsewhere, no cluster (ENOSYS)."""
    return error(errno.ENODATA if currnode() >= 0 else errno.ENOSYS)

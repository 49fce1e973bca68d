"""Where a process on a node learns its node number: `self` under the node's mount point.

    mount_view(path)           in the node's own mount namespace: a small tmpfs on `path`
    point_self(path, number)   `path/self` -> "NUMBER" (a symlink), at every registration

BProc 4's programs asked bproc_currnode(), which read the symlink /bpfs/self: the node's
number on a node, -1 on the master. A bpfs node shows the same at the master's mount
point ($BPROC_MOUNT, /bproc by default; bpslave --mount), in the mount namespace where
the node daemon and every process it restores live, so bpfs.libbproc (and libbproc.so)
read it exactly as they would on the master, where the master's tree has no `self` and
a process is on the master. The tmpfs is root's, 0755: users read, nobody else writes.
The number is the one the master gave at registration, which may differ after a
reconnection, so it is pointed again each time (a new link renamed over the old one).

Errors: OSError from mount or the file system; the callers log them (a node whose
programs cannot learn their number still runs them).
"""

from __future__ import annotations

import os

from bpfs.node import nsutil


def mount_view(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    nsutil.mount("bproc-node", path, "tmpfs", nsutil.MS_NOSUID | nsutil.MS_NODEV | nsutil.MS_NOEXEC,
                 "mode=755,size=16k")


def point_self(path: str, number: int) -> None:
    tmp = os.path.join(path, ".self.new")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(str(number), tmp)
    os.rename(tmp, os.path.join(path, "self"))

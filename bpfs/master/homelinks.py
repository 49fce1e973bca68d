"""The stdio links of a process that moves back to the master, made again from here.

On a node the process's socket fds 0-2 were links to its stdio server (bpsh, the exec
endpoint, a relay); back on the master, restored into its ghost, it keeps talking to that
same server through links the master connects (`TOKEN PID FD again CONSUMED`,
bpfs.wire.stdiolink), fd 0 going on from the stdin byte it had read on the node.
"""

from __future__ import annotations

from bpfs.model import Proc
from bpfs.wire.stdiolink import LinkTarget, connect_links as _connect


async def connect_links(p: Proc, host: str, consumed: int) -> dict[int, int]:
    """{fd: our fd of its new link} for `p`'s link fds ({} if it has none); the caller
    closes ours once they are installed. fd 2 that shares fd 1's link gets the same."""
    ln = p.links
    if ln is None:
        return {}
    where = ln.host or host
    targets = {n: LinkTarget(where, ln.port, ln.token, p.pid, consumed if n == 0 else 0)
               for n, spec in enumerate(ln.io) if spec == "socket"}
    fds = await _connect(targets) if targets else {}
    if ln.io[2] == "stdout" and 1 in fds:
        fds[2] = fds[1]
    return fds

"""The cluster's names as a hosts file, read by the NSS module (nss/libnss_bproc.c).

The master writes it (bpfs/master/names.py) and a node daemon on another machine writes
the same text from the master's `names` message (bpfs/node/service.py), each atomically,
a temporary file renamed over it, so a lookup reads one consistent version. The format
is /etc/hosts', one line a host:

    hosts_file  := HEADER  master_line  node_line*
    master_line := ADDRESS SP "master" NL        where the master's node port listens
    node_line   := ADDRESS SP "n" N SP "." N NL  every node that registered, at the address
                                                 it registered from (kept while it is
                                                 down, as /etc/hosts would keep it)

Default place /run/bpfs/hosts; the module reads $BPFS_HOSTS instead when set.
"""

from __future__ import annotations

import os

DEFAULT_HOSTS_FILE = "/run/bpfs/hosts"
HEADER = "# bpfs: the cluster's names (written by bpfs; read by libnss_bproc)\n"


def render_hosts(master: str, nodes: list[tuple[int, str]]) -> str:
    """The file's text: `master`, then (number, address) of each node that has one."""
    lines = [HEADER, f"{master} master\n"]
    lines += [f"{address} n{n} .{n}\n" for n, address in sorted(nodes) if address]
    return "".join(lines)


def write_atomically(path: str, text: str) -> None:
    """`path` (0644; its directory made 0755 if missing) holds `text`, never half of it.
    OSError as the filesystem gives it."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

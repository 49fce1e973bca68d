"""The cluster's names as a hosts file, for the NSS module (nss/libnss_bproc.c).

BProc shipped a name service for its nodes; so does bpfs: `n5`, `.5` and `master`
resolve, on the master and on every node, through `hosts: files bproc` in
/etc/nsswitch.conf and libnss_bproc.so.2, which reads this file (or $BPFS_HOSTS). The
master rewrites it, atomically (a temporary file renamed over it), whenever a node's
address changes, so every lookup reads one consistent version without asking the
daemon anything; the embedded nodes share the master's filesystem and read the same
file. The format is /etc/hosts', one line a host:

    hosts_file  := "# " comment NL  line*
    line        := ADDRESS SP NAME (SP ALIAS)* NL
    master line := ADDR SP "master"                the address the node port listens on
                                                   (127.0.0.1 for a wildcard listen
                                                   without a name that resolves)
    node line   := ADDR SP "n" N SP "." N          every node that has registered, at
                                                   the address it registered from; kept
                                                   while it is down, as /etc/hosts would

Write errors are logged (once until another comes) and retried at the next change; the file is
removed when the master stops. Nothing here blocks for long: one small write and a
rename, only when the text changes.
"""

from __future__ import annotations

import logging
import os
import socket

from bpfs.model import Cluster

log = logging.getLogger("bpfs.master.names")

DEFAULT_HOSTS_FILE = "/run/bpfs/hosts"
HEADER = "# bpfs: the cluster's names (written by the master; read by libnss_bproc)\n"


def master_address(listen: str) -> str:
    """The address `master` names: the node port's, or for a wildcard listen this
    machine's name's address, else 127.0.0.1."""
    if listen not in ("", "0.0.0.0", "::"):
        return listen
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return address


def render_hosts(master: str, nodes: list[tuple[int, str]]) -> str:
    """The file's text: `master`, then (number, address) of each node with an address."""
    lines = [HEADER, f"{master} master\n"]
    lines += [f"{address} n{n} .{n}\n" for n, address in sorted(nodes) if address]
    return "".join(lines)


class HostsFile:
    """Keeps `path` equal to render_hosts() of the cluster; call `update` on any event."""

    def __init__(self, path: str, cluster: Cluster, master: str) -> None:
        self.path, self.cluster, self.master = path, cluster, master
        self._written: str | None = None
        self._last_error = ""

    def update(self) -> None:
        text = render_hosts(self.master, [(n.number, n.address) for n in self.cluster.nodes()])
        if text == self._written:
            return
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            if str(exc) != self._last_error:          # once per kind, not per event
                log.error("cannot write the hosts file %s: %s", self.path, exc)
                self._last_error = str(exc)
            return
        self._written = text

    def remove(self) -> None:
        if self._written is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass


def write_atomically(path: str, text: str) -> None:
    """`path` (0644, its directory made 0755 if missing) holds `text`, never half of it."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)

"""The cluster's names for the NSS module: the hosts file, and the `names` message.

BProc shipped a name service for its nodes; so does bpfs: `n5`, `.5` and `master`
resolve, on the master and on every node, through `hosts: files bproc` in
/etc/nsswitch.conf and libnss_bproc.so.2, which reads the hosts file of
bpfs/hostsfile.py. The master rewrites it whenever a node's address changes (each
event of the model is a chance: `update` renders, and writes only when the text
differs); the embedded nodes share the master's filesystem and read the same file.
A node on a machine of its own gets the same names in a `names` message (sent after
`welcome`, and to every node when they change; `broadcast`) and writes them there.

Write errors are logged (once until another comes) and retried at the next change;
the master removes its file when it stops.
"""

from __future__ import annotations

import logging
import socket
from typing import Awaitable, Callable, Iterable

import trio

from bpfs import hostsfile
from bpfs.model import Cluster
from bpfs.wire import messages

log = logging.getLogger("bpfs.master.names")

BROADCAST_EVERY = 0.25      # seconds between checks for changed names (events may come
                            # from any thread, so the task polls a version number)


def master_address(listen: str) -> str:
    """The address `master` names: the node port's, or for a wildcard listen this
    machine's name's address, else 127.0.0.1."""
    if listen not in ("", "0.0.0.0", "::"):
        return listen
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Names:
    """Keeps `path` (if any) equal to the cluster's names; call `update` on any event."""

    def __init__(self, path: str | None, cluster: Cluster, master: str) -> None:
        self.path, self.cluster, self.master = path, cluster, master
        self.version = 0
        self._text: str | None = None
        self._pairs: list[tuple[int, str]] = []
        self._written = False
        self._last_error = ""

    def update(self) -> None:
        """Called after every event of the model (processes' too): cheap unless a node's
        address changed (which comes with a node's event: a process's is passed over,
        two of them a fork on a node)."""
        last = self.cluster.events.last()
        if last is not None and last.kind == "proc" and self._text is not None:
            return
        pairs = [(n.number, n.address) for n in self.cluster.nodes() if n.address]
        if pairs == self._pairs and self._text is not None:
            return
        text = hostsfile.render_hosts(self.master, pairs)
        self._text, self._pairs = text, pairs
        self.version += 1
        if self.path is None:
            return
        try:
            hostsfile.write_atomically(self.path, text)
        except OSError as exc:
            if str(exc) != self._last_error:
                log.error("cannot write the hosts file %s: %s", self.path, exc)
                self._last_error = str(exc)
            self._text = None               # try again at the next event
            return
        self._written = True

    def message(self) -> messages.Names:
        return messages.Names(master=self.master, nodes=list(self._pairs))

    async def broadcast(self, nodes: Callable[[], Iterable[int]],
                        send: Callable[[int, messages.Msg], Awaitable[None]]) -> None:
        """Forever: when the names change, send them to every connected node (a node
        that connects later gets them after `welcome`). Send failures are the link's."""
        sent = self.version
        while True:
            await trio.sleep(BROADCAST_EVERY)
            if self.version == sent:
                continue
            sent, msg = self.version, self.message()
            for n in list(nodes()):
                try:
                    await send(n, msg)
                except Exception as exc:            # a lost link is the link's business
                    log.debug("names to node %d: %s", n, exc)

    def remove(self) -> None:
        if self._written and self.path is not None:
            hostsfile.remove(self.path)

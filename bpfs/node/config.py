"""The node daemon's settings, shared by its CLI (bpfs/cli/bpslave.py), the
service (bpfs/node/service.py) and the embedded cluster. No heavy imports."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Callable

from bpfs.errors import BpfsError

DEFAULT_PORT = 2223            # = bpfs.wire.framing.DEFAULT_PORT (not imported: it pulls in trio)
DEFAULT_KEY_FILE = "/etc/bpfs/cluster.key"

# Exit statuses of bpslave (documented in its --help).
EXIT_OK = 0          # halted or powered off by the master, or stopped by SIGTERM/SIGINT
EXIT_LOST = 1        # master unreachable or connection lost, without -r
EXIT_USAGE = 2       # bad command line
EXIT_REFUSED = 3     # wrong cluster key, or the master refused our registration


@dataclass
class NodeConfig:
    host: str
    port: int = DEFAULT_PORT
    key_file: str = DEFAULT_KEY_FILE
    node: int | None = None          # ask for this number; None: the master picks
    reconnect: bool = False          # -r: retry with back-off instead of exiting
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    reboot_delay: float = 0.05       # pause of a simulated reboot
    serve_fs: Callable[..., Any] | None = None   # bpfs.fs.remote.serve (/bproc on the node),
                                                 # given by the command line; None: no mount
    source: str | None = None        # connect from this local address (embedded: one a node)
    hosts_file: str | None = None    # write the master's `names` here (bpfs/hostsfile.py)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_master(text: str) -> tuple[str, int]:
    """`HOST`, `HOST:PORT` or `[V6]:PORT` -> (host, port); EINVAL on anything else."""
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise BpfsError(errno.EINVAL, f"bad master address {text!r}")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise BpfsError(errno.EINVAL, f"bad master address {text!r} (want HOST:PORT)")
    return host, int(port)

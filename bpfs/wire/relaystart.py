"""How a stdio relay is started and says it listens: one definition for both daemons.

The master starts a relay for a plain master process that moves out (bpfs/master/relay.py),
a node for a process forked there that moves away (bpfs/node/standins.py). Either way it is
`python -m bpfs.cli.bpsh.relay`, as the process's user, with the same small environment,
and it writes "PORT\\n" on its ready fd once it listens (docs/bpsh.md).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_MAX = 64                  # bytes of a ready line, at most


def environment() -> dict[str, str]:
    """The environment of a relay, and of the fork-server whose children relays are."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": ROOT,
            "LANG": "C.UTF-8"}


def argv(pid: int, token_fd: int, host: str, ready_fd: int) -> list[str]:
    """The relay's command line (its token comes on `token_fd`, never on the line)."""
    return [sys.executable, "-m", "bpfs.cli.bpsh.relay", "--pid", str(pid), "--token-fd",
            str(token_fd), "--host", host, "--ready-fd", str(ready_fd)]


def port_of(line: bytes) -> int:
    """The port in a relay's ready line; ValueError for anything else (none, garbage)."""
    port = int(line.strip() or b"0")
    if not 0 < port < 65536:
        raise ValueError(line[:READY_MAX])
    return port

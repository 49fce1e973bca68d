"""/bproc on a node, as the node daemon's command lines (bpslave, `bpfs up`) give it.

bpfs/node may not import bpfs/fs (they are independent adapters), so the node daemon is
given the filesystem it serves as NodeConfig.serve_fs; and bpslave's launcher must stay a
bare interpreter, so pyfuse3 is imported only when the daemon proper mounts it. A module
of its own: nothing bpsh imports may name bpfs.fs (the lean-cli contract).
"""

from __future__ import annotations

from typing import Any


def serve(*args: Any, **kwargs: Any) -> Any:
    """bpfs.fs.remote.serve(path, client, task_status=...), imported when first called."""
    from bpfs.fs import remote
    return remote.serve(*args, **kwargs)


def preload() -> None:
    """Import it now: `bpfs up` forks its nodes from this process, which then share
    pyfuse3's pages copy-on-write (about 3 MB a node otherwise)."""
    from bpfs.fs import remote  # noqa: F401

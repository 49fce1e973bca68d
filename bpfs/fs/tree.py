"""The /bproc tree as tables: which names each directory holds, and how each
file is read and written. Rendering goes through bpfs.formats, so the text is
exactly what the CLIs parse.

    /status /events /nodes/ /procs/
    /nodes/N/   status ctl info procs         (dir mode/uid/gid = node ACL)
    /procs/P/   status stat node signal ctl   (dir owned by the process's uid)
                stdout stderr                 (only for processes started by `exec`)

Adding a file is adding a `FileSpec` row (and a Kind in inodes.py). `read`
renders the whole content from the model; `write` is a ctl command table; a
`stream` file is read by the fs layer from its per-handle cursor: events, or
the process output ring named by `output` (readable by the process's uid and
root only; present only when the process has output, see `proc_files`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from bpfs import formats
from bpfs.ctl import NODE_CTL, PROC_CTL, PROC_SIGNAL, Command
from bpfs.fs import procstat
from bpfs.fs.inodes import Kind
from bpfs.model import Cluster

Renderer = Callable[[Cluster, int], str]


@dataclass(frozen=True)
class FileSpec:
    name: str
    kind: Kind
    mode: int
    read: Renderer | None           # None: content is per handle (ctl result, events)
    write: Sequence[Command] | None = None
    stream: bool = False
    output: str | None = None       # "stdout" | "stderr": a ProcOutput stream


def render_cluster_status(cluster: Cluster, _: int = 0) -> str:
    """Every node's line; each owner's name is looked up once (nodes mostly share owners,
    and a passwd/group lookup reads the files again every time)."""
    nodes = cluster.nodes()
    users = {uid: formats.user_name(uid) for uid in {n.uid for n in nodes}}
    groups = {gid: formats.group_name(gid) for gid in {n.gid for n in nodes}}
    return formats.render_status(
        formats.NodeRow(n.number, n.state, n.mode, users[n.uid], groups[n.gid], n.address)
        for n in nodes)


def render_node_status(cluster: Cluster, n: int) -> str:
    return formats.render_word(cluster.node(n).state)


def render_node_info(cluster: Cluster, n: int) -> str:
    node = cluster.node(n)
    return formats.render_info(formats.NodeInfo(node.address, node.facts,
                                                len(cluster.procs_on(n))))


def render_node_procs(cluster: Cluster, n: int) -> str:
    return formats.render_pids(cluster.procs_on(n))


def render_proc_status(cluster: Cluster, pid: int) -> str:
    p = cluster.proc(pid)
    return formats.render_proc_status(formats.ProcStatus(
        p.pid, p.node, p.state, p.uid, p.gid, p.cmd, p.started, p.exit, p.usage))


def render_proc_node(cluster: Cluster, pid: int) -> str:
    return formats.render_word(cluster.proc(pid).node)


ROOT_FILES: tuple[FileSpec, ...] = (
    FileSpec("status", Kind.STATUS, 0o444, render_cluster_status),
    FileSpec("events", Kind.EVENTS, 0o444, None, stream=True),
)
ROOT_DIRS: tuple[tuple[str, Kind], ...] = (("nodes", Kind.NODES), ("procs", Kind.PROCS))

NODE_FILES: tuple[FileSpec, ...] = (
    FileSpec("status", Kind.NODE_STATUS, 0o444, render_node_status),
    FileSpec("ctl", Kind.NODE_CTL, 0o666, None, NODE_CTL),
    FileSpec("info", Kind.NODE_INFO, 0o444, render_node_info),
    FileSpec("procs", Kind.NODE_PROCS, 0o444, render_node_procs),
)

PROC_FILES: tuple[FileSpec, ...] = (
    FileSpec("status", Kind.PROC_STATUS, 0o444, render_proc_status),
    FileSpec("stat", Kind.PROC_STAT, 0o444, procstat.render),
    FileSpec("node", Kind.PROC_NODE, 0o444, render_proc_node),
    FileSpec("signal", Kind.PROC_SIGNAL, 0o200, None, PROC_SIGNAL),
    FileSpec("ctl", Kind.PROC_CTL, 0o600, None, PROC_CTL),
    FileSpec("stdout", Kind.PROC_STDOUT, 0o400, None, stream=True, output="stdout"),
    FileSpec("stderr", Kind.PROC_STDERR, 0o400, None, stream=True, output="stderr"),
)

# procs/P of a master process never migrated (bpfs/fs/masterprocs.py): its ctl, to move it
MASTER_PROC_KINDS = frozenset({Kind.PROC_DIR, Kind.PROC_CTL})

FILES: dict[Kind, FileSpec] = {s.kind: s for s in (*ROOT_FILES, *NODE_FILES, *PROC_FILES)}


def proc_files(cluster: Cluster, pid: int) -> tuple[FileSpec, ...]:
    """The files of procs/PID: stdout and stderr only if the process keeps its output."""
    p = cluster.procs.get(pid)
    has_output = p is not None and p.output is not None
    return tuple(s for s in PROC_FILES if s.output is None or has_output)


def spec_named(table: Sequence[FileSpec], name: str) -> FileSpec | None:
    return next((s for s in table if s.name == name), None)


def parse_number(name: str) -> int | None:
    """A directory name that is a canonical decimal number (no sign, no leading 0)."""
    if name.isascii() and name.isdigit() and (name == "0" or not name.startswith("0")) \
            and len(name) <= 10:
        return int(name)
    return None

"""The master's state file: node numbers, ACLs and admin states.

A master restart must lose nothing a user set with chmod/chown/bpctl, so the
master writes this file after each such change, atomically (temp file, fsync,
rename, fsync of the directory): a crash leaves the old or the new file, never
a mix. It is JSON text so an admin can read it:

    {"format": "bpfs-state", "version": 1,
     "nodes": [{"number": 0, "mode": "0111", "uid": 0, "gid": 0, "admin": null}, ...]}

    number  := 0..MAX_NODE, each at most once
    mode    := octal string, x bits only
    uid,gid := integers >= 0
    admin   := null | "unavailable" | "error"

Which nodes it holds is the model's rule (bpfs/model.py `Cluster.saved`): with
`--nodes K` the K configured ones, and no node registering can add one; with open
numbering only nodes whose ACL or admin state someone changed.

`load` returns None when the file does not exist (first start) and raises
BpfsError(EINVAL) naming the file and the fault when it is corrupt: the master
refuses to start rather than silently dropping ACLs.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from bpfs.errors import BpfsError
from bpfs.model import ACL_BITS, ADMIN_STATES, MAX_NODE, SavedNode

FORMAT = "bpfs-state"
VERSION = 1


def dumps(nodes: list[SavedNode]) -> str:
    """One node a line, so a diff of two state files reads like a change log."""
    lines = [json.dumps({"number": n.number, "mode": f"{n.mode:04o}", "uid": n.uid,
                         "gid": n.gid, "admin": n.admin}) for n in nodes]
    body = ",\n  ".join(lines)
    return (f'{{"format": "{FORMAT}", "version": {VERSION},\n "nodes": [\n  {body}\n ]}}\n'
            if lines else f'{{"format": "{FORMAT}", "version": {VERSION}, "nodes": []}}\n')


def loads(text: str) -> list[SavedNode]:
    """Parse state file text; ValueError saying what is wrong."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise ValueError(f"unsupported version {doc.get('version')!r} (want {VERSION})")
    if not isinstance(doc.get("nodes"), list):
        raise ValueError("'nodes' is not a list")
    nodes = [_node(i, d) for i, d in enumerate(doc["nodes"])]
    numbers = [n.number for n in nodes]
    if len(set(numbers)) != len(numbers):
        raise ValueError("a node number appears twice")
    return nodes


def _node(i: int, d: Any) -> SavedNode:
    if not isinstance(d, dict):
        raise ValueError(f"nodes[{i}] is not an object")
    number, uid, gid = d.get("number"), d.get("uid"), d.get("gid")
    for name, v, top in (("number", number, MAX_NODE), ("uid", uid, 2**32 - 2), ("gid", gid, 2**32 - 2)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
            raise ValueError(f"nodes[{i}].{name} is {v!r}")
    mode = d.get("mode")
    try:
        m = int(mode, 8)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"nodes[{i}].mode is {mode!r}") from None
    if m & ~ACL_BITS:
        raise ValueError(f"nodes[{i}].mode {mode!r} has bits other than x")
    admin = d.get("admin")
    if admin is not None and admin not in ADMIN_STATES[1:]:
        raise ValueError(f"nodes[{i}].admin is {admin!r}")
    return SavedNode(number, m, uid, gid, admin)  # type: ignore[arg-type]


def load(path: str) -> list[SavedNode] | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise BpfsError(getattr(exc, "errno", None) or errno.EINVAL,
                        f"cannot read state file {path}: {exc}") from None
    try:
        return loads(text)
    except ValueError as exc:
        raise BpfsError(errno.EINVAL, f"state file {path} is corrupt ({exc}); "
                        "fix it or move it away to start with default ACLs") from None


def save(path: str, nodes: list[SavedNode]) -> None:
    """Replace `path` atomically and durably; OSError is the caller's to report."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = memoryview(dumps(nodes).encode())
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

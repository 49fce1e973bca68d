"""Fixtures for migration tests: a loop node in its own PID + mount namespaces, a `migrate`
helper that runs a program through launch -> dump -> image bytes -> restore, and a `local`
helper that runs the same program in the same kind of namespaces for byte-for-byte comparison.

Every launched ghost is killed and reaped in `finally`; the node is stopped at module end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from bpfs.migrate import image, master as dump
from bpfs.migrate.loopnode import LoopNode

HERE = Path(__file__).resolve().parent
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C", "HOME": "/", "TZ": "UTC"}
NS = ["unshare", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]


@dataclass
class Run:
    stdout: bytes
    stderr: bytes
    code: int
    pid: int = 0

    def triple(self) -> tuple[bytes, bytes, int]:
        return self.stdout, self.stderr, self.code


def _drain(r1: int, r2: int) -> tuple[bytes, bytes]:
    """Read two pipes to EOF without deadlocking on either."""
    import selectors
    out = {r1: bytearray(), r2: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in (r1, r2):
        sel.register(fd, selectors.EVENT_READ)
    open_fds = 2
    while open_fds:
        for key, _ in sel.select(timeout=30):
            chunk = os.read(key.fd, 65536)
            if chunk:
                out[key.fd] += chunk
            else:
                sel.unregister(key.fd)
                open_fds -= 1
    sel.close()
    return bytes(out[r1]), bytes(out[r2])


def migrate_image(node: LoopNode, data: bytes, img: image.Image, *, stdin: str = "/dev/null",
                  uid: int = 0, gid: int = 0, groups: Sequence[int] = (),
                  contents: dict | None = None) -> Run:
    """Restore image bytes on `node`, feeding stdin from a file, and collect what it printed."""
    fin = os.open(stdin, os.O_RDONLY)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        rep = node.restore(data, pid=img.pid, uid=uid, gid=gid, groups=groups,
                           fds=(fin, w1, w2), contents=contents, wait=False)
        os.close(w1)
        os.close(w2)
        w1 = w2 = -1
        out, err = _drain(r1, r2)
        status = node.wait(rep["pid"])
    finally:
        for fd in (fin, r1, r2, w1, w2):
            if fd >= 0:
                os.close(fd)
    return Run(out, err, os.waitstatus_to_exitcode(status), rep["pid"])


def migrate(node: LoopNode, argv: Sequence[str], *, cwd: str = "/", env: dict | None = None,
            **kw) -> Run:
    """launch -> dump -> dumps -> (send missing contents) -> restore on the node."""
    pid = dump.launch(argv, env or ENV, cwd)
    try:
        img = dump.dump(pid)
    finally:
        dump.kill(pid)
    data = image.dumps(img)
    missing = node.missing(data)
    contents = dump.read_contents(img, missing) if missing else None
    return migrate_image(node, data, img, contents=contents, **kw)


def local(argv: Sequence[str], *, cwd: str = "/", env: dict | None = None,
          stdin: str = "/dev/null", user=None) -> Run:
    """The same program run here, in fresh PID + mount namespaces like the node's."""
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--"]
    with open(stdin, "rb") as f:
        p = subprocess.run(NS + prefix + list(argv), stdin=f, capture_output=True, cwd=cwd,
                           env=env or ENV, timeout=60)
    return Run(p.stdout, p.stderr, p.returncode)


@pytest.fixture(scope="module")
def cache_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="bpfs-filecache-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def node(cache_dir: str) -> Iterator[LoopNode]:
    if os.geteuid() != 0:
        pytest.skip("migration needs root (ptrace of any process, namespaces, set_tid)")
    n = LoopNode(cache_dir)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(scope="session")
def cprogs() -> Iterator[dict[str, str]]:
    """progs.c built dynamic and static in a world-readable directory (skipped without gcc)."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc is not available to build the C test programs")
    d = tempfile.mkdtemp(prefix="bpfs-progs-")
    os.chmod(d, 0o755)
    try:
        out = {"dynamic": os.path.join(d, "progs"), "static": os.path.join(d, "progs-static")}
        subprocess.run([gcc, "-O1", "-pthread", str(HERE / "progs.c"), "-o", out["dynamic"]],
                       check=True)
        r = subprocess.run([gcc, "-O1", "-static", "-pthread", str(HERE / "progs.c"), "-o",
                            out["static"]], capture_output=True)
        if r.returncode != 0:
            out.pop("static")
        yield out
    finally:
        shutil.rmtree(d, ignore_errors=True)

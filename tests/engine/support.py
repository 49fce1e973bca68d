"""Helpers for migration tests: `migrate` runs a program through launch -> dump -> image bytes
-> restore on a loop node, `local` runs the same program in the same kind of namespaces for
byte-for-byte comparison, `seized_at_exec` dumps a child that execs by itself (bpsh's case).
Every launched ghost is killed and reaped in `finally`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from bpfs.migrate import dump, image
from bpfs.migrate.loopnode import LoopNode

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


@contextlib.contextmanager
def seized_at_exec(argv: Sequence[str], before_exec: Callable[[], None] | None = None
                   ) -> Iterator[tuple[int, image.Image]]:
    """A child that runs `before_exec` and then execs `argv` by itself, seized before its
    exec and dumped at its entry point: (pid, image) while it stays stopped; killed after."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            if before_exec is not None:
                before_exec()
            os.read(r, 1)
            os.execve(argv[0], argv, ENV)
        finally:
            os._exit(127)
    os.close(r)
    try:
        dump.seize_for_exec(pid)
        os.write(w, b"x")
        yield pid, dump.wait_exec_and_dump(pid, timeout=10)
    finally:
        os.close(w)
        dump.kill(pid)

"""bpsh without a master: a fake $MOUNT and a fake node, for bpsh's and bpcp's unit tests.

`mount` is a fake /bproc (a `status` file and plain `nodes/N/ctl` files). `Runner` runs
bpsh (or bpcp) for real against it, with `bpsh.EXEC_PREFIX` making each child exec
FAKE_NODE instead of the command: it reads the request bpsh's child wrote to
nodes/N/ctl, connects the "socket" fds back with the header of bpfs.wire.execreq (or
sends the `err` header), puts them on fds 0-2 and execs the command: exactly the node's
part, done in place, with the same PID as the "ghost".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpfs.formats import NodeRow, render_status

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

FAKE_NODE = '''
import os, socket, sys
from bpfs.wire.execreq import parse_execmove, render_error, render_header, split_ctl_words
node, path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(os.path.join(os.environ["FAKE_MOUNT"], "nodes", node, "ctl")) as f:
    req = parse_execmove(split_ctl_words(f.readline())[1:])
pid = os.getpid()
if os.environ.get("FAKE_FAIL"):
    s = socket.create_connection(("127.0.0.1", req.port))
    s.sendall(render_error(req.token, pid, int(os.environ["FAKE_FAIL"]),
                           f"node {node}: no route\\nto it"))
    os._exit(255)
if os.environ.get("FAKE_NO_LINKS"):
    os.execv(path, argv)
for fd, spec in enumerate(req.io):
    if spec == "socket":
        s = socket.create_connection(("127.0.0.1", req.port))
        s.sendall(render_header(req.token, pid, fd))
        os.dup2(s.fileno(), fd)
        s.close()
    elif spec == "stdout":
        os.dup2(1, 2)
    else:
        name = "/dev/null" if spec == "null" else spec[5:]
        flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        new = os.open(name, flags, 0o666)
        os.dup2(new, fd)
        os.close(new)
os.execv(path, argv)
'''

RUNNER = '''
import sys
import bpfs.cli.bpsh as b, bpfs.cli.bpcp as c, bpfs.cli.bpsh.stdio as s
b.EXEC_PREFIX[:] = [sys.executable, {fake!r}]
s.LATE_GRACE = {grace!r}
sys.exit((c if sys.argv[1] == "bpcp" else b).main(sys.argv[2:]))
'''



@pytest.fixture
def mount(tmp_path: Path) -> Path:
    """A fake /bproc: nodes 0-3 up, 4 down, ctl files as plain files."""
    m = tmp_path / "mnt"
    rows = [NodeRow(n, "down" if n == 4 else "up", 0o111, "root", "root", "127.0.0.1")
            for n in range(5)]
    (m / "nodes").mkdir(parents=True)
    (m / "status").write_text(render_status(rows))
    for n in range(5):
        (m / "nodes" / str(n)).mkdir()
        (m / "nodes" / str(n) / "ctl").write_text("")
    return m


class Runner:
    def __init__(self, tmp: Path, mount: Path, grace: float = 0.3) -> None:
        fake = tmp / "fake_node.py"
        fake.write_text(FAKE_NODE)
        self.script = tmp / "runner.py"
        self.script.write_text(RUNNER.format(fake=str(fake), grace=grace))
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_MOUNT=str(mount),
                        BPROC_MOUNT=str(mount))
        self.env.pop("BPROC_RANK", None)

    def __call__(self, *args: str, prog: str = "bpsh", input: bytes | None = b"",
                 env: dict | None = None, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run([PY, str(self.script), prog, *args], input=input,
                              timeout=timeout, env=dict(self.env, **(env or {})), **kw)


@pytest.fixture
def run(tmp_path: Path, mount: Path) -> Runner:
    return Runner(tmp_path, mount)


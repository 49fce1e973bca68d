"""`bpfs up` / `bpfs down`: the embedded cluster's life cycle, seen from the host.

Every test uses a temporary mount point and state directory and a free port,
and runs `bpfs down` (then a lazy unmount) in `finally`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from bpfs import formats

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the embedded cluster needs root"),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse"),
    pytest.mark.timeout(120),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Where:
    base: str
    mount: str
    state: str
    port: int

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "bpfs.cli.bpfs_main", *args]

    def bpfs(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                              env=env(), cwd="/")

    def up(self, nodes: int, *extra: str) -> subprocess.CompletedProcess:
        return self.bpfs("up", "--nodes", str(nodes), "--mount", self.mount, "--state-dir",
                         self.state, "--port", str(self.port), "--detach", *extra)

    def down(self) -> subprocess.CompletedProcess:
        return self.bpfs("down", "--mount", self.mount, "--state-dir", self.state)

    def records(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in Path(self.state, "pids").glob("*.pid"):
            pid, start = p.read_text().split()
            out[p.stem] = (int(pid), int(start))
        return out


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")


def mounted(path: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def alive(pid: int, start: int | None = None) -> bool:
    try:
        rest = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return rest[0] != b"Z" and (start is None or int(rest[19]) == start)


@pytest.fixture
def where() -> Iterator[Where]:
    base = tempfile.mkdtemp(prefix="bpfs-emb-")
    w = Where(base, os.path.join(base, "mnt"), os.path.join(base, "state"), free_port())
    os.mkdir(w.mount)
    try:
        yield w
    finally:
        try:
            w.down()
        except subprocess.TimeoutExpired:
            pass
        if mounted(w.mount):
            subprocess.run(["fusermount3", "-u", "-z", w.mount], check=False)
        shutil.rmtree(base, ignore_errors=True)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def devices(pid: int | str, path: str) -> set[str]:
    """The device numbers of what is mounted at `path` in `pid`'s mount namespace."""
    return {line.split()[2] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            if line.split()[4] == path}


def test_up_detach_then_down(where: Where) -> None:
    hidden = Path(where.base, "master-only")
    hidden.mkdir()
    (hidden / "tool").write_text("only on the master\n")
    ok(where.up(3, "--hide", str(hidden)))
    rows = formats.parse_status(Path(where.mount, "status").read_text())
    assert [(r.number, r.state) for r in rows] == [(0, "up"), (1, "up"), (2, "up")]
    recs = where.records()
    assert set(recs) == {"master", "node-0", "node-1", "node-2"}
    daemons = {}
    (master,) = devices("self", where.mount)
    for n in range(3):
        info = formats.parse_info(Path(where.mount, f"nodes/{n}/info").read_text())
        assert info.facts.hostname == f"n{n}"
        d = daemons[n] = recs[f"node-{n}"][0]        # the daemon itself, PID 1 inside
        nspid = Path(f"/proc/{d}/status").read_text().split("NSpid:")[1].splitlines()[0]
        assert nspid.split() == [str(d), "1"]
        mounts = Path(f"/proc/{d}/mounts").read_text()
        assert " /scratch tmpfs " in mounts
        own = devices(d, where.mount)
        assert len(own) == 1 and master not in own, \
            "the node must not see the master's FUSE mount, only its own /bproc"
        assert os.listdir(f"/proc/{d}/root{hidden}") == []
    # each node's /scratch is its own
    Path(f"/proc/{daemons[0]}/root/scratch/mine").write_text("n0\n")
    assert not Path(f"/proc/{daemons[1]}/root/scratch/mine").exists()
    assert not Path("/scratch/mine").exists()
    assert (hidden / "tool").exists()

    out = ok(where.down())
    assert "stopped" in out
    assert not mounted(where.mount)
    for name, (pid, start) in recs.items():
        assert not alive(pid, start), f"{name} ({pid}) left running"
    for d in daemons.values():
        assert not alive(d)
    assert where.records() == {}
    assert "nothing is up" in ok(where.down())


def test_second_up_on_a_mount_that_is_up_is_ebusy(where: Where) -> None:
    ok(where.up(1))
    recs = where.records()
    r = where.up(1)
    assert r.returncode != 0
    assert "Device or resource busy" in r.stderr and where.mount in r.stderr
    assert "Traceback" not in r.stderr
    assert where.records() == recs and all(alive(*v) for v in recs.values())


def test_foreground_up_stops_everything_on_sigterm(where: Where) -> None:
    proc = subprocess.Popen(where.argv("up", "--nodes", "2", "--mount", where.mount,
                                       "--state-dir", where.state, "--port", str(where.port)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd="/")
    try:
        line = proc.stdout.readline()
        assert "cluster up" in line, proc.stderr.read() if proc.poll() is not None else line
        recs = where.records()
        assert len(recs) == 3 and mounted(where.mount)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) != 0
        assert not mounted(where.mount)
        assert not any(alive(*v) for v in recs.values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_that_cannot_start_says_why_and_leaves_nothing(where: Where) -> None:
    with socket.socket() as s:          # the master's port is taken
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", where.port))
        s.listen()
        t0 = time.monotonic()
        r = where.up(2, "--timeout", "20")
    assert r.returncode != 0 and time.monotonic() - t0 < 20
    assert "master" in r.stderr and "Traceback (most recent" not in r.stderr.splitlines()[0]
    assert not mounted(where.mount)
    assert where.records() == {}


def test_down_when_nothing_was_ever_up(where: Where) -> None:
    out = ok(where.down())
    assert "nothing is up" in out

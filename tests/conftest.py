"""Shared fixtures: the current source readable by every user, test users, embedded clusters.

Commands are run from a world-readable copy of this checkout's `bpfs` package, with
the interpreter running the tests (the /opt venv built from Debian's python), so
non-root users execute exactly the code under test even when the checkout lives
under /root, and nothing depends on what was installed before.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUNNER = "import sys; from importlib import import_module as m; sys.argv[0] = {name!r}; " \
         "sys.exit(m({module!r}).main())"
CLI_MODULES = {
    "bpfs": "bpfs.cli.bpfs_main", "bpslave": "bpfs.cli.bpslave", "bpstat": "bpfs.cli.bpstat", "bptop": "bpfs.cli.bptop",
    "bpctl": "bpfs.cli.bpctl", "bpsh": "bpfs.cli.bpsh", "bpcp": "bpfs.cli.bpcp",
    "bprsh": "bpfs.cli.bpsh.rsh", "bpmove": "bpfs.cli.bpmove",
}
# Writes argv[2] to the ctl file argv[1] through one O_RDWR handle, prints "ERRNO TEXT" with
# the handle's text read back (what a shell user sees with `exec 3<>ctl`).
CTL_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    os.write(fd, sys.argv[2].encode())
    err = 0
except OSError as e:
    err = e.errno
print(err, os.pread(fd, 4096, 0).decode().strip())
"""
USERS = ("bpfs-alice", "bpfs-bob", "bpfs-carol")
TEAM = "bpfs-team"          # alice is a member; bob and carol are not
OTHER_GROUP = "bpfs-other"  # carol is a member


def is_root() -> bool:
    return os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_executable(path: str) -> bool:
    """True if a non-root user could run `path` (every parent directory searchable)."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        if not os.stat(d).st_mode & 0o001:
            return False
    return True


@pytest.fixture(scope="session")
def src_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="bpfs-src-")
    shutil.copytree(ROOT / "bpfs", Path(d) / "bpfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, dirnames, filenames in os.walk(d):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def command(name: str) -> list[str]:
    """argv that runs CLI `name` from the package on PYTHONPATH."""
    return [PY, "-c", RUNNER.format(name=name, module=CLI_MODULES[name])]


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def _ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", name], check=True)


@pytest.fixture(scope="session")
def users() -> Iterator[dict[str, User]]:
    """Real non-root users (and two groups), removed at the end of the session."""
    if not is_root():
        pytest.skip("creating users needs root")
    if not world_executable(PY):
        pytest.skip(f"{PY} is not executable by other users; run the suite with /opt/bpfs/venv")
    created_users, created_groups = [], []
    for g in (TEAM, OTHER_GROUP):
        try:
            grp.getgrnam(g)
        except KeyError:
            _ensure_group(g)
            created_groups.append(g)
    extra = {"bpfs-alice": TEAM, "bpfs-carol": OTHER_GROUP}
    try:
        for u in USERS:
            try:
                pwd.getpwnam(u)
            except KeyError:
                cmd = ["useradd", "-M", "-N", "-s", "/bin/sh", "-d", "/nonexistent"]
                if u in extra:
                    cmd += ["-G", extra[u]]
                subprocess.run(cmd + [u], check=True)
                created_users.append(u)
        for u, g in extra.items():  # repair users an interrupted run left without their group
            if g not in [x.gr_name for x in grp.getgrall() if u in x.gr_mem]:
                subprocess.run(["usermod", "-a", "-G", g, u], check=True)
        out = {}
        for u in USERS:
            pw = pwd.getpwnam(u)
            groups = tuple(sorted(os.getgrouplist(u, pw.pw_gid)))
            out[u.removeprefix("bpfs-")] = User(u, pw.pw_uid, pw.pw_gid, groups)
        yield out
    finally:
        for u in created_users:
            subprocess.run(["userdel", u], check=False)
        for g in created_groups:
            subprocess.run(["groupdel", g], check=False)


def as_user(argv: Sequence[str], user: User | None) -> list[str]:
    if user is None:
        return list(argv)
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--", *argv]


@dataclass
class Cluster:
    """An embedded cluster started with `bpfs up --detach` on a temporary mount."""
    mount: str
    state_dir: str
    port: int
    nodes: int
    src: str
    env: dict = field(default_factory=dict)

    def run(self, name: str, *args: str, user: User | None = None, input: bytes | None = None,
            timeout: float = 30, check: bool = False, cwd: str | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run(as_user(command(name) + list(args), user), input=input,
                              capture_output=True, timeout=timeout, env=self.env, check=check,
                              cwd=cwd or "/")

    def sh(self, script: str, user: User | None = None, timeout: float = 30,
           input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a shell snippet the way a user would (cat, echo >, chmod ... on the mount)."""
        return subprocess.run(as_user(["sh", "-c", script], user), capture_output=True,
                              timeout=timeout, env=self.env, input=input, cwd="/")

    def read(self, rel: str) -> str:
        with open(os.path.join(self.mount, rel)) as f:
            return f.read()

    def wait_for(self, pred, timeout: float = 10, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def node_states(self) -> list[str]:
        return [self.read(f"nodes/{n}/status").strip() for n in range(self.nodes)]

    def up(self, extra: Sequence[str] = ()) -> None:
        r = self.run("bpfs", "up", "--nodes", str(self.nodes), "--mount", self.mount,
                     "--state-dir", self.state_dir, "--port", str(self.port),
                     "--ping-timeout", "2", "--detach", *extra, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"bpfs up failed ({r.returncode}):\n{r.stdout.decode()}"
                               f"\n{r.stderr.decode()}\n{self.logs()}")

    def down(self) -> subprocess.CompletedProcess:
        return self.run("bpfs", "down", "--mount", self.mount, "--state-dir", self.state_dir,
                        timeout=60)

    def logs(self) -> str:
        out = []
        for p in sorted(Path(self.state_dir).rglob("*.log")):
            out.append(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    """A failed test on a cluster shows the tails of its daemons' logs (they go with the
    cluster's state directory at teardown, and a failure seen once in a full run is
    otherwise left with nothing to read)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Cluster) and os.path.isdir(value.state_dir):
                rep.sections.append((f"cluster logs ({value.state_dir})", value.logs()))


def mounted(path: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


@pytest.fixture
def make_cluster(src_dir: str) -> Iterator:
    """Factory: make_cluster(nodes=3, extra=[...]) -> a running Cluster; all torn down after."""
    if not is_root():
        pytest.skip("the embedded cluster needs root (FUSE mount, namespaces)")
    made: list[Cluster] = []

    def make(nodes: int = 3, extra: Sequence[str] = ()) -> Cluster:
        c = _new_cluster(src_dir, nodes)
        made.append(c)
        c.up(extra)
        return c

    try:
        yield make
    finally:
        for c in made:
            _teardown(c)


def _new_cluster(src_dir: str, nodes: int) -> Cluster:
    """A Cluster (not yet up) on a fresh temporary mount point and state directory."""
    base = tempfile.mkdtemp(prefix="bpfs-test-")
    os.chmod(base, 0o755)
    mount, state = os.path.join(base, "mnt"), os.path.join(base, "state")
    os.mkdir(mount)
    os.mkdir(state)
    env = dict(os.environ, PYTHONPATH=src_dir, BPROC_MOUNT=mount, PYTHONDONTWRITEBYTECODE="1")
    return Cluster(mount, state, free_port(), nodes, src_dir, env)


def _teardown(c: Cluster) -> None:
    try:
        c.down()
    except subprocess.TimeoutExpired:
        pass
    if mounted(c.mount):
        subprocess.run(["fusermount3", "-u", "-z", c.mount], check=False)
    shutil.rmtree(os.path.dirname(c.mount), ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(src_dir: str, request) -> Iterator[Cluster]:
    """One 3-node cluster shared by a module's tests (tests must leave it as they found it)."""
    if not is_root():
        pytest.skip("the embedded cluster needs root (FUSE mount, namespaces)")
    c = _new_cluster(src_dir, 3)
    try:
        c.up()
        yield c
    finally:
        _teardown(c)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


__all__ = ["Cluster", "User", "command", "as_user", "free_port", "mounted", "pid_alive",
           "signal"]

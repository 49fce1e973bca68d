"""Execute-only binaries: what a user may run but not read stays unreadable on the node.

The kernel's rule (would_dump in fs/exec.c): a process whose executable or interpreter its
user may not read is non-dumpable, so that user cannot read its memory, maps or executable
through /proc (which is root's for such a process), nor attach a debugger. A migrated
process must keep that rule on the node, whether its file went by reference (the node has
the same file) or by content (the node was sent it and keeps it in its file cache), and
no copy of the content may be left on the node where the user could read it. A readable
binary stays dumpable, so its owner's gdb, strace and /proc keep working.

Each case runs `cat` copied as root into a directory, mode 0711 (or 0755 for the
readable counterpart): migrated with `bpsh 1 ./copy`, it echoes a line (it runs), is
probed while it waits, and exits 0 at the end of its input (it still ends normally).
The local premise and the readable counterparts passed before the fix as well: they show the
rule being kept and keep the fix from reaching too far; every other test here failed before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from bpfs import formats
from bpfs.migrate.filecache import hash_bytes
from tests.conftest import (CTL_WRITER, PY, Cluster, User, _new_cluster, _teardown, as_user,
                            command, is_root)

pytestmark = pytest.mark.timeout(120)

CACHE_DIR = "/var/cache/bpfs/node"  # bpfs.node.restorer.CACHE_DIR, inside the node's namespaces
ON_NODE = command("bpsh") + ["1"]   # argv prefix: run on node 1, where the processes under test run

# What a user sees of process argv[1] through /proc: each access "ok" or the errno's name,
# and the uid owning the files in /proc/PID (root's for a non-dumpable process; the
# directory itself keeps the real owner, task_dump_owner in fs/proc/base.c).
PROBE = r"""
import errno, json, os, sys
pid = sys.argv[1]
out = {"owner": os.stat(f"/proc/{pid}/mem").st_uid}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode[exc.errno]
def maps():
    open(f"/proc/{pid}/maps").read()
def mem():
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        start = int(open(f"/proc/{pid}/maps").readline().split("-")[0], 16)
        assert os.pread(fd, 4, start) == b"\x7fELF"
    finally:
        os.close(fd)
def exe():
    with open(f"/proc/{pid}/exe", "rb") as f:
        assert f.read(4) == b"\x7fELF"
attempt("maps", maps)
attempt("mem", mem)
attempt("exe", exe)
print(json.dumps(out))
"""
DENIED = {"maps": "EACCES", "mem": "EACCES", "exe": "EACCES"}
ALLOWED = {"maps": "ok", "mem": "ok", "exe": "ok"}


def probe(argv_prefix: list[str], pid: int, user: User, env: dict | None = None) -> dict:
    r = subprocess.run(as_user([*argv_prefix, PY, "-c", PROBE, str(pid)], user),
                       capture_output=True, timeout=60, env=env, cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def install(directory: str, name: str, mode: int, tag: str,
            source: str = "/usr/bin/cat") -> str:
    """`source` copied to directory/name, root's, with `mode`; `tag` appended (ignored by the
    loader) makes its content, so its hash and its cache entry, its own."""
    path = os.path.join(directory, name)
    shutil.copy(source, path)
    with open(path, "ab") as f:
        f.write(f"\0bpfs-test-{tag}-{os.urandom(8).hex()}".encode())
    os.chown(path, 0, 0)
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def dirs() -> Iterator[dict[str, str]]:
    """A directory every node sees and one hidden from the nodes (only the master has it)."""
    out = {"shared": tempfile.mkdtemp(prefix="bpfs-xonly-"),
           "hidden": tempfile.mkdtemp(prefix="bpfs-xonly-hidden-")}
    for d in out.values():
        os.chmod(d, 0o755)
    try:
        yield out
    finally:
        for d in out.values():
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def hcluster(src_dir: str, dirs: dict[str, str]) -> Iterator[Cluster]:
    if not is_root():
        pytest.skip("the embedded cluster needs root (FUSE mount, namespaces)")
    c = _new_cluster(src_dir, 2)
    try:
        c.up(["--hide", dirs["hidden"]])
        yield c
    finally:
        _teardown(c)


class Migrated:
    """`bpsh 1 BINARY` as `user`: running once it echoed a line; `finish` ends its input."""

    def __init__(self, c: Cluster, binary: str, user: User) -> None:
        self.c = c
        before = set(self._procs())
        self.p = subprocess.Popen(as_user(command("bpsh") + ["1", binary], user), env=c.env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd="/")
        try:
            self.p.stdin.write(b"running\n")
            self.p.stdin.flush()
            line = self.p.stdout.readline()
            assert line == b"running\n", (line, self.p.stderr.read() if self.p.poll() else "")
            new = set(self._procs()) - before
            assert len(new) == 1, new
            self.pid = new.pop()
        except BaseException:
            self.p.kill()
            self.p.wait()
            raise

    def _procs(self) -> list[int]:
        return formats.parse_pids(self.c.read("nodes/1/procs"))

    def finish(self) -> tuple[int, bytes]:
        try:
            out, err = self.p.communicate(b"bye\n", timeout=30)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        assert err == b"", err
        return self.p.returncode, out


def node_pid(c: Cluster, n: int) -> int:
    return int(Path(c.state_dir, "pids", f"node-{n}.pid").read_text().split()[0])


# ---- the rule on the master, as the kernel keeps it ----

def test_locally_alice_may_run_but_not_read_it(users, dirs) -> None:
    """The premise: the kernel's own view on the master, for both kinds of binary."""
    alice = users["alice"]
    xonly = install(dirs["shared"], "local-xonly", 0o711, "local-x")
    readable = install(dirs["shared"], "local-readable", 0o755, "local-r")
    assert subprocess.run(as_user(["cat", xonly], alice), capture_output=True).returncode != 0
    for binary, want, owner in ((xonly, DENIED, 0), (readable, ALLOWED, alice.uid)):
        # through a shell: setpriv itself execs with root's capabilities still effective
        # (PR_SET_KEEPCAPS), which makes the kernel find any file readable
        p = subprocess.Popen(as_user(["sh", "-c", 'exec "$0"', binary], alice),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            p.stdin.write(b"x\n")
            p.stdin.flush()
            assert p.stdout.readline() == b"x\n"
            assert probe([], p.pid, alice) == {"owner": owner, **want}
        finally:
            p.stdin.close()
            assert p.wait(10) == 0


# ---- on the node ----

@pytest.mark.parametrize("where", ["shared", "hidden"], ids=["by-reference", "by-content"])
def test_execute_only_binary_is_not_dumpable_on_the_node(hcluster: Cluster, users, dirs,
                                                         where: str) -> None:
    """Alice can read neither the remote process's memory nor maps nor executable: the files
    of /proc/PID on the node are root's, as on the master; the ghost stays unreadable too."""
    alice = users["alice"]
    binary = install(dirs[where], f"xonly-{where}", 0o711, where)
    m = Migrated(hcluster, binary, alice)
    try:
        assert probe(ON_NODE, m.pid, alice, hcluster.env) == {"owner": 0, **DENIED}
        assert probe([], m.pid, alice) == {"owner": 0, **DENIED}     # the ghost, on the master
        status = formats.parse_proc_status(hcluster.read(f"procs/{m.pid}/status"))
        assert status.uid == alice.uid          # still alice's process, only not dumpable
    finally:
        code, out = m.finish()
    assert (code, out) == (0, b"bye\n")


@pytest.mark.parametrize("where", ["shared", "hidden"], ids=["by-reference", "by-content"])
def test_readable_binary_stays_dumpable_on_the_node(hcluster: Cluster, users, dirs,
                                                    where: str) -> None:
    """What alice may read she may still debug: memory, maps and executable are hers."""
    alice = users["alice"]
    binary = install(dirs[where], f"readable-{where}", 0o755, where)
    m = Migrated(hcluster, binary, alice)
    try:
        assert probe(ON_NODE, m.pid, alice, hcluster.env) == \
            {"owner": alice.uid, **ALLOWED}
    finally:
        code, out = m.finish()
    assert (code, out) == (0, b"bye\n")


def test_no_user_readable_copy_of_execute_only_content_on_the_node(hcluster: Cluster, users,
                                                                   dirs) -> None:
    """The node's cache of received content keeps an execute-only file execute-only: no
    read bit for anyone but root, in a directory only root may enter; alice cannot read it
    by path on the node, and the copy still serves the next migration by reference."""
    alice = users["alice"]
    binary = install(dirs["hidden"], "xonly-cached", 0o711, "cached")
    digest = hash_bytes(Path(binary).read_bytes())
    for _ in range(2):                          # the second run maps the cached copy
        m = Migrated(hcluster, binary, alice)
        code, out = m.finish()
        assert (code, out) == (0, b"bye\n")
    root = f"/proc/{node_pid(hcluster, 1)}/root{CACHE_DIR}"
    name = digest.replace(":", "-")
    copy = os.path.join(root, name)
    assert os.stat(root).st_mode & 0o777 == 0o700 and os.stat(root).st_uid == 0
    st = os.stat(copy)
    assert (st.st_uid, st.st_mode & 0o044) == (0, 0), oct(st.st_mode)
    r = subprocess.run(as_user(ON_NODE + ["cat", f"{CACHE_DIR}/{name}"], alice),
                       capture_output=True, env=hcluster.env, timeout=60, cwd="/")
    assert r.returncode != 0 and r.stdout == b""


def test_execute_only_binary_started_by_exec_ctl_is_not_dumpable(hcluster: Cluster, users,
                                                                 dirs) -> None:
    """`exec` written to nodes/1/ctl: the master runs it as alice, the same rule holds."""
    alice = users["alice"]
    binary = install(dirs["shared"], "xonly-sleep", 0o711, "ctl", source="/usr/bin/sleep")
    r = subprocess.run(as_user([PY, "-c", CTL_WRITER, f"{hcluster.mount}/nodes/1/ctl",
                                f"exec {binary} 60\n"], alice),
                       capture_output=True, text=True, timeout=60, env=hcluster.env, cwd="/")
    err, _, text = r.stdout.strip().partition(" ")
    assert err == "0" and text.startswith("ok "), (r.stdout, r.stderr)
    pid = int(text.split()[1])
    try:
        hcluster.wait_for(lambda: pid in formats.parse_pids(hcluster.read("nodes/1/procs")),
                          10, f"{pid} to run on node 1")
        assert probe(ON_NODE, pid, alice, hcluster.env) == {"owner": 0, **DENIED}
    finally:
        with open(f"{hcluster.mount}/procs/{pid}/ctl", "w") as f:
            f.write("kill\n")


ECHO_C = r"""
#include <stdio.h>
int main(void) {
    char line[256];
    while (fgets(line, sizeof line, stdin)) { fputs(line, stdout); fflush(stdout); }
    return 0;
}
"""


def test_an_execute_only_interpreter_makes_it_not_dumpable_too(hcluster: Cluster, users,
                                                               dirs, tmp_path) -> None:
    """A readable program whose ELF interpreter alice may not read: the kernel's rule covers
    the interpreter (would_dump), and so does the node's copy of the process."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc is not available to build a program with its own interpreter")
    alice = users["alice"]
    interp = install(dirs["shared"], "ld-xonly.so", 0o711, "interp",
                     source=os.path.realpath("/lib64/ld-linux-x86-64.so.2"))
    binary = os.path.join(dirs["shared"], "echo-via-xonly-ld")
    src = tmp_path / "echo.c"
    src.write_text(ECHO_C)
    subprocess.run([gcc, "-O1", str(src), "-o", binary, f"-Wl,--dynamic-linker={interp}"],
                   check=True)
    os.chmod(binary, 0o755)
    m = Migrated(hcluster, binary, alice)
    try:
        assert probe(ON_NODE, m.pid, alice, hcluster.env) == {"owner": 0, **DENIED}
    finally:
        code, out = m.finish()
    assert (code, out) == (0, b"bye\n")

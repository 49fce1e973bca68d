"""`exec` written to nodes/N/ctl, end to end: the master runs the command as the writer,
migrates it, and keeps its output in procs/PID/stdout and stderr.

The writer is a small Python program run as the test user (setpriv), with the cwd and
environment the test gives it: it writes one line to the ctl file and reads the handle
back (`ok PID` or the error text), printing the write's errno first.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from bpfs import formats
from tests.conftest import CTL_WRITER, PY, Cluster, User, as_user

pytestmark = pytest.mark.timeout(120)

WRITER = CTL_WRITER


def exec_ctl(c: Cluster, node: int, line: str, user: User | None = None, cwd: str = "/",
             env: dict[str, str] | None = None) -> tuple[int, str]:
    """Write `line` to nodes/N/ctl as `user`: (errno, the handle's text)."""
    r = subprocess.run(as_user([PY, "-c", WRITER, f"{c.mount}/nodes/{node}/ctl", line], user),
                       capture_output=True, text=True, timeout=60, cwd=cwd,
                       env=env or c.env)
    assert r.returncode == 0, r.stderr
    err, _, text = r.stdout.strip().partition(" ")
    return int(err), text


def started(c: Cluster, node: int, line: str, **kw) -> int:
    err, text = exec_ctl(c, node, line, **kw)
    assert err == 0 and text.startswith("ok "), (err, text)
    return int(text.split()[1])


def read_to_eof(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def status(c: Cluster, pid: int) -> formats.ProcStatus:
    return formats.parse_proc_status(c.read(f"procs/{pid}/status"))


def gone(c: Cluster, pid: int) -> None:
    c.wait_for(lambda: not os.path.exists(f"{c.mount}/procs/{pid}"), 10,
               f"procs/{pid} to go once its output was read")


def test_hostname_output_then_eof_and_the_dir_goes(cluster: Cluster) -> None:
    pid = started(cluster, 2, "exec hostname\n")
    d = f"{cluster.mount}/procs/{pid}"
    assert sorted(os.listdir(d)) == ["ctl", "node", "signal", "stat", "status", "stderr", "stdout"]
    assert read_to_eof(f"{d}/stdout") == b"n2\n"
    assert read_to_eof(f"{d}/stderr") == b""
    st = status(cluster, pid)
    assert (st.node, st.cmd, st.state, st.exit) == (2, "hostname", "exited", "0")
    gone(cluster, pid)


def test_stderr_and_exit_status(cluster: Cluster) -> None:
    pid = started(cluster, 1, "exec sh -c 'echo err >&2; echo out; exit 3'")
    d = f"{cluster.mount}/procs/{pid}"
    assert read_to_eof(f"{d}/stderr") == b"err\n"
    assert read_to_eof(f"{d}/stdout") == b"out\n"
    assert status(cluster, pid).exit == "3"
    gone(cluster, pid)


def test_a_blocking_read_sees_output_produced_later(cluster: Cluster) -> None:
    pid = started(cluster, 0, "exec -- sh -c 'echo a; sleep 1; echo b'")
    fd = os.open(f"{cluster.mount}/procs/{pid}/stdout", os.O_RDONLY)
    try:
        t0 = time.monotonic()
        assert os.read(fd, 100) == b"a\n"
        assert status(cluster, pid).state == "running"
        assert os.read(fd, 100) == b"b\n"
        t1 = time.monotonic()
        assert os.read(fd, 100) == b""
        assert t1 - t0 > 0.5, "the second line came before it was written"
    finally:
        os.close(fd)
    assert read_to_eof(f"{cluster.mount}/procs/{pid}/stderr") == b""
    gone(cluster, pid)


def test_it_runs_as_the_writer_with_its_cwd_and_environment(cluster: Cluster, users) -> None:
    alice, bob = users["alice"], users["bob"]
    env = dict(cluster.env, BPFS_EXEC_VAR="from the writer")
    pid = started(cluster, 1, "exec sh -c 'id -u; id -g; id -G; pwd; echo \"$BPFS_EXEC_VAR\"'",
                  user=alice, cwd="/usr/share", env=env)
    d = f"{cluster.mount}/procs/{pid}"
    st = os.stat(d)
    assert (st.st_uid, st.st_gid) == (alice.uid, alice.gid)
    r = subprocess.run(as_user(["cat", f"{d}/stdout"], bob), capture_output=True, timeout=10)
    assert r.returncode != 0 and b"Permission denied" in r.stderr
    r = subprocess.run(as_user(["cat", f"{d}/stdout"], alice), capture_output=True, text=True,
                       timeout=30)
    groups = " ".join(str(g) for g in sorted(alice.groups, key=lambda g: g != alice.gid))
    assert r.stdout.splitlines() == [str(alice.uid), str(alice.gid), groups, "/usr/share",
                                     "from the writer"]
    assert read_to_eof(f"{d}/stderr") == b""
    assert (status(cluster, pid).uid, status(cluster, pid).exit) == (alice.uid, "0")
    gone(cluster, pid)


def test_refused_without_x_on_the_node(cluster: Cluster, users) -> None:
    bob = users["bob"]
    node = f"{cluster.mount}/nodes/1"
    try:
        os.chmod(node, 0o100)
        err, text = exec_ctl(cluster, 1, "exec hostname", user=bob)
        assert err == errno.EACCES and "permission" in text
        assert os.listdir(f"{cluster.mount}/procs") == []
    finally:
        os.chmod(node, 0o111)


@pytest.mark.parametrize("line, code, words", [
    ("exec", errno.EINVAL, "no command"),
    ("exec --", errno.EINVAL, "no command"),
    ("exec ''", errno.EINVAL, "command name is empty"),
    ("exec -- ''", errno.EINVAL, "command name is empty"),
    ("exec -v hostname", errno.EINVAL, "unknown option"),
    ("exec bpfs-no-such-command", errno.ENOENT, "bpfs-no-such-command: command not found"),
    ("exec /etc/passwd", errno.EACCES, "Permission denied"),
])
def test_errors_in_the_writes_errno_and_the_handles_text(cluster: Cluster, line: str,
                                                         code: int, words: str) -> None:
    err, text = exec_ctl(cluster, 0, line)
    assert err == code and words in text, (err, text)
    assert os.listdir(f"{cluster.mount}/procs") == []


def test_a_blocked_reader_is_interrupted_by_a_signal(cluster: Cluster) -> None:
    pid = started(cluster, 2, "exec sleep 30")
    d = f"{cluster.mount}/procs/{pid}"
    cat = subprocess.Popen(["cat", f"{d}/stdout"], stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert cat.poll() is None, "a read of stdout returned while the process runs"
        t0 = time.monotonic()
        cat.send_signal(signal.SIGTERM)
        assert cat.wait(5) == -signal.SIGTERM
        assert time.monotonic() - t0 < 1.0
    finally:
        if cat.poll() is None:
            cat.kill()
        cat.wait()
    with open(f"{d}/ctl", "w") as f:
        f.write("kill\n")
    assert read_to_eof(f"{d}/stdout") == b""
    assert read_to_eof(f"{d}/stderr") == b""
    assert status(cluster, pid).exit == "signal 9"
    gone(cluster, pid)


def test_nothing_is_left_behind(cluster: Cluster) -> None:
    pids = [started(cluster, n, "exec true") for n in range(cluster.nodes)]
    for pid in pids:
        for stream in ("stdout", "stderr"):
            assert read_to_eof(f"{cluster.mount}/procs/{pid}/{stream}") == b""
    cluster.wait_for(lambda: os.listdir(f"{cluster.mount}/procs") == [], 10, "procs/ to empty")
    master = int(open(f"{cluster.state_dir}/pids/master.pid").read().split()[0])
    children = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "--ppid", str(master)],
                              capture_output=True, text=True).stdout.splitlines()
    assert [c for c in children if "doorbell" not in c and "bpfs" not in c] == [], children

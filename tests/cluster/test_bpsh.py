"""bpsh end to end: real cluster, real migration, real signals, what a user sees.

The seeds' examples as written: `bpsh 2 hostname`, `bpsh 1 df -h`, `kill -9 PID` on
the master reaching the process on the node, redirections referring to master files.
The real process is found on its node through /proc's NSpid lines (same PID inside the
node's PID namespace as the ghost's on the master).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from bpfs import formats
from tests.conftest import Cluster, as_user, command, pid_alive

pytestmark = pytest.mark.timeout(120)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    return r.stdout.decode()


def bpsh(c: Cluster, *args: str, **kw) -> subprocess.CompletedProcess:
    return c.run("bpsh", *args, **kw)


def node_pid(c: Cluster, n: int) -> int:
    return int(open(os.path.join(c.state_dir, "pids", f"node-{n}.pid")).read().split()[0])


def real_process(c: Cluster, n: int, pid: int) -> int | None:
    """Host PID of the process that has PID `pid` inside node n's PID namespace."""
    ns = os.readlink(f"/proc/{node_pid(c, n)}/ns/pid")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{d}/ns/pid") != ns:
                continue
            for line in open(f"/proc/{d}/status"):
                if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                    return int(d)
        except OSError:
            continue
    return None


def proc_state(hostpid: int) -> str:
    return open(f"/proc/{hostpid}/stat").read().rsplit(")", 1)[1].split()[0]


class Background:
    """bpsh started in the background, the ghost's PID read from its first output line."""

    def __init__(self, c: Cluster, *args: str, user=None) -> None:
        self.p = subprocess.Popen(as_user(command("bpsh") + list(args), user), env=c.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        line = self.p.stdout.readline()
        assert line.strip().isdigit(), (line, self.p.stderr.read() if self.p.poll() else "")
        self.pid = int(line)
        # procs/PID exists from the capture on, before the program can print anything.

    def wait(self, timeout: float = 20) -> tuple[int, str]:
        try:
            out, err = self.p.communicate(timeout=timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        return self.p.returncode, err.decode()


def test_hostname_is_the_nodes(cluster: Cluster) -> None:
    assert ok(bpsh(cluster, "2", "hostname")) == "n2\n"


def test_df_shows_the_nodes_own_scratch(cluster: Cluster) -> None:
    marker = "bpfs-e2e-marker"
    ok(bpsh(cluster, "1", "sh", "-c", f"head -c 3000000 /dev/zero > /scratch/{marker}"))
    try:
        df1 = ok(bpsh(cluster, "1", "df", "-h", "/scratch"))
        assert "/scratch" in df1
        assert ok(bpsh(cluster, "1", "ls", "/scratch")).split() == [marker]
        assert marker not in ok(bpsh(cluster, "0", "ls", "/scratch"))
    finally:
        bpsh(cluster, "1", "rm", "-f", f"/scratch/{marker}")


def test_dollar_dollar_is_the_ghost_pid_that_ps_shows(cluster: Cluster) -> None:
    bg = Background(cluster, "2", "sh", "-c", "echo $$; exec sleep 30")

    def ps() -> list[str]:
        return subprocess.run(["ps", "-o", "pid=,ppid=,comm=,args=", "-p", str(bg.pid)],
                              capture_output=True, text=True).stdout.split(None, 3)
    try:
        seen = ps()
        assert int(seen[0]) == bg.pid and int(seen[1]) == bg.p.pid
        # the node's exec renames the ghost: sh's name until then, sleep's after (its
        # command line first, then its name: ps may come in between)
        assert (seen[2], seen[3].strip()) in (("sh", "sh -c echo $$; exec sleep 30"),
                                              ("sh", "sleep 30"),
                                              ("sleep", "sleep 30")), seen
        cluster.wait_for(lambda: ps()[2:] == ["sleep", "sleep 30\n"], timeout=5,
                         what="the ghost renamed by the exec on the node")
        assert real_process(cluster, 2, bg.pid) is not None
    finally:
        os.kill(bg.pid, signal.SIGKILL)
        bg.wait()


def test_a_program_only_the_master_has_runs_on_a_node(make_cluster) -> None:
    hidden = tempfile.mkdtemp(prefix="bpfs-hidden-")
    try:
        shutil.copy("/usr/bin/echo", os.path.join(hidden, "only-on-master"))
        os.chmod(hidden, 0o755)
        c = make_cluster(nodes=2, extra=["--hide", hidden])
        assert ok(bpsh(c, "1", "ls", "-a", hidden)).split() in ([".", ".."], [])
        assert ok(bpsh(c, "1", os.path.join(hidden, "only-on-master"), "from", "master")) \
            == "from master\n"
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def test_kill_9_on_the_master_kills_the_process_on_the_node(cluster: Cluster) -> None:
    bg = Background(cluster, "1", "sh", "-c", "echo $$; exec sleep 100")
    real = real_process(cluster, 1, bg.pid)
    assert real is not None
    os.kill(bg.pid, signal.SIGKILL)
    code, err = bg.wait()
    assert code == 255 and "Child process on node 1 exited abnormally" in err
    cluster.wait_for(lambda: not pid_alive(real), 5, "the real process to die on node 1")


def test_signal_file_reaches_the_process(cluster: Cluster) -> None:
    bg = Background(cluster, "1", "sh", "-c", "echo $$; exec sleep 100")
    real = real_process(cluster, 1, bg.pid)
    status = formats.parse_proc_status(cluster.read(f"procs/{bg.pid}/status"))
    assert (status.pid, status.node) == (bg.pid, 1)
    assert bg.pid in formats.parse_pids(cluster.read("nodes/1/procs"))
    ok(cluster.sh(f"/bin/echo 15 > {cluster.mount}/procs/{bg.pid}/signal"))
    code, err = bg.wait()
    assert code == 255
    cluster.wait_for(lambda: not pid_alive(real), 5, "the real process to end")
    cluster.wait_for(lambda: not os.path.exists(f"{cluster.mount}/procs/{bg.pid}"), 5,
                     "procs/PID to disappear")


def test_sigstop_and_sigcont_stop_and_continue_the_real_process(cluster: Cluster) -> None:
    bg = Background(cluster, "0", "sh", "-c", "echo $$; exec sleep 100")
    try:
        real = real_process(cluster, 0, bg.pid)
        os.kill(bg.pid, signal.SIGSTOP)
        cluster.wait_for(lambda: proc_state(real) == "T", 5, "the real process to stop")
        os.kill(bg.pid, signal.SIGCONT)
        cluster.wait_for(lambda: proc_state(real) == "S", 5, "the real process to continue")
    finally:
        os.kill(bg.pid, signal.SIGKILL)
        bg.wait()


@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 1", 1), ("exit 42", 42)])
def test_exit_codes_come_through(cluster: Cluster, script: str, code: int) -> None:
    assert bpsh(cluster, "1", "sh", "-c", script).returncode == code


def test_death_by_sigsegv_comes_through(cluster: Cluster) -> None:
    r = bpsh(cluster, "2", "sh", "-c", "kill -SEGV $$")
    assert r.returncode == 255
    assert "bpsh: Child process on node 2 exited abnormally." in r.stderr.decode()


def test_stdin_is_broadcast_to_every_node(cluster: Cluster) -> None:
    out = ok(bpsh(cluster, "-a", "cat", input=b"hi\n"))
    assert out == "hi\n" * cluster.nodes


def test_stdin_from_dev_null_is_the_nodes_dev_null_and_a_pipe_is_a_link(cluster: Cluster
                                                                          ) -> None:
    """bpsh's stdin /dev/null needs no link: the process reads the node's /dev/null (the
    same EOF); any other stdin is forwarded through a link (a socket on the node)."""
    bpsh_cmd = shlex.join(command("bpsh"))
    r = cluster.sh(f"{bpsh_cmd} 0,1 readlink /proc/self/fd/0 < /dev/null")
    assert ok(r) == "/dev/null\n" * 2
    r = cluster.sh(f"echo | {bpsh_cmd} 1 readlink /proc/self/fd/0")
    assert ok(r).startswith("socket:[")
    assert ok(cluster.sh(f"{bpsh_cmd} 1 cat < /dev/null; echo $?")) == "0\n"


def test_stdout_and_stderr_links_follow_what_they_are_on_the_master(cluster: Cluster,
                                                                    tmp_path) -> None:
    """/dev/null is the node's /dev/null; stdout and stderr that are one file here are one
    link there (fd 2 the same socket as fd 1, as 2>&1), separate files separate links."""
    b = shlex.join(command("bpsh"))
    fds = 'echo "$(readlink /proc/$$/fd/1 /proc/$$/fd/2)"'    # the shell's own fds
    ok(cluster.sh(f"{b} 1 sh -c '{fds} > /scratch/fds' > /dev/null 2>&1"))
    assert ok(cluster.sh(f"{b} 1 cat /scratch/fds")) == "/dev/null\n/dev/null\n"
    r = cluster.sh(f"{b} 1 sh -c '{fds} >&2' > /dev/null")
    assert r.returncode == 0 and r.stdout == b""
    out, err = r.stderr.decode().splitlines()
    assert out == "/dev/null" and err.startswith("socket:[")
    log = tmp_path / "log"
    ok(cluster.sh(f"{b} -p 0,1 sh -c '{fds}; echo err >&2; echo end' > {log} 2>&1"))
    lines = log.read_text().splitlines()
    for n in (0, 1):
        one, two, e, end = [ln[5:] for ln in lines if ln.startswith(f"  {n}: ")]
        assert one == two and one.startswith("socket:[") and (e, end) == ("err", "end")
    r = cluster.sh(f"{b} 1 sh -c '{fds}'")
    one, two = ok(r).splitlines()
    assert one != two and one.startswith("socket:[") and two.startswith("socket:[")


def test_all_stdio_on_dev_null_still_gives_the_exit_status(cluster: Cluster) -> None:
    """Nothing to forward: bpsh becomes the ghost itself (as with -N), one node or many."""
    b = shlex.join(command("bpsh"))
    for nodes in ("1", "0,1"):
        r = cluster.sh(f"{b} {nodes} sh -c 'exit 42' </dev/null >/dev/null 2>&1; echo $?")
        assert ok(r) == "42\n"


def test_redirections_are_master_files_50mb_byte_for_byte(cluster: Cluster, tmp_path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(os.urandom(50 * 1024 * 1024))
    r = cluster.sh(f"{shlex.join(command('bpsh'))} 2 cat < {src} > {dst}", timeout=60)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_cwd_is_kept_by_name_or_falls_back_to_root(make_cluster, tmp_path) -> None:
    hidden = tempfile.mkdtemp(prefix="bpfs-hidden-")
    try:
        os.chmod(hidden, 0o755)
        c = make_cluster(nodes=2, extra=["--hide", hidden])
        assert ok(bpsh(c, "1", "pwd", cwd="/usr/share")) == "/usr/share\n"
        os.makedirs(os.path.join(hidden, "sub"))
        assert ok(bpsh(c, "1", "pwd", cwd=os.path.join(hidden, "sub"))) == "/\n"
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def test_environment_arrives_with_rank_and_progname(cluster: Cluster) -> None:
    env = dict(cluster.env, BPFS_TEST_VAR="carried over")
    r = subprocess.run(command("bpsh") + ["1,0", "sh", "-c", 'echo "$BPFS_TEST_VAR $BPROC_RANK"'],
                       env=env, capture_output=True, timeout=30)
    lines = sorted(ok(r).splitlines())
    assert lines == ["carried over 0000000", "carried over 0000001"]


def test_a_user_without_x_gets_permission_denied_and_nothing_runs(cluster: Cluster,
                                                                  users) -> None:
    bob = users["bob"]
    node = f"{cluster.mount}/nodes/1"
    try:
        ok(cluster.sh(f"chmod 0100 {node}"))
        r = bpsh(cluster, "1", "sh", "-c", "echo ran", user=bob)
        assert r.returncode != 0
        assert "1: Permission denied" in r.stderr.decode()
        assert b"ran" not in r.stdout
        assert os.listdir(f"{cluster.mount}/procs") == []
    finally:
        ok(cluster.sh(f"chmod 0111 {node}"))


def test_a_users_process_runs_as_that_user(cluster: Cluster, users) -> None:
    alice = users["alice"]
    local = subprocess.run(as_user(["id"], alice), capture_output=True, text=True).stdout
    assert ok(bpsh(cluster, "1", "id", user=alice)) == local


def test_another_user_cannot_signal_the_process(cluster: Cluster, users) -> None:
    alice, bob = users["alice"], users["bob"]
    bg = Background(cluster, "1", "sh", "-c", "echo $$; exec sleep 100", user=alice)
    try:
        st = os.stat(f"{cluster.mount}/procs/{bg.pid}")
        assert (st.st_uid, st.st_gid) == (alice.uid, alice.gid)
        r = cluster.sh(f"/bin/echo 9 > {cluster.mount}/procs/{bg.pid}/signal", user=bob)
        assert r.returncode != 0 and "Operation not permitted" in r.stderr.decode()
        r = cluster.sh(f"kill -9 {bg.pid}", user=bob)
        assert r.returncode != 0
        assert real_process(cluster, 1, bg.pid) is not None
        ok(cluster.sh(f"/bin/echo KILL > {cluster.mount}/procs/{bg.pid}/signal", user=alice))
        code, _ = bg.wait()
        assert code == 255
    finally:
        if pid_alive(bg.pid):
            os.kill(bg.pid, signal.SIGKILL)
        bg.wait()


def test_killing_a_node_daemon_kills_its_ghosts_and_bpsh_returns(make_cluster) -> None:
    c = make_cluster(nodes=2)
    bg = Background(c, "1", "sh", "-c", "echo $$; exec sleep 100")
    os.kill(node_pid(c, 1), signal.SIGKILL)
    code, _ = bg.wait(timeout=15)
    assert code != 0
    assert not pid_alive(bg.pid)


def test_nothing_is_left_behind(cluster: Cluster) -> None:
    ok(bpsh(cluster, "-a", "true"))
    cluster.wait_for(lambda: os.listdir(f"{cluster.mount}/procs") == [], 5, "procs/ to empty")
    zombies = subprocess.run(["ps", "-eo", "stat=,ppid=,pid="], capture_output=True,
                             text=True).stdout.split("\n")
    mine = [z for z in zombies if z.startswith("Z") and int(z.split()[1]) == os.getpid()]
    assert mine == []


def test_bpcp_copies_to_a_node_and_back_byte_for_byte(cluster: Cluster, tmp_path) -> None:
    src, back = tmp_path / "src", tmp_path / "back"
    src.write_bytes(os.urandom(5 * 1024 * 1024))
    try:
        ok(cluster.run("bpcp", str(src), "1:/scratch/bpcp-copy", timeout=60))
        assert ok(bpsh(cluster, "1", "stat", "-c", "%s", "/scratch/bpcp-copy")) == \
            f"{5 * 1024 * 1024}\n"
        assert "bpcp-copy" not in ok(bpsh(cluster, "0", "ls", "/scratch"))
        ok(cluster.run("bpcp", "1:/scratch/bpcp-copy", str(back), timeout=60))
        assert back.read_bytes() == src.read_bytes()
    finally:
        bpsh(cluster, "1", "rm", "-f", "/scratch/bpcp-copy")


def test_kill_9_right_after_start_always_reaches_the_node(cluster: Cluster) -> None:
    """The ghost killed while the node may still be restoring: the node's answer must not
    be lost (it once was, 1 run in 30, leaving the real process and bpsh running)."""
    for _ in range(20):
        p = subprocess.Popen(command("bpsh") + ["1", "sh", "-c", "echo $$; exec sleep 100"],
                             env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            os.kill(int(p.stdout.readline()), signal.SIGKILL)
            p.communicate(timeout=10)
            assert p.returncode == 255
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    cluster.wait_for(lambda: os.listdir(f"{cluster.mount}/procs") == [], 5, "procs/ to empty")

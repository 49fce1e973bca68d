"""libbproc, in Python (bpfs.libbproc) and in C (bproc.h, libbproc.so), on a real
embedded cluster: the questions on the master and, through bpsh, on a node; execmove and
vexecmove running /bin/hostname on nodes with its output back on the caller's stdout;
BProc's errno values for refusals; move, rfork and vrfork to the caller's own node (no
move: plain forks). Moves to other nodes: tests/cluster/test_libbproc_move.py.

The C library is built from the checkout by libbproc/build, the script bootstrap's
install step runs, into a temporary directory; a C program (bproc_calls.c) is compiled
against it with -I, -L and -lbproc.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, Cluster, command

pytestmark = pytest.mark.timeout(120)

BE_INVALIDNODE, BE_NODEDOWN = 300, 301
HERE = Path(__file__).resolve().parent


def build_libbproc(out: Path) -> tuple[Path, Path]:
    """libbproc.so and bproc.h into out/lib and out/include, as bootstrap installs them."""
    lib, inc = out / "lib", out / "include"
    subprocess.run([str(ROOT / "libbproc" / "build"), str(lib), str(inc)],
                   check=True, capture_output=True, timeout=60)
    return lib, inc


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> str:
    """bproc_calls.c compiled against a fresh libbproc (rpath: no ldconfig needed)."""
    out = tmp_path_factory.mktemp("libbproc")
    os.chmod(out, 0o755)
    lib, inc = build_libbproc(out)
    prog = out / "bproc_calls"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", f"-I{inc}", str(HERE / "bproc_calls.c"),
                    "-o", str(prog), f"-L{lib}", "-lbproc", f"-Wl,-rpath,{lib}"],
                   check=True, capture_output=True, timeout=60)
    return str(prog)


def py(c: Cluster, script: str, *, node: int | None = None, timeout: float = 30
       ) -> subprocess.CompletedProcess:
    """Run a Python snippet with bpfs.libbproc imported as `lb`, here or through bpsh."""
    argv = [PY, "-c", "from bpfs import libbproc as lb\n" + script]
    if node is not None:
        argv = command("bpsh") + [str(node)] + argv
    # PYTHONUNBUFFERED would make each print a write per word, and the snippet shares its
    # stdout with what it launches: its lines could interleave with theirs
    env = {k: v for k, v in c.env.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(argv, env=env, capture_output=True, timeout=timeout, cwd="/")


def run(c: Cluster, argv: list[str], *, node: int | None = None, timeout: float = 30
        ) -> subprocess.CompletedProcess:
    if node is not None:
        argv = command("bpsh") + [str(node)] + argv
    return subprocess.run(argv, env=c.env, capture_output=True, timeout=timeout, cwd="/")


def out(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    return r.stdout.decode()


def node_address(c: Cluster, n: int) -> str:
    """The address node `n` registered from (its info file's `address`)."""
    for line in c.read(f"nodes/{n}/info").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "address":
            return value.strip()
    raise AssertionError(f"node {n} has no address")


def fields(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}


# ---- Python ------------------------------------------------------------------------

def test_python_questions_on_the_master(cluster: Cluster) -> None:
    r = py(cluster, "print(lb.currnode(), lb.numnodes(), lb.nodestatus(0), lb.nodestatus(-1),"
                    " lb.nodeaddr(1), lb.nodenumber(lb.nodeaddr(1)) >= 0, lb.access(2),"
                    " lb.getnodebyname('n2'), lb.getnodebyname('master'))")
    addr = node_address(cluster, 1)
    assert out(r).split() == ["-1", "3", "up", "up", addr, "True", "None", "2", "-1"]


def test_python_refusals_carry_bprocs_errno(cluster: Cluster) -> None:
    r = py(cluster, """
for call in (lambda: lb.nodestatus(99), lambda: lb.nodeaddr(99), lambda: lb.access(99),
             lambda: lb.execmove(99, '/bin/true', ['true']),
             lambda: lb.execmove(1, '/no/such/program', ['x'])):
    try:
        call()
    except OSError as e:
        print(e.errno, e.strerror)
""")
    assert out(r).splitlines() == [
        f"{BE_INVALIDNODE} Invalid node number"] * 4 + [f"{errno.ENOENT} {os.strerror(errno.ENOENT)}"]


def test_python_on_a_node_knows_its_node_and_the_cluster(cluster: Cluster) -> None:
    """A node's processes see /bproc (served by the master through their node): the same
    answers as on the master, and `self` is their node."""
    r = py(cluster, "print(lb.currnode(), lb.numnodes(), lb.nodestatus(2))", node=1)
    assert out(r).split() == ["1", "3", "up"]


def test_python_execmove_runs_hostname_on_node_1(cluster: Cluster) -> None:
    r = py(cluster, "import os; lb.execmove(1, '/bin/hostname', ['hostname'], dict(os.environ))")
    assert out(r) == "n1\n"


def test_python_execmove_from_a_node_runs_on_another(cluster: Cluster) -> None:
    """From node 1 the request goes to the master through the node's /bproc; the caller
    stands in for the program (bpfs/standin.py): its exit status is the program's."""
    r = py(cluster, "lb.execmove(2, '/bin/sh', ['sh', '-c', 'hostname; exit 5'])", node=1)
    assert (r.returncode, r.stdout) == (5, b"n2\n"), r.stderr


def test_python_vexecmove_from_a_node_each_rank_has_its_stand_in(cluster: Cluster) -> None:
    """From node 1 every rank is a child of the caller there, standing in for its program
    on its node: the caller's waitpid gets each program's exit status."""
    r = py(cluster, """
import os
pids = lb.vexecmove([0, 2, 1], '/bin/sh', ['sh', '-c', 'echo $BPROC_RANK $(hostname); exit $((BPROC_RANK + 3))'])
print('statuses', *[os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids], flush=True)
""", node=1)
    assert sorted(out(r).splitlines()) == ["0000000 n0", "0000001 n2", "0000002 n1",
                                           "statuses 3 4 5"]


def test_python_execmove_exit_status_is_the_remote_ones(cluster: Cluster) -> None:
    r = py(cluster, "lb.execmove(2, '/bin/sh', ['sh', '-c', 'hostname >&2; exit 7'])")
    assert (r.returncode, r.stdout) == (7, b"n2\n")     # stderr goes with stdout, as BProc's


def test_python_vexecmove_starts_children_on_each_node(cluster: Cluster) -> None:
    r = py(cluster, """
import os
pids = lb.vexecmove([0, 1, 2, 1], '/bin/sh', ['sh', '-c', 'echo $BPROC_RANK $(hostname)'])
statuses = [os.waitpid(p, 0)[1] for p in pids]
print('statuses', *statuses, flush=True)
""")
    lines = sorted(out(r).splitlines())
    assert lines == ["0000000 n0", "0000001 n1", "0000002 n2", "0000003 n1",
                     "statuses 0 0 0 0"]


def test_python_vexecmove_one_node_down_the_others_run(cluster: Cluster) -> None:
    assert out(cluster.run("bpctl", "-S", "2", "-s", "unavailable")) == ""
    try:
        r = py(cluster, """
import os
pids = lb.vexecmove([0, 2], '/bin/hostname', ['hostname'])
print('pids', pids[0] > 0, pids[1])
os.waitpid(pids[0], 0)
""")
        assert sorted(out(r).splitlines()) == ["n0", f"pids True {-BE_NODEDOWN}"]
    finally:
        cluster.run("bpctl", "-S", "2", "-s", "up")


def test_python_move_to_where_it_is_is_none(cluster: Cluster) -> None:
    """BProc: a move to the caller's own node is none, an rfork or vrfork there a plain
    fork (no master's move needed: tests/cluster/test_libbproc_move.py has the others)."""
    r = py(cluster, """
import os
print(lb.move(-1), lb.move(-2), lb.currnode(), flush=True)
pid = lb.rfork(-1)
if pid == 0:
    os._exit(4)
n, pids = lb.vrfork([-2, -1])
if not pids:
    os._exit(5 + n)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), n,
      *[os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids])
""")
    assert out(r).splitlines() == ["None None -1", "4 2 5 6"]


# ---- C -------------------------------------------------------------------------------

def test_c_questions_on_the_master(cluster: Cluster, calls: str) -> None:
    f = fields(out(run(cluster, [calls, "info", "1"])))
    assert f["currnode"] == ["-1"]
    assert f["numnodes"] == ["3", "0"]
    assert f["nodestatus"] == ["2", "up", "0"]
    assert f["nodeaddr"] == [node_address(cluster, 1), "16"]
    assert int(f["nodenumber"][0]) >= 0
    assert f["access"][0] == "0"
    assert f["strerror"] == ["Node", "is", "down"]
    f = fields(out(run(cluster, [calls, "info", "99"])))
    assert f["nodestatus"] == ["-1", "-", str(BE_INVALIDNODE)]
    assert f["access"] == ["-1", str(BE_INVALIDNODE)]


def test_c_questions_on_a_node(cluster: Cluster, calls: str) -> None:
    f = fields(out(run(cluster, [calls, "info", "1"], node=2)))
    assert f["currnode"] == ["2"]
    assert f["numnodes"] == ["3", "0"]
    assert f["nodestatus"] == ["2", "up", "0"]


def test_c_names_agree_with_python(calls: str) -> None:
    from bpfs.libbproc import getnodebyname
    names = ["5", "n5", ".5", "master", "-1", "self", "n", "", "x5", "5x", "n-1", "007"]
    r = subprocess.run([calls, "names", *names], capture_output=True, timeout=10)
    got = [line.rsplit(" ", 1)[1] for line in out(r).splitlines()]
    assert got == [str(getnodebyname(n)) for n in names]
    assert got[:6] == ["5", "5", "5", "-1", "-1", "-2"]


def test_c_execmove_runs_hostname_on_node_1(cluster: Cluster, calls: str) -> None:
    assert out(run(cluster, [calls, "execmove", "1", "/bin/hostname", "hostname"])) == "n1\n"


def test_c_execmove_refusals(cluster: Cluster, calls: str) -> None:
    r = run(cluster, [calls, "execmove", "99", "/bin/hostname", "hostname"])
    assert (r.returncode, r.stdout) == (1, f"execmove {BE_INVALIDNODE} Invalid node number\n"
                                        .encode())
    r = run(cluster, [calls, "execmove", "1", "/no/such", "x"])
    assert r.stdout.decode().split()[:2] == ["execmove", str(errno.ENOENT)]


def test_c_execmove_from_a_node_runs_on_another(cluster: Cluster, calls: str) -> None:
    """The C twin of the Python stand-in (libbproc/standin.c): the caller on node 1
    stands in for the program on node 2 and ends with its exit status."""
    r = run(cluster, [calls, "execmove", "2", "/bin/sh", "sh", "-c", "hostname; exit 5"],
            node=1)
    assert (r.returncode, r.stdout) == (5, b"n2\n"), r.stderr


def test_c_vexecmove_from_a_node(cluster: Cluster, calls: str) -> None:
    r = run(cluster, [calls, "vexecmove", "0,2", "/bin/sh", "sh", "-c",
                      'hostname; exit $((BPROC_RANK + 3))'], node=1)
    lines = out(r).splitlines()
    assert sorted(line for line in lines if line.startswith("n")) == ["n0", "n2"]
    ranks = [line.split() for line in lines if line.startswith("rank")]
    assert [(k, ok, int(st) >> 8) for _, k, ok, st in ranks] == [("0", "1", 3), ("1", "1", 4)]


def test_c_vexecmove_ranks_and_their_exits(cluster: Cluster, calls: str) -> None:
    r = run(cluster, [calls, "vexecmove", "0,1,2", "/bin/sh", "sh", "-c",
                      'hostname; exit $((BPROC_RANK + 3))'])
    lines = out(r).splitlines()
    assert sorted(line for line in lines if line.startswith("n")) == ["n0", "n1", "n2"]
    ranks = [line.split() for line in lines if line.startswith("rank")]
    assert [(k, ok, int(st) >> 8) for _, k, ok, st in ranks] == [
        ("0", "1", 3), ("1", "1", 4), ("2", "1", 5)]
    assert "vexecmove 3 0" in lines


def test_c_move_to_where_it_is_is_none(cluster: Cluster, calls: str) -> None:
    f = fields(out(run(cluster, [calls, "samenode"])))
    assert f["move"] == f["move-self"] == ["0", "0"]
    assert f["rfork"] == ["1", "4"]
    assert f["vrfork"] == ["2", "1", "5", "1", "6"]


def test_access_and_execmove_follow_the_nodes_acl(cluster: Cluster, users) -> None:
    """A node whose x bits leave a user out: bproc_access says EACCES, and so does
    execmove, before anything runs; the owner (root) still may."""
    from tests.conftest import as_user
    node2 = os.path.join(cluster.mount, "nodes", "2")
    mode = os.stat(node2).st_mode & 0o777
    os.chmod(node2, 0o100)
    try:
        script = """from bpfs import libbproc as lb
for call in (lambda: lb.access(2), lambda: lb.execmove(2, '/bin/true', ['true'])):
    try:
        print(call())
    except OSError as e:
        print(e.errno)
print(lb.access(1))"""
        r = subprocess.run(as_user([PY, "-c", script], users["bob"]), env=cluster.env,
                           capture_output=True, timeout=30, cwd="/")
        assert out(r).split() == [str(errno.EACCES)] * 2 + ["None"]
    finally:
        os.chmod(node2, mode)


def test_python_vexecmove_with_stdout_on_dev_null_and_pidnode(cluster: Cluster) -> None:
    """Nothing to forward, yet the ranks come (the forwarder gets the master's ranks link);
    while the ranks run, pidnode says where each one is."""
    r = py(cluster, """
import os, sys
null = os.open('/dev/null', os.O_WRONLY)
saved = os.dup(1)
os.dup2(null, 1)
pids = lb.vexecmove([1, 2], '/bin/sleep', ['sleep', '1'])
os.dup2(saved, 1)
print(*[lb.pidnode(p) for p in pids], lb.pidnode(os.getpid()))
print(*[os.waitpid(p, 0)[1] for p in pids])
""")
    assert out(r).splitlines() == ["1 2 -1", "0 0"]


def test_python_vexecmove_with_the_master_among_the_nodes(cluster: Cluster) -> None:
    """The master's rank is a plain fork and execve here (BProc: no move to where we are),
    the node's goes through its own request; both are the caller's children."""
    r = py(cluster, """
import os
pids = lb.vexecmove([-1, 1], '/bin/sh', ['sh', '-c', 'echo $BPROC_RANK $(hostname)'])
print('statuses', *[os.waitpid(p, 0)[1] for p in pids], flush=True)
""")
    lines = sorted(out(r).splitlines())
    assert lines == [f"0000000 {os.uname().nodename}", "0000001 n1", "statuses 0 0"]


def test_a_user_execmoves_where_the_acl_lets_them(cluster: Cluster, users) -> None:
    from tests.conftest import as_user
    script = "from bpfs import libbproc as lb; lb.execmove(1, '/bin/sh', ['sh', '-c', 'id -u; hostname'])"
    r = subprocess.run(as_user([PY, "-c", script], users["bob"]), env=cluster.env,
                       capture_output=True, timeout=30, cwd="/")
    assert out(r).split() == [str(users["bob"].uid), "n1"]


def test_a_program_that_may_not_migrate_says_why(cluster: Cluster) -> None:
    """The master refuses a set-user-ID program after its execve: the caller, now the
    ghost, ends with 255 and the forwarder writes the master's reason on its stderr."""
    r = py(cluster, "lb.execmove(1, '/usr/bin/passwd', ['passwd', '--help'])")
    assert r.returncode == 255
    assert b"bproc: " in r.stderr and b"set-user-ID" in r.stderr


def test_c_execmove_output_is_never_lost(cluster: Cluster, calls: str) -> None:
    """A program that ends at once: its ghost may end before the forwarder has accepted
    its link (the node connected it before the program ran); the output still comes."""
    for n in range(12):
        r = run(cluster, [calls, "execmove", str(n % 3), "/bin/echo", "echo", f"run {n}"])
        assert out(r) == f"run {n}\n"

"""libbproc's calls that move running processes, in Python (bpfs.libbproc.moves) and in C
(bproc.h, libbproc.so; tests/cluster/bproc_move.c), on a real embedded cluster: move
there and back with the memory kept, rfork with a ghost on the master and the remote
exit status, vrfork to three nodes, refusals as BProc's errno with nothing left behind,
a plain user and a node's ACL.

They need the master's `move N` on procs/P/ctl (issue 15); a master that answers
"unknown control message 'move'" skips them (`served`). The C library's refusals without
a master are checked here too (Python's: tests/unit/test_libbproc_moves.py).
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.cluster import test_libbproc
from tests.cluster.test_libbproc import build_libbproc, out, run
from tests.conftest import CTL_WRITER, PY, Cluster, as_user, command

pytestmark = pytest.mark.timeout(180)
served = pytest.mark.usefixtures("move_served")

BE_INVALIDNODE, BE_NODEDOWN = 300, 301
HERE = os.path.dirname(os.path.abspath(__file__))
# One write per line: the processes of a test share one pipe, and the tests may run
# with PYTHONUNBUFFERED (a print is then a write per word).
SAY = "import os as _os\ndef say(*words):\n    _os.write(1, (' '.join(map(str, words)) + '\\n').encode())\n"


def py(c: Cluster, script: str, **kw) -> subprocess.CompletedProcess:
    return test_libbproc.py(c, SAY + script, **kw)


@pytest.fixture(scope="module")
def move_served(cluster: Cluster) -> None:
    """Skip unless the master knows `move`: a bare `move` (no node) written to the ctl
    of a process bpsh runs on node 1 is refused for its arguments, not as unknown."""
    p = subprocess.Popen(command("bpsh") + ["1", "sh", "-c", "echo $$; exec sleep 60"],
                         env=cluster.env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         cwd="/")
    try:
        assert p.stdout is not None
        pid = int(p.stdout.readline())
        ctl = os.path.join(cluster.mount, "procs", str(pid), "ctl")
        r = subprocess.run([PY, "-c", CTL_WRITER, ctl, "move\n"], capture_output=True,
                           timeout=30)
        answer = r.stdout.decode()
        subprocess.run([PY, "-c", CTL_WRITER, ctl, "kill\n"], capture_output=True, timeout=30)
    finally:
        p.kill()
        p.wait(timeout=30)
    if "unknown control message" in answer:
        pytest.skip(f"the master does not serve `move` yet: {answer.strip()}")


@pytest.fixture
def own(make_cluster) -> Cluster:
    """A cluster of its own, for a test whose process moves itself (bproc_move): if such
    a move hangs a daemon, the nodes it takes down are that test's only."""
    return make_cluster()


@pytest.fixture(scope="module")
def mover(tmp_path_factory) -> str:
    """bproc_move.c compiled against a fresh libbproc (rpath: no ldconfig needed)."""
    outdir = tmp_path_factory.mktemp("libbproc-move")
    os.chmod(outdir, 0o755)
    lib, inc = build_libbproc(outdir)
    prog = outdir / "bproc_move"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", f"-I{inc}",
                    os.path.join(HERE, "bproc_move.c"), "-o", str(prog), f"-L{lib}", "-lbproc",
                    f"-Wl,-rpath,{lib}"], check=True, capture_output=True, timeout=60)
    return str(prog)


# ---- Python --------------------------------------------------------------------------

MOVES = """
import hashlib, os
data = bytearray(os.urandom(1 << 20)) * 8
digest, pid, count = hashlib.sha256(data).hexdigest(), os.getpid(), 0
for n in NODES:
    count += 1
    try:
        lb.move(n)
    except OSError as e:
        say('refused', n, e.errno, e.filename)
        break
    say('moved', n, lb.currnode(), lb.pidnode(pid), hashlib.sha256(data).hexdigest() == digest,
        count, os.getpid() == pid)
"""


@served
def test_python_move_from_a_bpsh_started_program_and_back(own: Cluster) -> None:
    """Started on node 1 by bpsh: to node 2, to the master (no ghost then), to node 0;
    its memory and variables come along, its PID stays, its output reaches bpsh."""
    r = py(own, MOVES.replace("NODES", "(2, -1, 0)"), node=1, timeout=45)
    assert out(r).splitlines() == ["moved 2 2 2 True 1 True", "moved -1 -1 -1 True 2 True",
                                   "moved 0 0 0 True 3 True"]


@served
def test_python_move_from_the_master_and_back(own: Cluster) -> None:
    r = py(own, MOVES.replace("NODES", "(1, -1)"), timeout=45)
    assert out(r).splitlines() == ["moved 1 1 1 True 1 True", "moved -1 -1 -1 True 2 True"]


@served
def test_python_rfork_child_runs_on_the_node_under_a_ghost(cluster: Cluster) -> None:
    """The child returns 0 on node 1; the parent gets its PID (a ghost here: /proc has
    it), pidnode says node 1, and waitpid gives the child's exit status."""
    r = py(cluster, """
import os, time
pid = lb.rfork(1)
if pid == 0:
    say('child', lb.currnode())
    time.sleep(1)
    os._exit(7)
say('parent', lb.pidnode(pid), os.path.exists(f'/proc/{pid}'))
say('status', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
""", timeout=120)
    assert sorted(out(r).splitlines()) == ["child 1", "parent 1 True", "status 7"]


@served
def test_python_rfork_to_a_down_or_missing_node_leaves_no_child(cluster: Cluster) -> None:
    assert out(cluster.run("bpctl", "-S", "2", "-s", "unavailable")) == ""
    try:
        r = py(cluster, """
import os
for n in (2, 99, -7):
    try:
        if lb.rfork(n) == 0:
            os._exit(0)
        say('forked', n)
    except OSError as e:
        say(n, e.errno, e.strerror)
try:
    os.waitpid(-1, os.WNOHANG)
    say('a child is left')
except ChildProcessError:
    say('no child')
""", timeout=120)
    finally:
        cluster.run("bpctl", "-S", "2", "-s", "up")
    assert out(r).splitlines() == [f"2 {BE_NODEDOWN} Node is down",
                                   f"99 {BE_INVALIDNODE} Invalid node number",
                                   f"-7 {BE_INVALIDNODE} Invalid node number", "no child"]


@served
def test_python_vrfork_to_three_nodes(cluster: Cluster) -> None:
    r = py(cluster, """
import os
n, pids = lb.vrfork([0, 1, 2])
if not pids:
    say('child', n, lb.currnode())
    os._exit(10 + n)
say('parent', n, *[p > 0 for p in pids])
say('status', *[os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids])
""", timeout=120)
    assert sorted(out(r).splitlines()) == ["child 0 0", "child 1 1", "child 2 2",
                                           "parent 3 True True True", "status 10 11 12"]


@served
def test_python_vrfork_errors_in_their_slots_and_the_master_a_plain_fork(
        cluster: Cluster) -> None:
    """A node that is not there is -BE_INVALIDNODE in its slot, the others run; the
    master (the caller's own node) and NODE_SELF are plain forks here."""
    r = py(cluster, """
import os
n, pids = lb.vrfork([1, 99, -1, -2])
if not pids:
    say('child', n, lb.currnode())
    os._exit(0)
say('parent', n, pids[0] > 0, pids[1], pids[2] > 0, pids[3] > 0)
for p in pids:
    if p > 0:
        os.waitpid(p, 0)
""", timeout=120)
    assert sorted(out(r).splitlines()) == [
        "child 0 1", "child 2 -1", "child 3 -1", f"parent 4 True {-BE_INVALIDNODE} True True"]


@served
def test_python_move_with_a_pipe_open_is_refused_and_goes_on(own: Cluster) -> None:
    """A pipe cannot move: EBUSY, and the caller runs on where it was; once the pipe is
    closed it moves."""
    r = py(own, """
import os
rd, wr = os.pipe()
try:
    lb.move(1)
    say('moved')
except OSError as e:
    say('refused', e.errno, lb.currnode())
os.close(rd); os.close(wr)
lb.move(1)
say('then', lb.currnode())
""", timeout=120)
    assert out(r).splitlines() == [f"refused {errno.EBUSY} -1", "then 1"]


@served
def test_python_move_with_a_bproc_file_open_is_refused_and_the_node_stays_up(
        own: Cluster) -> None:
    """A file of /bproc cannot move (its node would serve its reopening while restoring
    it): EBUSY; only the mover's own ctl handle, open during its `move` write, is left
    behind. Closed, the process moves, and node 1 is still up."""
    r = py(own, """
import os
fd = os.open(os.path.join(os.environ['BPROC_MOUNT'], 'status'), os.O_RDONLY)
try:
    lb.move(1)
    say('moved')
except OSError as e:
    say('refused', e.errno, lb.currnode())
os.close(fd)
lb.move(1)
say('then', lb.currnode(), lb.nodestatus(1))
""", timeout=120)
    assert out(r).splitlines() == [f"refused {errno.EBUSY} -1", "then 1 up"]


@served
def test_a_user_rforks_where_the_acl_lets_them_and_not_elsewhere(cluster: Cluster,
                                                                  users) -> None:
    """bob's rfork to node 1 runs as bob there; node 2, its x bit for root alone, is
    EPERM for his move and his rfork (no child left), and he stays where he was."""
    node2 = os.path.join(cluster.mount, "nodes", "2")
    mode = os.stat(node2).st_mode & 0o777
    os.chmod(node2, 0o100)
    script = SAY + """from bpfs import libbproc as lb
import os
pid = lb.rfork(1)
if pid == 0:
    say('child', lb.currnode(), os.getuid())
    os._exit(3)
say('status', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
for call in (lambda: lb.move(2), lambda: lb.rfork(2) or os._exit(0)):
    try:
        say('ran', call())
    except OSError as e:
        say('refused', e.errno, lb.currnode())
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    say('no child')
"""
    try:
        r = subprocess.run(as_user([PY, "-c", script], users["bob"]), env=cluster.env,
                           capture_output=True, timeout=120, cwd="/")
    finally:
        os.chmod(node2, mode)
    lines = out(r).splitlines()
    # the child's line comes through its relay, the parent's straight: after its wait the
    # parent's may come first (docs/move.md, "Limits")
    assert sorted(lines[:2]) == sorted([f"child 1 {users['bob'].uid}", "status 3"]), lines
    assert lines[2:] == [f"refused {errno.EPERM} -1", f"refused {errno.EPERM} -1",
                         "no child"], lines


# ---- C -------------------------------------------------------------------------------

@served
def test_c_move_there_and_back(own: Cluster, mover: str) -> None:
    r = run(own, [mover, "move", "1", "2", "-1"], timeout=45)
    assert out(r).splitlines() == ["move 1 0 0 1 1 1", "move 2 0 0 2 1 2",
                                   "move -1 0 0 -1 1 3"]


@served
def test_c_move_from_a_bpsh_started_program(own: Cluster, mover: str) -> None:
    r = run(own, [mover, "move", "0", "-1", "99"], node=2, timeout=45)
    assert out(r).splitlines() == ["move 0 0 0 0 1 1", "move -1 0 0 -1 1 2",
                                   f"move 99 -1 {BE_INVALIDNODE} -1 1 3"]


@served
def test_c_rfork_child_on_the_node_and_its_status(cluster: Cluster, mover: str) -> None:
    lines = out(run(cluster, [mover, "rfork", "1"], timeout=120)).splitlines()
    assert sorted(lines) == ["child 1 1", f"rfork 1 0 1 {7 << 8} 0"]


@served
def test_c_rfork_refused_leaves_no_child(cluster: Cluster, mover: str) -> None:
    assert out(run(cluster, [mover, "rfork", "99"], timeout=120)).splitlines() == [
        f"rfork -1 {BE_INVALIDNODE} -9 -1 0"]


@served
def test_c_rfork_from_a_node_moves_its_child(cluster: Cluster, mover: str) -> None:
    """From node 1: the child, forked on node 1, moves to node 2 (node 1 keeps its
    stand-in: bpfs/node/standins.py); the caller's waitpid gets its exit status."""
    lines = sorted(out(run(cluster, [mover, "rfork", "2"], node=1, timeout=120)).splitlines())
    assert lines == ["child 2 1", f"rfork 1 0 2 {7 << 8} 0"], lines


@served
def test_python_rfork_and_vrfork_from_a_node(cluster: Cluster) -> None:
    """A bpsh-started program on node 1 rforks a child to node 2 and vrforks to 0 and 2:
    each returns like fork; the children run there, their parent is the caller, its
    waitpid gets their exit status; a process with a child of its own does not move
    (EBUSY, and it runs on where it was)."""
    r = py(cluster, """
import os, time
me = os.getpid()
pid = lb.rfork(2)
if pid == 0:
    say('child', lb.currnode(), os.getppid() == me)
    time.sleep(0.3)             # still there when the parent asks pidnode
    os._exit(7)
say('parent', lb.pidnode(pid), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
n, pids = lb.vrfork([0, 2])
if not pids:
    say('vchild', n, lb.currnode(), os.getppid() == me)
    os._exit(10 + n)
say('vparent', n, *[os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids])
kid = os.fork()
if kid == 0:
    time.sleep(2)
    os._exit(0)
try:
    lb.move(2)
except OSError as e:
    say('busy', e.errno, lb.currnode())
os.waitpid(kid, 0)
""", node=1, timeout=120)
    assert sorted(out(r).splitlines()) == sorted([
        "child 2 True", "parent 2 7", "vchild 0 0 True", "vchild 1 2 True",
        "vparent 2 10 11", f"busy {errno.EBUSY} 1"])


@served
def test_c_vrfork_to_three_nodes_and_a_missing_one(cluster: Cluster, mover: str) -> None:
    lines = out(run(cluster, [mover, "vrfork", "0,1,2,99"], timeout=120)).splitlines()
    assert sorted(line for line in lines if line.startswith("child")) == [
        "child 0 0", "child 1 1", "child 2 2"]
    assert [line for line in lines if not line.startswith("child")] == [
        "vrfork 4 0", f"slot 0 1 {10 << 8}", f"slot 1 1 {11 << 8}", f"slot 2 1 {12 << 8}",
        f"slot 3 {-BE_INVALIDNODE} -1", "left 0"]


def test_c_without_a_master_refusals_leave_no_child(tmp_path, mover: str) -> None:
    """No cluster mounted: ENOSYS; a mount without the process: ESRCH (the child is
    killed and reaped); a node number below the master's: BE_INVALIDNODE, no fork."""
    (tmp_path / "procs").mkdir()
    env = dict(os.environ, BPROC_MOUNT=str(tmp_path / "none"))

    def lines(*args: str, mount: str) -> list[str]:
        r = subprocess.run([mover, *args], capture_output=True, timeout=30,
                           env=dict(env, BPROC_MOUNT=mount))
        return out(r).splitlines()
    assert lines("rfork", "1", mount=str(tmp_path / "none")) == [
        f"rfork -1 {errno.ENOSYS} -9 -1 0"]
    assert lines("rfork", "4", mount=str(tmp_path)) == [f"rfork -1 {errno.ESRCH} -9 -1 0"]
    assert lines("move", "4", "-7", "-1", mount=str(tmp_path)) == [
        f"move 4 -1 {errno.ESRCH} -1 1 1", f"move -7 -1 {BE_INVALIDNODE} -1 1 2",
        "move -1 0 0 -1 1 3"]
    got = lines("vrfork", "4,-9,-1", mount=str(tmp_path))
    assert sorted(got) == sorted(["child 2 -1", "vrfork 3 0", f"slot 0 {-errno.ESRCH} -1",
                                  f"slot 1 {-BE_INVALIDNODE} -1", f"slot 2 1 {12 << 8}",
                                  "left 0"])

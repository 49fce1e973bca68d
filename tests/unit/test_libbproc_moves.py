"""bpfs.libbproc.moves without a master: the refusals a caller gets before or instead of
a move (no cluster mounted, no such process, a node number that cannot be), a node that
is the caller's own (plain forks), and that a refused rfork leaves no child. Each case
runs in a program of its own (the calls fork; a child must not go on inside pytest).
The moves themselves: tests/cluster/test_libbproc_move.py."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)

BE_INVALIDNODE = 300
PRELUDE = """
import os
from bpfs import libbproc as lb
from bpfs.libbproc import moves
def refusal(call):
    try:
        r = call()
    except OSError as e:
        return e.errno
    if r == 0 or r == (0, []):
        os._exit(0)
    return r
def children_left():
    try:
        os.waitpid(-1, os.WNOHANG)
        return True
    except ChildProcessError:
        return False
"""


def program(script: str, mount: Path) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PRELUDE + script], capture_output=True,
                       timeout=30, cwd="/", env={"PYTHONPATH": str(ROOT), "BPROC_MOUNT": str(mount)})
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().splitlines()


def test_without_a_cluster_every_move_elsewhere_is_enosys(tmp_path: Path) -> None:
    lines = program("""
print(refusal(lambda: lb.move(1)), refusal(lambda: lb.rfork(1)), children_left())
n, pids = lb.vrfork([1, -1])
if not pids:
    os._exit(0)
print(n, pids[0], pids[1] > 0, os.waitpid(pids[1], 0)[0] == pids[1], children_left())
""", tmp_path / "none")
    assert lines == [f"{errno.ENOSYS} {errno.ENOSYS} False", f"2 {-errno.ENOSYS} True True False"]


def test_a_refused_move_leaves_no_child(tmp_path: Path) -> None:
    """A mount whose procs/ has no such process: the child's move fails ESRCH, the
    parent kills and reaps it; a number below the master's is refused before a fork."""
    (tmp_path / "procs").mkdir()
    lines = program("""
print(refusal(lambda: lb.rfork(4)), refusal(lambda: lb.rfork(-7)), refusal(lambda: lb.move(4)),
      children_left())
print(lb.vrfork([4, -9])[1], children_left())
""", tmp_path)
    assert lines == [f"{errno.ESRCH} {BE_INVALIDNODE} {errno.ESRCH} False",
                     f"[{-errno.ESRCH}, {-BE_INVALIDNODE}] False"]


def test_the_callers_own_node_is_a_plain_fork(tmp_path: Path) -> None:
    lines = program("""
print(lb.move(-1), lb.move(-2), flush=True)
n, pids = lb.vrfork([-2, -1, -1])
if not pids:
    os._exit(20 + n)
print(n, *[os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids], children_left())
""", tmp_path)
    assert lines == ["None None", "3 20 21 22 False"]


def test_a_master_without_move_is_enosys_without_asking(tmp_path: Path) -> None:
    (tmp_path / "procs").mkdir()
    lines = program("""
moves.MOVE_SERVED = False
print(refusal(lambda: lb.move(1)), refusal(lambda: lb.rfork(1)), refusal(lambda: lb.vrfork([1])),
      children_left(), lb.move(-1))
""", tmp_path)
    assert lines == [f"{errno.ENOSYS} {errno.ENOSYS} {errno.ENOSYS} False None"]

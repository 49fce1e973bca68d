"""A move to a node that lacks the program's file: the target asks the master for it
(`need`), and the master, which passed the small image on unread, loads it then and
sends the content (bpfs/master/migrations.py `_negotiate`). The program lives in a
directory hidden on every node: node 1 got it when it started there, node 2 never had it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from bpfs import formats
from tests.cluster.test_move import write_ctl
from tests.conftest import command

pytestmark = pytest.mark.timeout(120)


def _line(p: subprocess.Popen) -> str:
    assert p.stdout is not None
    return p.stdout.readline().decode().strip()


def _say(p: subprocess.Popen, text: str) -> None:
    assert p.stdin is not None
    p.stdin.write(text.encode() + b"\n")
    p.stdin.flush()


def test_a_node_lacking_the_program_gets_it_from_the_master_during_a_move(
        make_cluster) -> None:
    hidden = tempfile.mkdtemp(prefix="bpfs-hidden-")
    p = None
    try:
        prog = os.path.join(hidden, "only-on-master")
        shutil.copy("/usr/bin/cat", prog)
        os.chmod(hidden, 0o755)
        c = make_cluster(nodes=3, extra=["--hide", hidden])
        p = subprocess.Popen(command("bpsh") + ["1", prog], env=c.env, cwd="/",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        _say(p, "on one")
        assert _line(p) == "on one"
        (pid,) = formats.parse_pids(c.read("nodes/1/procs"))
        assert write_ctl(c, pid, "move 2") == 0
        assert c.read(f"procs/{pid}/node").strip() == "2"
        _say(p, "on two")
        assert _line(p) == "on two"
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(timeout=30) == 0
    finally:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        shutil.rmtree(hidden, ignore_errors=True)

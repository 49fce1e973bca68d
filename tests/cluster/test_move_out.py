"""Moves between the master and a node send the pages straight: the moving process writes
them itself into a connection of their own (bpfs/master/outpages.py: master -> node;
bpfs/master/homestream.py: node -> master).

A real cluster, a real 100 MB process with a pattern that differs on every page: every
byte of it is checked (a SHA-256 of all of it) after each move, and the master's log says
which way the pages went. A target that dies while the pages go leaves the process on the
master exactly as it was, and a move after that goes through.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from tests.cluster.test_move import (PY, hostname_of, master_name, node_copies, write_ctl)
from tests.cluster.test_move_direct import master_log
from tests.cluster.test_move_stream import mover

pytestmark = pytest.mark.timeout(120)

MB = 100
# every page differs (its number in it), no zero page; at each stdin line: the SHA-256
# of all of it and where it runs
HOLDER = ("import hashlib, os, socket, sys\n"
          f"n = {MB} << 20\n"
          "mem = bytearray(n)\n"
          "for at in range(0, n, 4096):\n"
          "    mem[at:at + 8] = (at // 4096 + 1).to_bytes(8, 'little')\n"
          "print(os.getpid(), hashlib.sha256(mem).hexdigest(), flush=True)\n"
          "for line in sys.stdin:\n"
          "    print(hashlib.sha256(mem).hexdigest(), socket.gethostname(), flush=True)\n")


def start_holder(mb: int = MB) -> tuple[subprocess.Popen, int, str]:
    """The holder as a plain master process: (it, its pid, its memory's SHA-256)."""
    p = subprocess.Popen([PY, "-c", HOLDER.replace(f"n = {MB} << 20", f"n = {mb} << 20")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    pid, digest = p.stdout.readline().decode().split()
    return p, int(pid), digest


def ask(p: subprocess.Popen) -> tuple[str, str]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(b"?\n")
    p.stdin.flush()
    digest, host = p.stdout.readline().decode().split()
    return digest, host


def finish(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)


def moved_when_it_can(cluster, pid: int, target: str) -> None:
    """A python3 just started may hold a directory open a moment (EBUSY)."""
    deadline = time.monotonic() + 10
    while (err := write_ctl(cluster, pid, f"move {target}")) != 0:
        assert err == 16 and time.monotonic() < deadline, err
        time.sleep(0.02)


def test_a_big_process_goes_out_home_and_out_again_straight_with_every_byte(cluster) -> None:
    p, pid, digest = start_holder()
    try:
        moved_when_it_can(cluster, pid, "1")                # m->n
        assert ask(p) == (digest, hostname_of(1))
        assert write_ctl(cluster, pid, "move master") == 0  # n->m
        assert ask(p) == (digest, master_name())
        assert write_ctl(cluster, pid, "move 2") == 0       # h->n
        assert ask(p) == (digest, hostname_of(2))
        log = master_log(cluster)
        out = re.findall(rf"pid {pid} \(.*\) from the master to node \d \(its pages (.*)\)",
                         log)
        assert out == ["straight, by the process"] * 2, out
        home = re.findall(r"move \d+: (\d+) MB of pid " + str(pid) + r" written into its "
                          r"ghost as they came \(([a-z ]+)\)", log)
        assert [(int(mb) >= MB, way) for mb, way in home] == \
            [(True, "straight from the process")], home
    finally:
        finish(p)


def test_a_target_that_dies_while_the_pages_go_leaves_the_process_as_it_was(cluster) -> None:
    """The copy being built on node 1 is killed while the master's process sends its
    pages there: the injected send fails, the move fails, the process goes on on the
    master with every byte, and nothing of it stays on node 1; then it moves for real."""
    p, pid, digest = start_holder(300)     # its pages take a while to go
    try:
        moved_when_it_can(cluster, pid, "2")                # out and home: a ghost now
        assert write_ctl(cluster, pid, "move master") == 0
        cluster.wait_for(lambda: not node_copies(pid), timeout=10,
                         what="node 2's copy gone")
        m = mover(cluster, pid, "1")
        deadline = time.monotonic() + 30
        killed = []
        while not killed and m.poll() is None and time.monotonic() < deadline:
            for copy in node_copies(pid):
                os.kill(copy, signal.SIGKILL)               # the copy being built
                killed.append(copy)
        code = m.wait(timeout=60)
        if not killed:
            pytest.skip("the move was over before its copy could be caught")
        assert code != 0
        assert ask(p) == (digest, master_name())            # as it was, where it was
        cluster.wait_for(lambda: not node_copies(pid), timeout=10,
                         what="nothing of it left on node 1")
        assert write_ctl(cluster, pid, "move 1") == 0
        assert ask(p) == (digest, hostname_of(1))
    finally:
        finish(p)


def test_a_small_process_moves_on_the_link(cluster) -> None:
    """Under 16 MB of its own memory a master process's pages go on the node's link (no
    connection for so little); home, a small image comes whole."""
    p, pid, digest = start_holder(1)
    try:
        moved_when_it_can(cluster, pid, "1")
        assert ask(p) == (digest, hostname_of(1))
        assert write_ctl(cluster, pid, "move master") == 0
        assert ask(p) == (digest, master_name())
        log = master_log(cluster)
        assert re.findall(rf"pid {pid} \(.*\) from the master to node 1 \(its pages (.*)\)",
                          log) == ["on the link"]
        assert not re.findall(rf"MB of pid {pid} written into its ghost", log)
    finally:
        finish(p)


# the holder under a seccomp filter of its own (allow everything): the tracer may not
# inject calls the filter never saw it make, so its pages go from the master
FILTERED = ("import ctypes, struct\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "insn = struct.pack('HBBI', 0x06, 0, 0, 0x7fff0000)      # RET ALLOW\n"
            "buf = ctypes.create_string_buffer(insn)\n"
            "prog = struct.pack('HxxxxxxQ', 1, ctypes.addressof(buf))\n"
            "pbuf = ctypes.create_string_buffer(prog)\n"
            "L = ctypes.c_ulong\n"
            "assert libc.prctl(38, L(1), L(0), L(0), L(0)) == 0      # NO_NEW_PRIVS\n"
            "assert libc.prctl(22, L(2), L(ctypes.addressof(pbuf)), L(0), L(0)) == 0  # filter\n")


def test_a_process_with_a_filter_of_its_own_has_its_pages_sent_by_the_master(cluster
                                                                             ) -> None:
    p = subprocess.Popen([PY, "-c", FILTERED + HOLDER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    try:
        pid_text, digest = p.stdout.readline().decode().split()
        pid = int(pid_text)
        with open(f"/proc/{pid}/status") as f:
            assert "Seccomp:\t2" in f.read()
        moved_when_it_can(cluster, pid, "1")
        assert ask(p) == (digest, hostname_of(1))
        assert re.findall(rf"pid {pid} \(.*\) from the master to node 1 \(its pages (.*)\)",
                          master_log(cluster)) == ["straight, from the master"]
    finally:
        finish(p)

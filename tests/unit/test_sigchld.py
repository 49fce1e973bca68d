"""nsutil.sigchld_exits_only: the kernel stops signalling a child's stops, not its exit.

Runs in a fresh interpreter so pytest's own signal handlers are never touched.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(30)

PROBE = r"""
import os, signal, sys, time
from bpfs.node import nsutil

got = []
signal.signal(signal.SIGCHLD, lambda s, f: got.append(s))
if sys.argv[1] == "quiet":
    nsutil.sigchld_exits_only()

def child_stop_then_exit():
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(7)
    _, status = os.waitpid(pid, os.WUNTRACED)     # waitpid still sees the stop
    assert os.WIFSTOPPED(status), status
    time.sleep(0.05)
    stops = len(got)
    os.kill(pid, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 7, status
    time.sleep(0.05)
    return stops, len(got)

print(*child_stop_then_exit())
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True,
                         capture_output=True, text=True, timeout=20).stdout
    stops, total = out.split()
    return int(stops), int(total)


def test_without_it_a_stop_sends_sigchld():
    stops, total = _probe("loud")
    assert stops == 1 and total >= 2


def test_with_it_only_the_exit_does():
    stops, total = _probe("quiet")
    assert stops == 0
    assert total == 1


def test_it_leaves_sig_dfl_alone():
    code = ("import signal, ctypes\nfrom bpfs.node import nsutil\n"
            "nsutil.sigchld_exits_only()\n"
            "a = nsutil._Sigaction()\n"
            "nsutil._libc.sigaction(signal.SIGCHLD, None, ctypes.byref(a))\n"
            "print(a.handler or 0, a.flags & nsutil.SA_NOCLDSTOP)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=20).stdout.split()
    assert out == ["0", "0"]

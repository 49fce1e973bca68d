"""Back into the ghost (Tracer.restore_in): a process comes back to the master and runs in
its ghost, same PID, same parent. Real processes, real ptrace (the rig:
tests/engine/ghostrig.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time

import pytest

from tests.engine.ghostrig import Rig, asleep
from tests.engine.test_ghost_fork import errno_of, read

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]

ECHO = shutil.which("echo") or "/bin/echo"


def drain(fd: int, timeout: float = 10) -> bytes:
    """Read the pipe `fd` to EOF."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError(f"no EOF in {timeout} s; got {bytes(out)!r}")


def test_echo_runs_in_its_ghost(rig: Rig) -> None:
    pid, img = rig.ghost([ECHO, "hello", "world"])
    r, w = os.pipe()
    try:
        rig.tracer.restore_in(pid, img, {1: w}).result(10)
        os.close(w)
        w = -1
        assert drain(r) == b"hello world\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert rig.bpsh.status(pid) == 0
    assert rig.tracer.ghosts() == [] and rig.rec.exits == {}

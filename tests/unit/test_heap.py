"""bpfs.heap: after keep_buffers, a move's buffers (1 MB bytearrays, freed together) are
warm the next time: counted in page faults, in a fresh interpreter each way."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bpfs import heap

pytestmark = pytest.mark.timeout(30)

# Two 1 MB buffers made and freed together, as a move's are, then one more: its page
# faults (resource's minor faults) are printed.
PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
if {keep}:
    from bpfs import heap
    assert heap.keep_buffers()
for _ in range(3):
    a, b = bytearray(1 << 20), bytearray(1 << 20)
    del a, b
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
c = bytearray(1 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    root = str(Path(heap.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=root, keep=keep)],
                         capture_output=True, text=True, check=True, timeout=20)
    return int(out.stdout)


def test_keep_buffers_says_it_took() -> None:
    assert heap.keep_buffers() in (True, False)


def test_a_freed_buffer_is_reused_warm() -> None:
    if not _glibc():
        pytest.skip("not glibc: no mallopt thresholds")
    warm, cold = _faults(True), _faults(False)
    assert warm < 16, f"{warm} page faults for a 1 MB buffer after keep_buffers"
    assert cold >= 128, f"glibc kept it warm without keep_buffers ({cold} faults): " \
        "the test no longer shows the point"


def _glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"

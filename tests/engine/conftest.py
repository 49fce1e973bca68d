"""Fixtures for migration tests: a loop node in its own PID + mount namespaces (stopped at
module end), a file cache for it, the C test programs built once per session, and the `rig`
of the ghost and tracer tests (tests/engine/ghostrig.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from bpfs.migrate.loopnode import LoopNode
from tests.engine.ghostrig import Rig

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cache_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="bpfs-filecache-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def node(cache_dir: str) -> Iterator[LoopNode]:
    if os.geteuid() != 0:
        pytest.skip("migration needs root (ptrace of any process, namespaces, set_tid)")
    n = LoopNode(cache_dir)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(scope="session")
def cprogs() -> Iterator[dict[str, str]]:
    """progs.c built dynamic and static in a world-readable directory (skipped without gcc)."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc is not available to build the C test programs")
    d = tempfile.mkdtemp(prefix="bpfs-progs-")
    os.chmod(d, 0o755)
    try:
        out = {"dynamic": os.path.join(d, "progs"), "static": os.path.join(d, "progs-static")}
        subprocess.run([gcc, "-O1", "-pthread", str(HERE / "progs.c"), "-o", out["dynamic"]],
                       check=True)
        r = subprocess.run([gcc, "-O1", "-static", "-pthread", str(HERE / "progs.c"), "-o",
                            out["static"]], capture_output=True)
        if r.returncode != 0:
            out.pop("static")
        yield out
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        r.tracer.start()
        yield r
    finally:
        try:
            r.tracer.stop()
        finally:
            r.bpsh.close()

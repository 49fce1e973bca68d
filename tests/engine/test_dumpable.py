"""Dumpability crosses the move as the image says it (PR_SET_DUMPABLE after the credentials).

The restored shell reports its own dumpability as the kernel shows it to others: the owner of
/proc/$$/mem is the process's uid when it is dumpable, root when it is not (task_dump_owner).
The images are dumped from root's launches (always dumpable), then marked as a master's kernel
would mark an execute-only program's; tests/hostile/test_unreadable_binary.py has the real one.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from bpfs.migrate import dump, image
from bpfs.migrate.loopnode import LoopNode
from tests.engine.support import ENV, migrate_image

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
SCRIPT = "stat -c %u /proc/$$/mem"


def _run(node: LoopNode, argv: list[str], dumpable: bool):
    pid = dump.launch(argv, ENV, "/")
    try:
        img = dump.dump(pid)
    finally:
        dump.kill(pid)
    assert img.dumpable                          # root may read everything
    img.dumpable = dumpable
    data = image.dumps(img)
    missing = node.missing(data)
    contents = dump.read_contents(img, missing) if missing else None
    return migrate_image(node, data, img, uid=NOBODY, gid=NOBODY, contents=contents), missing


@pytest.mark.parametrize("dumpable", [True, False])
def test_by_reference(node, dumpable: bool) -> None:
    got, missing = _run(node, ["/bin/sh", "-c", SCRIPT], dumpable)
    assert missing == []
    assert (got.code, got.stdout) == (0, f"{NOBODY if dumpable else 0}\n".encode())


@pytest.mark.parametrize("dumpable", [True, False])
def test_by_content_in_a_memory_file(dumpable: bool) -> None:
    """A node without a cache maps supplied content from a memory file (0511 or 0555)."""
    d = tempfile.mkdtemp(prefix="bpfs-only-on-master-")
    try:
        os.chmod(d, 0o755)
        shutil.copy(os.path.realpath("/bin/sh"), os.path.join(d, "sh"))
        with LoopNode() as other:
            other.bind("/var/empty" if os.path.isdir("/var/empty") else "/usr/share", d)
            got, missing = _run(other, [os.path.join(d, "sh"), "-c", SCRIPT], dumpable)
        assert len(missing) == 1
        assert (got.code, got.stdout) == (0, f"{NOBODY if dumpable else 0}\n".encode())
    finally:
        shutil.rmtree(d, ignore_errors=True)

"""The nice value migrates: dumped with the process, set by the restore before the user's
ids (so even a value the user could not set themselves comes back, as the master had it)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from bpfs.migrate import dump, image
from tests.engine.support import ENV, migrate_image

pytestmark = pytest.mark.timeout(60)


def dumped_at(nice: int) -> image.Image:
    pid = dump.launch(["/usr/bin/nice"], ENV, "/")
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        return dump.dump(pid)
    finally:
        dump.kill(pid)


@pytest.mark.parametrize("nice", [5, 19, -4])
def test_the_nice_value_is_dumped_and_restored(node, nice: int) -> None:
    img = dumped_at(nice)
    assert img.nice == nice
    back = image.loads(image.dumps(img))
    got = migrate_image(node, image.dumps(back), back)
    assert (got.code, got.stdout) == (0, f"{nice}\n".encode())


def test_a_plain_users_process_gets_its_nice_even_one_it_could_not_set(node, users) -> None:
    alice = users["alice"]
    img = dataclasses.replace(dumped_at(7), uid=alice.uid, gid=alice.gid)
    for nice in (7, -2):
        data = image.dumps(dataclasses.replace(img, nice=nice))
        got = migrate_image(node, data, img, uid=alice.uid, gid=alice.gid,
                            groups=alice.groups)
        assert (got.code, got.stdout) == (0, f"{nice}\n".encode()), got.stderr

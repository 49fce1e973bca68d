"""A big image in pieces (bpfs/migrate/imagebuf.py): cut without a copy, put together
with one, and a lying size refused."""

from __future__ import annotations

import errno
import os

import pytest

from bpfs.migrate.errors import MigrateError
from bpfs.migrate.imagebuf import ImageBuffer, pieces

pytestmark = pytest.mark.timeout(30)


def test_pieces_keep_the_bytes_and_their_order_within_the_size() -> None:
    big = os.urandom(5000)
    parts = [b"head", b"h" * 10, memoryview(big), b"", b"y" * 3000, b"z" * 5, b"w" * 100]
    cut = list(pieces(parts, 512))
    assert b"".join(bytes(p) for p in cut) == b"".join(bytes(p) for p in parts)
    assert all(0 < len(p) <= 512 for p in cut)
    views = [p for p in cut if isinstance(p, memoryview)]
    assert views and views[0].obj is big              # the big part is not copied
    assert list(pieces([], 512)) == [] and list(pieces([b""], 512)) == []


def test_an_image_buffer_puts_the_pieces_in_place() -> None:
    data = os.urandom(10000)
    buf = ImageBuffer(len(data))
    for p in pieces([data], 4096):
        buf.add(p)
    assert bytes(buf.view()) == data


def test_an_image_buffer_refuses_more_than_announced_and_less_too() -> None:
    buf = ImageBuffer(10)
    buf.add(b"12345")
    with pytest.raises(MigrateError) as exc:
        buf.view()
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(MigrateError) as exc:
        buf.add(b"1234567")
    assert exc.value.errno == errno.EFBIG

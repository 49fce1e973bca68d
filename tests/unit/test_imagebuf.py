"""A big image in pieces (bpfs/migrate/imagebuf.py): cut without a copy, put together
with one, and a lying size refused."""

from __future__ import annotations

import errno
import os

import pytest

from bpfs.migrate.errors import MigrateError
from bpfs.migrate.image import dumps, loads
from bpfs.migrate.imagebuf import ImageBuffer, Incoming, pieces

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


def _image() -> tuple[bytes, list[tuple[int, bytes]]]:
    """A framed image with three runs in two regions: (its bytes, the runs)."""
    from tests.engine.test_image import sample     # a valid Image to change
    img = sample()
    stack = img.regions[2].start
    runs = [(img.regions[1].start + 4096, os.urandom(4096)),
            (stack, os.urandom(100)), (stack + 8192, os.urandom(3 * 4096))]
    for r in img.regions:
        r.pages = [(a, d) for a, d in runs if r.start <= a < r.end]
    return dumps(img), runs


@pytest.mark.parametrize("size", [1, 1000, 4096, 1 << 20])
def test_an_incoming_image_says_where_each_byte_of_a_piece_goes(size: int) -> None:
    data, runs = _image()
    inc = Incoming(len(data), 1 << 30)
    cut = [(at, data[at:at + size]) for at in range(0, len(data), size)]
    for at, piece in cut:
        assert inc.image() is None or inc.header_end is not None
        inc.take(at, piece)
    assert inc.complete and inc.image() is not None
    canvas = {addr: bytearray(len(d)) for addr, d in runs}
    for at, piece in cut:
        for addr, view in inc.runs_in(at, piece):
            (start,) = [a for a, d in runs if a <= addr < a + len(d)]
            canvas[start][addr - start:addr - start + len(view)] = view
    assert [(a, bytes(c)) for a, c in canvas.items()] == runs


def test_an_incoming_image_refuses_a_piece_out_of_order_or_beyond_its_total() -> None:
    data, _ = _image()
    inc = Incoming(len(data), 1 << 30)
    inc.take(0, data[:100])
    with pytest.raises(MigrateError) as exc:
        inc.take(200, data[200:300])
    assert exc.value.errno == errno.EPROTO
    with pytest.raises(MigrateError) as exc:
        inc.take(100, data[100:] + b"x")
    assert exc.value.errno == errno.EFBIG
    with pytest.raises(MigrateError) as exc:
        Incoming(1 << 31, 1 << 30)
    assert exc.value.errno == errno.EFBIG
    lying = bytearray(data)
    lying[8:16] = (len(data)).to_bytes(8, "little")       # a header longer than the image
    with pytest.raises(MigrateError) as exc:
        Incoming(len(data), 1 << 30).take(0, bytes(lying[:64]))
    assert exc.value.errno == errno.EINVAL


def test_an_incoming_image_kept_whole_loads_as_the_same_image() -> None:
    data, runs = _image()
    inc = Incoming(len(data), 1 << 30)
    inc.take(0, data[:50])
    inc.keep_everything(data[:50])
    inc.take(50, data[50:])
    assert bytes(inc.view()) == data
    img = loads(inc.view())
    assert [(a, bytes(d)) for r in img.regions for a, d in r.pages] == runs

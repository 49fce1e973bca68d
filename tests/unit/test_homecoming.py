"""A stream home (bpfs/master/homecoming.py) against a fake tracer and a fake node: the
parts' runs go to `write_in` in order, from the frames they came in; a node that sends
more than its total (EFBIG), less (EPROTO), or stops (ETIMEDOUT), or a write that fails,
ends in `abort_in`, and nothing is restored.
"""

from __future__ import annotations

import concurrent.futures
import errno
from typing import Any

import pytest
import trio

from bpfs.errors import BpfsError
from bpfs.master import homecoming
from bpfs.master.homecoming import HomeComing
from bpfs.master.migrations import Migration
from bpfs.migrate.image import Image, dumps
from bpfs.model import Caller
from bpfs.wire import messages

pytestmark = pytest.mark.timeout(30)

PART = 6000                     # the sample's header is about 4 kB


def done(value: Any = None, exc: BaseException | None = None) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
    return fut


class FakeTracer:
    def __init__(self, fail_write: int | None = None) -> None:
        self.calls: list[str] = []
        self.written: dict[int, bytes] = {}
        self.fail_write = fail_write

    def stream_in(self, pid: int, image: Image) -> concurrent.futures.Future:
        self.calls.append("stream_in")
        return done((image.page_bytes(), 0))

    def write_in(self, pid: int, runs: list) -> concurrent.futures.Future:
        self.calls.append("write_in")
        if self.fail_write is not None and self.calls.count("write_in") > self.fail_write:
            return done(exc=BpfsError(errno.ESRCH, "ghost gone"))
        for addr, data in runs:
            self.written[addr] = bytes(data)
        return done()

    def abort_in(self, pid: int) -> concurrent.futures.Future:
        self.calls.append("abort_in")
        return done()

    def restore_in(self, pid: int, image: Image, fds: Any, close_others: bool = False
                   ) -> concurrent.futures.Future:
        self.calls.append("restore_in")
        return done()


class Home(HomeComing):
    def __init__(self, tracer: FakeTracer, parts: list[messages.Msg]) -> None:
        self.tracer, self.parts, self.link_host, self._home = tracer, parts, "127.0.0.1", {}
        self.cluster: Any = type("C", (), {"proc_moved": lambda *a: None,
                                           "move_undone": lambda *a: None})()

    async def _next_of_dump(self, d: Migration, deadline: float) -> Any:
        if not self.parts:
            with trio.fail_at(deadline):
                await trio.sleep_forever()
        return self.parts.pop(0)


def image_and_parts(extra: bytes = b"", cut: int = 0
                    ) -> tuple[list[tuple[int, bytes]], list[messages.Msg]]:
    """A valid image whose stack holds 32 runs of a page, sent in PART-byte
    parts (with `extra` bytes after it, or its last `cut` bytes left out): (runs, parts)."""
    from tests.engine.test_image import sample
    img = sample()
    r = img.regions[2]
    runs = [(r.start + k * 0x1000, bytes([k + 1]) * 0x1000) for k in range(32)]
    for region in img.regions:
        region.pages = runs if region is r else []
    data = dumps(img)
    sent = data[:len(data) - cut] + extra
    pieces = [sent[at:at + PART] for at in range(0, len(sent), PART)]
    msgs: list[messages.Msg] = [messages.Part(id=1, data=memoryview(p)) for p in pieces[:-1]]
    msgs[0] = messages.Part(id=1, data=memoryview(pieces[0]), total=len(data))
    msgs.append(messages.Dumped(id=1, image=pieces[-1]))
    return runs, msgs


def migration() -> Migration:
    send, receive = trio.open_memory_channel[Any](1)
    return Migration(1, 1, 7, Caller(0, 0, frozenset(), 7, None), None,  # type: ignore[arg-type]
                     send, receive)


async def home(tracer: FakeTracer, msgs: list[messages.Msg]) -> None:
    h = Home(tracer, msgs[1:])
    proc: Any = type("P", (), {"links": None, "pid": 7})()
    await h._home_from(migration(), proc, msgs[0], 0, trio.current_time() + 60)


async def test_every_run_is_written_where_it_goes_then_restored() -> None:
    tracer = FakeTracer()
    runs, msgs = image_and_parts()
    assert len(msgs) > 3
    await home(tracer, msgs)
    assert tracer.calls[0] == "stream_in" and tracer.calls[-1] == "restore_in"
    assert "abort_in" not in tracer.calls
    got = b"".join(tracer.written[a] for a in sorted(tracer.written))
    assert got == b"".join(d for _, d in runs)


@pytest.mark.parametrize("extra, cut, err", [(b"x" * 100, 0, errno.EFBIG),
                                             (b"", 1000, errno.EPROTO)])
async def test_an_image_longer_or_shorter_than_its_total_is_aborted(extra, cut, err) -> None:
    tracer = FakeTracer()
    _, msgs = image_and_parts(extra, cut)
    with pytest.raises(BpfsError) as exc:
        await home(tracer, msgs)
    assert exc.value.errno == err
    assert tracer.calls[-1] == "abort_in" and "restore_in" not in tracer.calls


async def test_a_failed_write_or_a_silent_node_is_aborted(monkeypatch) -> None:
    tracer = FakeTracer(fail_write=2)
    with pytest.raises(BpfsError) as exc:
        await home(tracer, image_and_parts()[1])
    assert exc.value.errno == errno.ESRCH and tracer.calls[-1] == "abort_in"
    monkeypatch.setattr(homecoming, "PART_TIMEOUT", 0.05)
    tracer = FakeTracer()
    with pytest.raises(trio.TooSlowError):
        await home(tracer, image_and_parts()[1][:3])
    assert tracer.calls[-1] == "abort_in" and "restore_in" not in tracer.calls


# ---- its pages straight from the process (bpfs/master/homestream.py) ------------------

class StraightHome(Home):
    """A Home whose move's pages come on a connection of their own: the test plays the
    node, opening it with the take's token."""

    def __init__(self, tracer: FakeTracer, parts: list[messages.Msg]) -> None:
        super().__init__(tracer, parts)
        self._home_takes: dict = {}
        self.nursery: Any = None

    def _spawn(self, fn: Any, *args: Any) -> None:
        self.nursery.start_soon(fn, *args)


def straight_parts() -> tuple[list[tuple[int, bytes]], messages.Part, list[bytes]]:
    """(runs, the header as a `direct` part, the pages after it in PART-byte chunks)."""
    from bpfs.migrate import imageframe
    runs, msgs = image_and_parts()
    data = b"".join(bytes(m.data if isinstance(m, messages.Part) else m.image) for m in msgs)
    head_end = len(data) - sum(len(d) for _, d in runs)
    assert imageframe.split(data) is not None
    header = messages.Part(id=1, data=memoryview(data[:head_end]), total=len(data),
                           direct=True)
    rest = data[head_end:]
    return runs, header, [rest[at:at + PART] for at in range(0, len(rest), PART)]


async def node_side(where: dict, frames: list[Any], token: str | None = None) -> None:
    """Connect to the master's take and send `frames` (messages), then close."""
    from bpfs.wire import framing
    stream = await trio.open_tcp_stream(where["host"], where["port"])
    fs = framing.FrameStream(stream, framing.HANDSHAKE_MAX_FRAME)
    await fs.send(messages.Open(id=where["to"], token=token or where["token"]))
    for msg in frames:
        await fs.send(msg)
    await trio.aclose_forcefully(stream)


async def straight(tracer: FakeTracer, chunks: list[Any], dumped: Any, header: Any,
                   wrong_first: bool = False) -> None:
    h = StraightHome(tracer, [dumped] if dumped is not None else [])
    d = migration()
    proc: Any = type("P", (), {"links": None, "pid": 7})()
    failed: list[BpfsError] = []
    async with trio.open_nursery() as nursery:
        h.nursery = nursery
        h.local_of = lambda node: "127.0.0.1"
        where = await h._take_home(d)
        assert where["big_only"] and where["to"] == d.id
        try:
            if wrong_first:
                await node_side(where, [], token="ef" * 32)
            nursery.start_soon(node_side, where, chunks)
            await h._home_from(d, proc, header, 0, trio.current_time() + 60)
        except BpfsError as exc:
            failed.append(exc)
        finally:
            h._end_take_home(d)
    if failed:
        raise failed[0]


async def test_pages_straight_from_the_process_are_written_where_they_go() -> None:
    tracer = FakeTracer()
    runs, header, rest = straight_parts()
    at = len(header.data)
    chunks = []
    for piece in rest:
        chunks.append(messages.Chunk(id=1, at=at, data=memoryview(piece)))
        at += len(piece)
    await straight(tracer, chunks, messages.Dumped(id=1, image=b""), header,
                   wrong_first=True)
    assert tracer.calls[0] == "stream_in" and tracer.calls[-1] == "restore_in"
    got = b"".join(tracer.written[a] for a in sorted(tracer.written))
    assert got == b"".join(d for _, d in runs)


async def test_a_straight_stream_that_ends_early_or_a_link_that_sends_pages_too_aborts(
        ) -> None:
    runs, header, rest = straight_parts()
    at = len(header.data)
    chunks = [messages.Chunk(id=1, at=at, data=memoryview(rest[0]))]
    tracer = FakeTracer()
    with pytest.raises(BpfsError) as exc:          # the connection ends after one chunk
        await straight(tracer, chunks, None, header)
    assert exc.value.errno == errno.EPROTO
    assert tracer.calls[-1] == "abort_in" and "restore_in" not in tracer.calls
    at = len(header.data)
    chunks = []
    for piece in rest:
        chunks.append(messages.Chunk(id=1, at=at, data=memoryview(piece)))
        at += len(piece)
    tracer = FakeTracer()
    with pytest.raises(BpfsError) as exc:          # all came, then pages on the link too
        await straight(tracer, chunks, messages.Dumped(id=1, image=b"more"), header)
    assert exc.value.errno == errno.EPROTO
    assert tracer.calls[-1] == "abort_in" and "restore_in" not in tracer.calls


async def test_chunks_of_another_move_are_refused() -> None:
    _, header, rest = straight_parts()
    chunks = [messages.Chunk(id=2, at=len(header.data), data=memoryview(rest[0]))]
    tracer = FakeTracer()
    with pytest.raises(BpfsError) as exc:
        await straight(tracer, chunks, None, header)
    assert exc.value.errno == errno.EPROTO and tracer.calls[-1] == "abort_in"

"""The master's ExecService takes output links made again after a move (`again` headers):
its link endpoint served for real on loopback, with a record as `start` leaves it."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from bpfs.master.exec import ExecService, Record
from bpfs.output import ProcOutput
from bpfs.wire.execreq import render_header

pytestmark = pytest.mark.timeout(20)

PID = 4321


async def _served(nursery: trio.Nursery) -> tuple[ExecService, Record, int]:
    execs = ExecService(None, None, "/")            # type: ignore[arg-type]  # links only
    port = await nursery.start(execs.serve, "127.0.0.1")
    token = os.urandom(16).hex()
    rec = Record(PID, token, ProcOutput())
    execs._records[token] = rec
    return execs, rec, port


async def _link(port: int, header: bytes, data: bytes = b"") -> socket.socket:
    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(header + data)
        return s
    return await trio.to_thread.run_sync(connect)


async def _until(pred, what: str) -> None:
    with trio.fail_after(5):
        while not pred():
            await trio.sleep(0.01)


def _text(rec: Record, name: str = "stdout") -> bytes:
    return rec.output.streams[name].read(0, 1 << 20)[0]


async def test_the_old_link_to_its_eof_then_the_new_one() -> None:
    async with trio.open_nursery() as nursery:
        execs, rec, port = await _served(nursery)
        old = await _link(port, render_header(rec.token, PID, 1), b"one ")
        await _until(lambda: _text(rec) == b"one ", "the first link")
        assert execs.expect_again(PID) and not execs.expect_again(PID + 1)
        new = await _link(port, render_header(rec.token, PID, 1, 0), b"three")
        await trio.sleep(0.1)
        assert _text(rec) == b"one "                # held until the old link's EOF
        old.sendall(b"two ")
        old.close()
        await _until(lambda: _text(rec) == b"one two three", "the new link")
        ring = rec.output.streams["stdout"]
        assert not ring.link_done                   # the new link goes on
        new.close()
        await _until(lambda: ring.link_done, "the stream's end")
        nursery.cancel_scope.cancel()


async def test_a_link_made_again_after_the_old_ones_eof() -> None:
    """No expect_again (or it came late): the stream's end is taken back by the new link."""
    async with trio.open_nursery() as nursery:
        execs, rec, port = await _served(nursery)
        ring = rec.output.streams["stderr"]
        old = await _link(port, render_header(rec.token, PID, 2), b"before ")
        old.close()
        await _until(lambda: ring.link_done, "the old link's EOF")
        new = await _link(port, render_header(rec.token, PID, 2, 0), b"after")
        await _until(lambda: _text(rec, "stderr") == b"before after", "the new link")
        assert not ring.link_done
        new.close()
        await _until(lambda: ring.link_done, "the stream's end")
        nursery.cancel_scope.cancel()


async def test_a_move_that_failed_ends_the_stream_with_the_old_link() -> None:
    async with trio.open_nursery() as nursery:
        execs, rec, port = await _served(nursery)
        ring = rec.output.streams["stdout"]
        old = await _link(port, render_header(rec.token, PID, 1), b"x")
        await _until(lambda: _text(rec) == b"x", "the link")
        execs.expect_again(PID)
        execs.expect_again(PID, moving=False)       # the move failed: P goes on here
        old.close()
        await _until(lambda: ring.link_done, "the stream's end")
        nursery.cancel_scope.cancel()


async def test_links_again_that_are_not_ours_are_closed() -> None:
    async with trio.open_nursery() as nursery:
        execs, rec, port = await _served(nursery)
        bad = [await _link(port, render_header("f" * 32, PID, 1, 0), b"no"),
               await _link(port, render_header(rec.token, PID + 1, 1, 0), b"no"),
               await _link(port, render_header(rec.token, PID, 0, 5), b"no")]
        for s in bad:
            s.settimeout(5)
            try:
                assert await trio.to_thread.run_sync(s.recv, 10) == b""
            except ConnectionResetError:
                pass
            s.close()
        assert _text(rec) == b"" and _text(rec, "stderr") == b""
        nursery.cancel_scope.cancel()

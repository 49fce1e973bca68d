"""bpfs/node/mover.py: where a moving process's pages go when the `dump` said `way`.

The master asks the target while the source dumps; the source's thread waits for the
`way` only for a big image (`_routed`), connects only then, and never waits for ever: the
verdict, the session's end or WAY_TIMEOUT let it go through the master."""

from __future__ import annotations

import queue
from types import SimpleNamespace

import pytest
import trio

from bpfs.node import mover
from bpfs.node.mover import Move, Mover
from bpfs.wire import framing as wire, messages

pytestmark = pytest.mark.timeout(30)

TOKEN = "ab" * 32


def _move(nursery: trio.Nursery) -> Move:
    session = SimpleNamespace(nursery=nursery)
    m = Move(session, 7, 300, (), {})        # type: ignore[arg-type]
    m.way = trio.Event()
    return m


async def test_a_way_with_a_route_connects_then_and_opens_with_its_token() -> None:
    opened: list[dict] = []

    async def target(stream: trio.SocketStream) -> None:
        opened.append(await wire.FrameStream(stream, wire.HANDSHAKE_MAX_FRAME).receive())
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            lambda task_status: trio.serve_tcp(target, 0, host="127.0.0.1",
                                               task_status=task_status))
        port = listener.socket.getsockname()[1]
        m = _move(nursery)
        movers = Mover()
        movers.moves[m.pid] = m
        session = m.session
        movers.way(session, messages.Way(id=7, pid=300, host="127.0.0.1", port=port,
                                         token=TOKEN, to=9))
        assert m.route is None                      # not before its thread wants it
        await Mover._routed(m)
        assert m.route is not None and m.route.fs is not None and m.route.id == 9
        with trio.fail_after(5):
            while not opened:
                await trio.sleep(0.01)
        assert opened[0] == {"t": "open", "id": 9, "token": TOKEN}
        await m.route.close()
        nursery.cancel_scope.cancel()


async def test_a_way_without_a_route_or_none_at_all_goes_through_the_master(
        monkeypatch) -> None:
    async with trio.open_nursery() as nursery:
        m = _move(nursery)
        movers = Mover()
        movers.moves[m.pid] = m
        movers.way(m.session, messages.Way(id=7, pid=300))
        await Mover._routed(m)
        assert m.route is None
        monkeypatch.setattr(mover, "WAY_TIMEOUT", 0.05)
        silent = _move(nursery)                     # the master never says
        with trio.fail_after(5):
            await Mover._routed(silent)
        assert silent.route is None


async def test_the_verdict_or_the_sessions_end_stop_the_wait() -> None:
    async with trio.open_nursery() as nursery:
        movers = Mover()
        m = _move(nursery)
        movers.moves[m.pid] = m
        movers.verdict(m.pid, m.id, mover.RESUME)
        with trio.fail_after(5):
            await Mover._routed(m)
        assert m.route is None and m.verdict.get_nowait() == (mover.RESUME, None)
        m2 = _move(nursery)
        movers.moves[m2.pid] = m2
        movers.session_over()
        with trio.fail_after(5):
            await Mover._routed(m2)
        assert m2.verdict.get_nowait() == (mover.RESUME, None)


async def test_a_way_for_another_move_or_after_the_sender_ended_makes_no_route() -> None:
    async with trio.open_nursery() as nursery:
        movers = Mover()
        m = _move(nursery)
        movers.moves[m.pid] = m
        movers.way(m.session, messages.Way(id=8, pid=300, host="127.0.0.1", port=9,
                                           token=TOKEN, to=9))     # another move's id
        assert not m.way.is_set()
        m.routeless = True                          # its sender is over
        movers.way(m.session, messages.Way(id=7, pid=300, host="127.0.0.1", port=9,
                                           token=TOKEN, to=9))
        await Mover._routed(m)
        assert m.route is None
        with pytest.raises(queue.Empty):
            m.verdict.get_nowait()

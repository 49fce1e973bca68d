"""A move written while the process's start (bpsh's migration) is still in the master's
table: it waits for the start to end, not EBUSY at once. Seen in CI on a loaded machine:
the process ran on its node and printed before the master had read its `restored`, and
the test's `move 2`, written after that output, failed EBUSY ("moving or starting")."""

from __future__ import annotations

import pytest
import trio

from bpfs.master import moves
from bpfs.master.migrations import Migration
from bpfs.model import Caller

pytestmark = pytest.mark.timeout(20)


class Table(moves.Moves):
    def __init__(self) -> None:      # only the table `_settled` reads
        self._by_pid: dict[int, Migration] = {}


def _migration(pid: int, start: bool) -> Migration:
    send, receive = trio.open_memory_channel[object](1)
    req = object() if start else None
    return Migration(1, 1, pid, Caller(0, 0, frozenset()), req, send, receive)  # type: ignore[arg-type]


async def _settle_while(table: Table, m: Migration, done_after: float) -> float:
    table._by_pid[m.pid] = m
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        async def finish() -> None:
            await trio.sleep(done_after)
            table._by_pid.pop(m.pid, None)
        nursery.start_soon(finish)
        await table._settled(m.pid)
        waited = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    return waited


async def test_a_start_not_yet_restored_is_waited_for() -> None:
    table = Table()
    assert await _settle_while(table, _migration(7, start=True), 0.2) >= 0.2


async def test_a_move_under_way_is_not_waited_for() -> None:
    table = Table()
    assert await _settle_while(table, _migration(7, start=False), 0.2) < 0.1


async def test_a_move_whose_process_runs_already_is_waited_for() -> None:
    table = Table()
    m = _migration(7, start=False)
    m.started = True
    assert await _settle_while(table, m, 0.2) >= 0.2

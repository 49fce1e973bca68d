"""A streamed restore's receiver pace (bpfs/node/streamin.py `Stream.room`): pieces are
written two at a time, but the direct stream reads into its buffers in turn, so a later
piece's write that ends first must free no room (its frame's buffer would be read into
while the older write still reads from its own)."""

from __future__ import annotations

from collections import deque

import pytest
import trio
import trio.testing

from bpfs.node import streamin
from bpfs.node.direct import MAX_WRITES, WRITERS

pytestmark = pytest.mark.timeout(30)


def pace(n: int) -> tuple[streamin.Stream, list[trio.Event]]:
    """A Stream with only its pace: `n` writes in hand, oldest first."""
    s = object.__new__(streamin.Stream)
    ends = [trio.Event() for _ in range(n)]
    s.in_hand = deque(ends)
    return s, ends


def test_more_writers_than_one_and_room_for_them_while_receiving() -> None:
    assert 1 < WRITERS < MAX_WRITES


def test_room_waits_for_the_oldest_write_not_for_a_later_one() -> None:
    async def main() -> None:
        s, ends = pace(MAX_WRITES)
        got = trio.Event()

        async def receiver() -> None:
            await s.room()
            got.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            ends[1].set()                       # a later piece written first
            await trio.testing.wait_all_tasks_blocked()
            assert not got.is_set()
            ends[0].set()                       # the oldest: two freed, in order
            with trio.fail_after(5):
                await got.wait()
        assert len(s.in_hand) == MAX_WRITES - 2
    trio.run(main)


def test_room_at_once_while_fewer_are_in_hand() -> None:
    async def main() -> None:
        s, _ = pace(MAX_WRITES - 1)
        with trio.fail_after(5):
            await s.room()
    trio.run(main)

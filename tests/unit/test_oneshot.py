"""The watcher thread's one-shot timer (bpfs/node/oneshot.py): readable once when due,
never when unset, re-armed by each arm."""

from __future__ import annotations

import os
import select
import time

import pytest

from bpfs.node.oneshot import OneShot

pytestmark = pytest.mark.timeout(10)


def _fires(t: OneShot, within: float) -> bool:
    with select.epoll() as ep:
        ep.register(t.fd, select.EPOLLIN)
        return bool(ep.poll(within))


def test_it_fires_once_when_due_and_not_again_until_armed() -> None:
    t = OneShot()
    try:
        assert not _fires(t, 0.01)                  # never armed
        start = time.monotonic()
        t.arm(0.002)
        assert _fires(t, 1.0)
        assert time.monotonic() - start >= 0.0015
        t.drain()
        assert not _fires(t, 0.02)                  # one shot
        t.drain()                                   # nothing to read: no error
    finally:
        os.close(t.fd)


def test_disarm_takes_back_a_look_not_yet_due() -> None:
    t = OneShot()
    try:
        t.arm(0.02)
        t.disarm()
        assert not _fires(t, 0.05)
        t.arm(0.05)
        t.arm(0.001)                                # re-arming moves it
        assert _fires(t, 0.03)
    finally:
        os.close(t.fd)

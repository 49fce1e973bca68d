"""The node's spare table (bpfs/node/spares.py) around an execve: a parent's spares go
back when it runs a new program, and so does one that was on its way then, until the
parent forks again (a storm ending in `exec sleep 30` left such a spare under the shell's
ghost until the idle sweep, 2-7 s, and under load past the storm test's 10 s)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bpfs.node.spares import Spares
from bpfs.wire import messages

pytestmark = pytest.mark.timeout(10)


class Session:
    def __init__(self) -> None:
        self.reported: list[messages.Unforked] = []

    def report(self, msg) -> None:
        self.reported.append(msg)


class Table(Spares):
    def __init__(self, session: Session) -> None:
        super().__init__()
        job = SimpleNamespace(session=session)
        self.children = {}
        self.jobs = {10: job}


def test_a_spare_on_its_way_when_its_parent_execs_goes_back_until_it_forks_again() -> None:
    session = Session()
    t = Table(session)
    t.on_spare(session, messages.Spare(parent=10, pid=101, id=1))
    assert [s.pid for s in t.spares[10]] == [101]
    t.execd(10)                                         # held: back at once
    assert [m.pid for m in session.reported] == [101] and 10 not in t.spares
    t.on_spare(session, messages.Spare(parent=10, pid=102, id=2))   # late: back too
    assert [m.pid for m in session.reported] == [101, 102] and 10 not in t.spares
    t.forked_again(10)                                  # the new program forks: welcome
    t.on_spare(session, messages.Spare(parent=10, pid=103, id=3))
    assert [s.pid for s in t.spares[10]] == [103] and len(session.reported) == 2


def test_a_parent_forgotten_leaves_no_mark() -> None:
    session = Session()
    t = Table(session)
    t.execd(10)
    t.give_back(10)                                     # it ended (trio's thread)
    t.on_spare(session, messages.Spare(parent=10, pid=104, id=4))
    assert [s.pid for s in t.spares[10]] == [104] and t._execd == set()

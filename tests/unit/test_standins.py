"""The master's bookkeeping of stand-ins (bpfs/master/standins.py), without a cluster: a
move from the node a process was forked on relays its stdio there and makes that node its
stand-in; its end reaches that node once, with the status (no core bit); a move back, a
failed move or the node's loss ends the standing in; a process with children on its node
does not move. And the zombie status it reads for a process back on the master."""

from __future__ import annotations

import errno
import os
import signal
import time
from types import SimpleNamespace

import pytest

from bpfs.errors import BpfsError
from bpfs.master.standins import NodeStandins, _zombie_status
from bpfs.model import Proc
from bpfs.wire import messages

pytestmark = pytest.mark.timeout(30)
TOKEN = "ab" * 16


class Fake(NodeStandins):
    def __init__(self) -> None:
        super().__init__()
        self.cluster = SimpleNamespace(procs={})
        self.tracer = None
        self._parents: dict[int, int] = {}
        self._migrations = {7: SimpleNamespace(node=1)}
        self.told: list[tuple[int, messages.Msg]] = []
        self._tell = lambda node, msg, failed=None: self.told.append((node, msg))
        self._spawn = lambda *a: None
        self.host_of = lambda node: f"10.0.0.{node}"


def proc(pid: int = 500) -> Proc:
    return Proc(pid, 1, 0, 0, "prog", 0.0)


def test_a_relayed_move_makes_its_node_the_stand_in_and_the_end_reaches_it_once() -> None:
    f, p = Fake(), proc()
    f.on_relayed(1, messages.Relayed(id=7, port=4000, token=TOKEN))
    assert f.take_relay(7, p, 1)
    assert p.links is not None and (p.links.port, p.links.host) == (4000, "10.0.0.1")
    assert p.links.io == ("socket", "socket", "socket") and p.stdin_base == 0
    f.standin_over(500, signal.SIGSEGV | 0x80)           # core bit: not the stand-in's
    f.standin_over(500, 0)
    assert f.told == [(1, messages.Ended(pid=500, status=signal.SIGSEGV))]


@pytest.mark.parametrize("node, mid, token", [(2, 7, TOKEN), (1, 8, TOKEN), (1, 7, "x" * 32)])
def test_a_relayed_of_another_node_or_move_or_with_a_bad_token_is_ignored(node, mid,
                                                                         token) -> None:
    f = Fake()
    f.on_relayed(node, messages.Relayed(id=mid, port=4000, token=token))
    assert not f.take_relay(mid, proc(), node)


def test_back_home_a_failed_move_and_a_lost_node_end_the_standing_in() -> None:
    f = Fake()
    for pid in (500, 501, 502):
        f.on_relayed(1, messages.Relayed(id=7, port=4000, token=TOKEN))
        assert f.take_relay(7, proc(pid), 1)
    assert not f.back_home(500, 2) and f.back_home(500, 1)
    f.no_standin(501)
    f.standins_lost(1)
    for pid in (500, 501, 502):
        f.standin_over(pid, 0)
    assert f.told == []


def test_a_process_with_children_on_its_node_does_not_move() -> None:
    f = Fake()
    f._parents = {600: 500}
    with pytest.raises(BpfsError) as exc:
        f.check_children(500)
    assert exc.value.errno == errno.EBUSY
    f.check_children(600)


def test_the_zombie_status_is_read_before_it_is_reaped() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(5)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert _zombie_status(pid) == 5 << 8
    finally:
        os.waitpid(pid, 0)
    assert _zombie_status(pid) == signal.SIGKILL            # reaped: the status is lost


def test_the_reaper_leaves_a_child_another_thread_traces_to_that_thread() -> None:
    """The node daemon's reaper (bpfs/node/init.py) and a stand-in's tracer thread in one
    process: a signal-delivery stop of the traced child stays the tracer's (the kernel
    shows it to the whole thread group), an untraced child's end is reaped."""
    import threading
    from bpfs.migrate import ptrace as pt
    from bpfs.node.init import Reaper
    traced, plain = os.fork(), -1
    if traced == 0:
        time.sleep(30)
        os._exit(0)
    statuses: list[int] = []
    try:
        plain = os.fork()
        if plain == 0:
            os._exit(3)
        ready, go, done = threading.Event(), threading.Event(), threading.Event()

        def tracer() -> None:
            pt.seize(traced, 0)
            os.kill(traced, signal.SIGUSR1)
            ready.set()
            go.wait(10)
            statuses.append(pt.wait(traced))        # the stop is still ours
            pt.cont(traced, 0)                      # suppressed
            os.kill(traced, signal.SIGKILL)
            statuses.append(pt.wait(traced))        # its end: ours too (we reap it)
            done.set()

        t = threading.Thread(target=tracer)
        t.start()
        ready.wait(10)
        time.sleep(0.2)                             # the stop and the plain end are in
        ended: list[tuple[int, int]] = []
        reaper = Reaper()
        reaper.on_exit(plain, lambda pid, st: ended.append((pid, st)))
        reaper.reap()
        go.set()
        t.join(10)
        assert done.is_set()
        assert ended == [(plain, 3 << 8)]
        assert os.WIFSTOPPED(statuses[0]) and os.WSTOPSIG(statuses[0]) == signal.SIGUSR1
        assert os.WIFSIGNALED(statuses[1])
    finally:
        for pid in (traced, plain):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

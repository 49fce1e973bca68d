"""A process that moves away from a node and back under the same PID: the late end of its
dropped copy (its keeper's record, the keeper's own end) is that copy's, never the new
one's. Seen once: the new copy was reported killed (SIGKILL, the dropped copy's end), so
the master killed its ghost, and the process ran on with none."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any, Callable, Iterator

import pytest
import trio

from bpfs.migrate.helper import JOB_RECORD
from bpfs.node import procs
from bpfs.node.procs import DYING_WAIT, Held, ProcessTable
from bpfs.wire import messages


class FakeSession:
    def __init__(self) -> None:
        self.reports: list[Any] = []

    def report(self, msg: Any) -> None:
        self.reports.append(msg)


class FakeReaper:
    """Keeps the callbacks; the test calls them as the reaper would."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[int, int], None]] = {}

    def on_exit(self, pid: int, callback: Callable[[int, int], None]) -> None:
        self.callbacks[pid] = callback

    adopt = on_exit

    def forget(self, pid: int) -> None:
        self.callbacks.pop(pid, None)


PID, OLD_KEEPER, NEW_KEEPER = 4242, 999991, 999992      # keepers: no child of ours


def _table() -> tuple[ProcessTable, FakeReaper, FakeSession, Held]:
    reaper, session = FakeReaper(), FakeSession()
    table = ProcessTable(reaper)                        # type: ignore[arg-type]
    old = Held(session, 91, "holder")                   # type: ignore[arg-type]
    table.hold(PID, old)
    table.adopt(PID, OLD_KEEPER)
    table.drop(PID)                                     # moved away (`drop`)
    return table, reaper, session, old


def _back(table: ProcessTable, reaper: FakeReaper, session: FakeSession) -> Held:
    new = Held(session, 95, "holder")                   # type: ignore[arg-type]
    table.hold(PID, new)                                # moved back: restore 95
    table.adopt(PID, NEW_KEEPER)
    return new


def _close(table: ProcessTable) -> None:
    os.close(table.jobs_r)
    os.close(table.jobs_w)


def test_the_dropped_copys_late_record_and_keeper_end_spare_the_new_copy() -> None:
    table, reaper, session, _ = _table()
    try:
        old_keeper_gone = reaper.callbacks[OLD_KEEPER]
        new = _back(table, reaper, session)
        os.write(table.jobs_w, JOB_RECORD.pack(PID, signal.SIGKILL))   # the old copy's end
        old_keeper_gone(OLD_KEEPER, 0)                  # reaped after the new restore
        assert session.reports == []
        assert table.held[PID] is new and PID not in table.dropped
        os.write(table.jobs_w, JOB_RECORD.pack(PID, 3 << 8))       # the new copy's end
        table.read_jobs()
        assert session.reports == [messages.Exited(pid=PID, code=3, signal=None, id=95)]
    finally:
        _close(table)


def test_the_old_keepers_end_alone_does_not_end_the_new_copy() -> None:
    table, reaper, session, _ = _table()
    try:
        old_keeper_gone = reaper.callbacks[OLD_KEEPER]
        os.write(table.jobs_w, JOB_RECORD.pack(PID, signal.SIGKILL))
        table.read_jobs()                               # read in time: the dropped copy's
        assert PID not in table.dropped
        new = _back(table, reaper, session)
        old_keeper_gone(OLD_KEEPER, 0)                  # its waitpid would say ECHILD
        assert session.reports == [] and table.held[PID] is new
    finally:
        _close(table)


def test_a_record_written_before_the_pid_came_back_is_still_the_dropped_copys() -> None:
    """Records come in order: the old copy's end, read after the new copy is held, is
    taken for the dropped copy; the new copy's own end, after it, for the new one."""
    table, reaper, session, _ = _table()
    try:
        os.write(table.jobs_w, JOB_RECORD.pack(PID, signal.SIGKILL))
        new = _back(table, reaper, session)
        os.write(table.jobs_w, JOB_RECORD.pack(PID, signal.SIGTERM))
        table.read_jobs()
        assert PID not in table.dropped and PID not in table.held
        assert session.reports == [messages.Exited(pid=PID, code=None,
                                                   signal=signal.SIGTERM, id=95)]
        assert new.id == 95
    finally:
        _close(table)


@contextlib.contextmanager
def short_wait(seconds: float) -> Iterator[None]:
    """DYING_WAIT made short for one test."""
    old, procs.DYING_WAIT = procs.DYING_WAIT, seconds
    try:
        yield
    finally:
        procs.DYING_WAIT = old


def _dropped_real(reaper: FakeReaper, session: FakeSession, pid: int) -> ProcessTable:
    table = ProcessTable(reaper)                        # type: ignore[arg-type]
    table.hold(pid, Held(session, 91, "sleep"))         # type: ignore[arg-type]
    table.adopt(pid, OLD_KEEPER)
    table.drop(pid)
    return table


@pytest.mark.timeout(20)
def test_a_restore_waits_while_a_dropped_copy_still_holds_the_pid() -> None:
    """Moved away and straight back: the copy dropped here (killed, not reaped yet) still
    holds the number, and a restore then failed EEXIST (seen in a ping-pong under load).
    `dying` says so until its keeper's record of its end is read (gone from /proc is not
    enough); `until_gone` returns then."""
    child = subprocess.Popen(["sleep", "30"])
    table = _dropped_real(FakeReaper(), FakeSession(), child.pid)
    try:
        assert table.dying(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        assert table.dying(child.pid)                   # a zombie: its number is taken

        def keeper() -> None:           # reaps it, then writes its record
            status = child.wait()
            assert not os.path.exists(f"/proc/{child.pid}")
            assert table.dying(child.pid)               # gone from /proc: not yet its end
            os.write(table.jobs_w, JOB_RECORD.pack(child.pid, -status))

        async def main() -> float:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, keeper)   # reaped meanwhile
                t0 = trio.current_time()
                await table.until_gone(child.pid)
                return trio.current_time() - t0
        assert trio.run(main) < DYING_WAIT
        assert not table.dying(child.pid)
    finally:
        child.kill()
        child.wait()
        _close(table)


@pytest.mark.timeout(20)
def test_until_gone_is_bounded_and_ignores_a_pid_not_dropped() -> None:
    child = subprocess.Popen(["sleep", "30"])
    table = _dropped_real(FakeReaper(), FakeSession(), child.pid)
    try:
        assert not table.dying(os.getpid())             # alive, but not a dropped copy
        with short_wait(0.05):
            t0 = time.monotonic()
            trio.run(table.until_gone, child.pid)       # never ends: gives up
            assert 0.04 < time.monotonic() - t0 < 5
    finally:
        child.kill()
        child.wait()
        _close(table)


@pytest.mark.timeout(20)
def test_two_dropped_copies_the_first_ones_end_leaves_the_second_dying() -> None:
    """Away, back and away again before the first copy's end was read: that end is the
    first copy's, and the second (killed, not reaped yet) still holds the number, so a
    restore coming back now waits for it (it found the number taken: EEXIST, seen in a
    ping-pong of moves while the node forked)."""
    child = subprocess.Popen(["sleep", "30"])
    reaper, session = FakeReaper(), FakeSession()
    table = _dropped_real(reaper, session, child.pid)             # copy 91, dropped
    try:
        second = Held(session, 95, "sleep")                 # type: ignore[arg-type]
        table.hold(child.pid, second)
        table.adopt(child.pid, NEW_KEEPER)
        table.drop(child.pid)                               # moved away again
        os.write(table.jobs_w, JOB_RECORD.pack(child.pid, signal.SIGKILL))   # 91's end
        table.read_jobs()
        assert table.dying(child.pid) and table.dropped[child.pid] == [second]
        os.write(table.jobs_w, JOB_RECORD.pack(child.pid, signal.SIGKILL))   # 95's end
        table.read_jobs()
        assert child.pid not in table.dropped and session.reports == []
    finally:
        child.kill()
        child.wait()
        _close(table)

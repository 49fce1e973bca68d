"""Job control, the pure parts: the node's keeper records, the master's process states,
the dispositions bpsh keeps for what it runs, and bpsh's foreground test."""

from __future__ import annotations

import os
import signal
import struct

from bpfs.child import reset_signals
from bpfs.cli.bpsh import stdio as stdio_server
from bpfs.migrate.helper import JOB_RECORD
from bpfs.node.init import Reaper
from bpfs.node.procs import Held, ProcessTable
from bpfs.wire import messages
from tests.unit.test_model import up_cluster


class FakeSession:
    def __init__(self) -> None:
        self.reports: list[dict] = []

    def report(self, msg: dict) -> None:
        self.reports.append(msg)


def _write(table: ProcessTable, pid: int, status: int) -> None:
    os.write(table.jobs_w, JOB_RECORD.pack(pid, status))


def test_keeper_records_become_stopped_continued_and_exited_reports() -> None:
    table, session = ProcessTable(Reaper()), FakeSession()
    try:
        table.hold(41, Held(session, 1, "sleep"))  # type: ignore[arg-type]
        _write(table, 41, signal.SIGTSTP << 8 | 0x7f)        # stopped by TSTP
        _write(table, 41, 0xffff)                             # continued
        _write(table, 99, 0x7f13)                             # a pid we do not hold
        _write(table, 41, 3 << 8)                             # exited 3
        _write(table, 41, 0)                                  # nothing after the end
        table.read_jobs()
        assert session.reports == [
            messages.Stopped(pid=41, sig=signal.SIGTSTP),
            messages.Continued(pid=41),
            messages.Exited(pid=41, code=3, signal=None, id=1)]
        assert 41 not in table.held
        table.read_jobs()                                     # nothing left: no error
    finally:
        os.close(table.jobs_r)
        os.close(table.jobs_w)


def test_a_death_by_signal_is_reported_as_such() -> None:
    table, session = ProcessTable(Reaper()), FakeSession()
    try:
        table.hold(7, Held(session, 1, "sh"))  # type: ignore[arg-type]
        _write(table, 7, signal.SIGTERM)
        table.read_jobs()
        assert session.reports == [messages.Exited(pid=7, code=None, signal=signal.SIGTERM,
                                                   id=1)]
    finally:
        os.close(table.jobs_r)
        os.close(table.jobs_w)


def test_job_record_is_two_native_ints() -> None:
    assert JOB_RECORD.size == 8 and JOB_RECORD.pack(1, 2) == struct.pack("<ii", 1, 2)


def test_states_follow_the_nodes_reports_and_only_sigstop_is_taken_on_trust() -> None:
    c = up_cluster(2)
    p = c.start_proc(42, 1, 1000, 100, "sleep 9", 5.0)
    c.proc_running(42)
    c.signalled(42, signal.SIGTSTP)             # it may ignore TSTP: wait for the node
    assert p.state == "running"
    c.stopped(42)
    assert p.state == "stopped"
    c.continued(42)
    assert p.state == "running"
    c.signalled(42, signal.SIGSTOP)             # cannot fail
    assert p.state == "stopped"
    c.exited(42, 0, None)
    c.stopped(42)
    c.continued(42)
    assert p.state == "exited"


def _child_sigign(keep: bool) -> int:
    """SigIgn of a child that ignored HUP, INT and PIPE, caught USR1, then reset."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, lambda *_: None)
            reset_signals(keep_ignored=keep)
            with open("/proc/self/status") as f:
                line = next(x for x in f if x.startswith("SigIgn:"))
            os.write(w, line.split()[1].encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data, 16)


def test_bpsh_keeps_the_ignored_signals_but_sigpipe_and_the_master_resets_all() -> None:
    bit = lambda s: 1 << (s - 1)  # noqa: E731
    assert _child_sigign(True) == bit(signal.SIGHUP) | bit(signal.SIGINT)
    assert _child_sigign(False) == 0


def test_without_a_controlling_terminal_bpsh_is_not_in_the_foreground() -> None:
    pid = os.fork()
    if pid == 0:
        os.setsid()                             # no controlling terminal any more
        os._exit(0 if not stdio_server._in_foreground() else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

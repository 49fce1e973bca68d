"""bpfs.child: the reports a child writes on its status pipe before its program runs."""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from bpfs import child
from bpfs.child import REASON_MAX, Report

ROOT = Path(__file__).resolve().parents[2]
PIPE_BUF = select.PIPE_BUF

reports = st.builds(Report, st.integers(-1, 2**31 - 1),
                    st.sampled_from([child.READY, child.SETUP, child.CTL, child.CWD, child.EXEC]),
                    st.integers(0, 4095),
                    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
                    .map(child.one_line))


@given(st.lists(reports, max_size=5), st.integers(1, 64))
def test_reports_come_back_whole_and_in_order_whatever_the_reads(sent, chunk):
    data = b"".join(r.pack() for r in sent)
    buf, got = bytearray(), []
    for at in range(0, len(data), chunk):
        buf += data[at:at + chunk]
        while (r := Report.take(buf)) is not None:
            got.append(r)
    assert got == sent and not buf


def test_a_partial_report_stays_in_the_buffer():
    data = Report(3, child.CTL, errno.EACCES, "no x").pack()
    for cut in range(len(data)):
        buf = bytearray(data[:cut])
        assert Report.take(buf) is None and buf == data[:cut]


def test_the_reason_is_one_line_and_at_most_reason_max_bytes():
    r = Report(0, child.CTL, errno.EPERM, "node 3:\n  not\tallowed\x00 ")
    assert Report.take(bytearray(r.pack())).reason == "node 3: not allowed"
    long = Report(0, child.CTL, errno.EPERM, "é" * REASON_MAX).pack()
    assert len(long) <= PIPE_BUF                        # one atomic write
    assert Report.take(bytearray(long)).reason == "é" * (REASON_MAX // 2)
    cut = Report(0, child.CTL, errno.EPERM, "a" + "é" * REASON_MAX).pack()   # mid-character
    assert Report.take(bytearray(cut)).reason == "a" + "é" * (REASON_MAX // 2 - 1) + "\ufffd"


def test_the_layout_is_the_one_bpsh_writes_today():
    """rank, stage, errno (i32), length (u16), reason: the fixed part of bpsh's records, with
    the stage numbers bpsh's children have always written (CTL 1, EXEC 2)."""
    assert (child.CTL, child.EXEC) == (1, 2)
    assert Report(7, child.CTL, errno.EIO, "why").pack() == \
        struct.pack("=iiiH", 7, 1, errno.EIO, 3) + b"why"
    assert len({child.READY, child.CTL, child.EXEC, child.SETUP, child.CWD}) == 5


@pytest.mark.parametrize("name, path, found", [
    ("ls", ":/bin:/usr/bin", ["./ls", "/bin/ls", "/usr/bin/ls"]),
    ("ls", "/bin/::sub", ["/bin/ls", "./ls", "sub/ls"]),
    ("a/b", "/bin", ["a/b"]),
    (b"ls", b"/bin::x", [b"/bin/ls", b"./ls", b"x/ls"]),
    (b"./x", b"/bin", [b"./x"]),
])
def test_path_candidates_follow_execvp(name, path, found):
    assert child.path_candidates(name, path) == found


def _run_forked(fn, keep=(), **kw):
    """fork_reset(fn) with a status pipe; (wait status, reports) once the child is gone."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = child.fork_reset(fn(w), w, keep, **kw)
    finally:
        os.close(w)
    data = bytearray()
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    reports = []
    while (rep := Report.take(data)) is not None:
        reports.append(rep)
    return status, reports


def test_fork_reset_resets_signals_closes_fds_and_exits_127():
    """The child has default dispositions (but ignored ones when asked), an empty mask, only
    0-2, its pipe and `keep` open; the parent's mask is as it was; fn returning is 127."""
    kept_r, kept_w = os.pipe()
    lost_r, lost_w = os.pipe()
    old_int = signal.signal(signal.SIGINT, lambda *a: None)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        def probe(w):
            def fn():
                fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
                ok = (signal.getsignal(signal.SIGINT) == signal.SIG_DFL
                      and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
                      and not signal.pthread_sigmask(signal.SIG_BLOCK, ())
                      and kept_w in fds and lost_w not in fds and w in fds
                      and len(set(fds) - {0, 1, 2, w, kept_w}) <= 1)  # + the listing's own
                os.write(w, Report(0, child.READY if ok else child.SETUP, 0, str(fds)).pack())
            return fn
        status, reports = _run_forked(probe, (kept_w,), keep_ignored=True)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == {signal.SIGUSR1}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGHUP, old_hup)
        for fd in (kept_r, kept_w, lost_r, lost_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 127
    assert [r.stage for r in reports] == [child.READY], reports


def test_fork_reset_setsid_stdio_and_a_failed_reset():
    """setsid gives the child a session of its own and `stdio` becomes 0-2; a reset that
    fails (stdio not an fd) is one SETUP report with the rank, then 127."""
    def probe(w):
        def fn():
            same = all(os.path.samestat(os.fstat(fd), os.stat("/dev/null")) for fd in (0, 1, 2))
            ok = os.getsid(0) == os.getpid() and same
            os.write(w, Report(0, child.READY if ok else child.SETUP, 0).pack())
        return fn
    null = os.open("/dev/null", os.O_RDWR)
    try:
        status, reports = _run_forked(probe, setsid=True, stdio=null)
    finally:
        os.close(null)
    assert os.waitstatus_to_exitcode(status) == 127 and [r.stage for r in reports] == [child.READY]
    status, reports = _run_forked(probe, stdio=1 << 20, rank=5)
    assert os.waitstatus_to_exitcode(status) == 127
    assert reports == [Report(5, child.SETUP, errno.EBADF)]


def test_a_child_reports_through_a_real_pipe():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, Report(0, child.READY, 0).pack())
            try:
                os.execve("/nonexistent/program", ["program"], {})
            except OSError as e:
                os.write(w, Report(0, child.EXEC, e.errno).pack())
        finally:
            os._exit(127)
    os.close(w)
    buf = bytearray()
    try:
        while chunk := os.read(r, 7):
            buf += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert Report.take(buf) == Report(0, child.READY, 0)
    assert Report.take(buf) == Report(0, child.EXEC, errno.ENOENT)
    assert Report.take(buf) is None and not buf


def test_importing_child_stays_light():
    """bpsh imports it at start-up: no signal, struct, enum or typing; nothing but what os and
    errno bring, which bpsh imports anyway."""
    code = ("import sys, os, errno\nsys.path.insert(0, sys.argv[1])\nbefore = set(sys.modules)\n"
            "import bpfs.child\nprint(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT)], check=True,
                         capture_output=True, text=True, timeout=30).stdout.split()
    assert set(out) <= {"bpfs", "bpfs.child", "bpfs.record", "_struct", "__future__"}, out

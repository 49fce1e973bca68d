"""bpfs.child: the reports a child writes on its status pipe before its program runs."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
from pathlib import Path

from hypothesis import given, strategies as st

from bpfs import child
from bpfs.child import REASON_MAX, Report

ROOT = Path(__file__).resolve().parents[2]
PIPE_BUF = select.PIPE_BUF

reports = st.builds(Report, st.integers(-1, 2**31 - 1),
                    st.sampled_from([child.READY, child.SETUP, child.CTL, child.CWD, child.EXEC]),
                    st.integers(0, 4095),
                    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
                    .map(child._one_line))


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
    """rank, stage, errno (i32), length (u16), reason: the fixed part of bpsh's records."""
    from bpfs.cli.bpsh.stdio import pack_failure
    assert Report(7, 1, errno.EIO, "why").pack() == pack_failure(7, 1, errno.EIO, "why")


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
    """bpsh imports it at start-up: no signal, struct, enum or typing."""
    code = ("import sys\nsys.path.insert(0, sys.argv[1])\nbefore = set(sys.modules)\n"
            "import bpfs.child\nprint(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT)], check=True,
                         capture_output=True, text=True, timeout=30).stdout.split()
    assert set(out) <= {"bpfs", "bpfs.child", "bpfs.record", "_struct", "__future__"}, out

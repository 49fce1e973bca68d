"""bptop over a directory laid out like /bproc: one frame in batch mode, busiest first."""

from __future__ import annotations

import pytest

from bpfs.cli import bptop
from bpfs.formats import ProcStatus
from bpfs.usage import Usage
from tests.unit.test_bpstat import ROWS, make_tree

pytestmark = pytest.mark.timeout(30)


def proc(pid: int, node: int, percent: float | None, state: str = "R") -> ProcStatus:
    u = None if percent is None else Usage(state=state, utime=65.0, stime=1.0, nice=3,
                                           rss=2 << 20, vsize=3 << 30, cpu_percent=percent)
    return ProcStatus(pid, node, "running", 0, 0, f"prog{pid} -x", 1700000000.0, usage=u)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    top = make_tree(tmp_path / "b", ROWS, procs=[proc(10, 1, 2.0, "S"), proc(20, 2, 99.0),
                                                 proc(30, 3, None), proc(40, 8, 50.5, "T")])
    monkeypatch.setenv("BPROC_MOUNT", str(top))
    return top


def test_one_batch_frame_lists_the_processes_busiest_first(tree, capsys) -> None:
    assert bptop.main(["-b", "-n", "1"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == "" and lines[0].startswith("bptop - ") and "10, 8 up, 2 not up" in lines[0]
    assert lines[1] == "Procs: 4 total, 1 running, 1 sleeping, 1 stopped, 0 zombie"
    assert lines[2].startswith("%Cpu: 151.5")
    assert lines[4] == bptop.COLUMNS
    assert [line.split()[0] for line in lines[5:]] == ["20", "40", "10", "30"]
    assert lines[5].split() == ["20", "2", "root", "3", "R", "99.0", "2048", "3.0g", "00:01:06",
                                "prog20", "-x"]
    assert lines[8].split()[3:6] == ["-", "-", "-"]


def test_a_nodespec_limits_the_view_and_n_counts_frames(tree, capsys) -> None:
    assert bptop.main(["-b", "-n", "2", "-d", "0.1", "1-3"]) == 0
    frames = capsys.readouterr().out.split("bptop - ")[1:]
    assert len(frames) == 2
    for frame in frames:
        pids = [line.split()[0] for line in frame.strip().splitlines()[5:]]
        assert pids == ["20", "10", "30"]

"""bpstat against a fake /bproc: plain files with the real layout, rendered by bpfs.formats."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpfs import formats
from bpfs.cli import bpstat
from bpfs.formats import Facts, NodeInfo, NodeRow, ProcStatus
from bpfs.usage import Usage

GiB = 1 << 30
ROOT = Path(__file__).resolve().parents[2]


def make_tree(top: Path, rows: list[NodeRow], infos: dict[int, NodeInfo] | None = None,
              procs: list[ProcStatus] = ()) -> Path:
    """A directory laid out like /bproc, with contents the master would render."""
    (top / "procs").mkdir(parents=True)
    (top / "status").write_text(formats.render_status(rows))
    (top / "events").write_text("")
    for r in rows:
        d = top / "nodes" / str(r.number)
        d.mkdir(parents=True)
        (d / "status").write_text(formats.render_word(r.state))
        info = (infos or {}).get(r.number, NodeInfo(address=r.address))
        (d / "info").write_text(formats.render_info(info))
        (d / "procs").write_text("")
        (d / "ctl").write_text("")
    for p in procs:
        (top / "procs" / str(p.pid)).mkdir()
        (top / "procs" / str(p.pid) / "status").write_text(formats.render_proc_status(p))
    return top


def row(n: int, state: str = "up", mode: int = 0o111, user: str = "root",
        group: str = "root") -> NodeRow:
    return NodeRow(n, state, mode, user, group, f"10.0.0.{n + 1}" if state == "up" else "")


# 0-3 up; 4 and 7 down; 5 owned by an unknown uid; 6 mode 0110; 8-9 up
ROWS = [row(0), row(1), row(2), row(3), row(4, "down"), row(5, user="#4242"),
        row(6, mode=0o110), row(7, "down"), row(8), row(9)]
INFOS = {n: NodeInfo(f"10.0.0.{n + 1}", Facts(f"n{n}", 2, "x86_64", "6.1", (0.25 * n, 0.1, 0.0),
                                          8 * GiB, 5 * GiB, 100.0), 3) for n in range(10)}


@pytest.fixture
def mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    top = make_tree(tmp_path / "bproc", ROWS, INFOS)
    monkeypatch.setenv("BPROC_MOUNT", str(top))
    monkeypatch.delenv("COLUMNS", raising=False)
    return top


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = bpstat.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def out_of(capsys: pytest.CaptureFixture, *args: str) -> list[str]:
    status, out, err = run(capsys, *args)
    assert (status, err) == (0, "")
    return out.splitlines()


HEADER = "Node(s)                            Status          Mode       User     Group"


def test_compact_table_merges_like_nodes_into_ranges_sorted_by_status(mount, capsys) -> None:
    assert out_of(capsys) == [
        HEADER,
        "4,7                                down            ---x--x--x root     root",
        "0-3                                up              ---x--x--x root     root",
        "5                                  up              ---x--x--x #4242    root",
        "6                                  up              ---x--x--- root     root",
        "8-9                                up              ---x--x--x root     root",
    ]
    assert out_of(capsys, "-c") == out_of(capsys)


def test_compact_reverse_flips_only_the_status_order(mount, capsys) -> None:
    assert [line.split()[0] for line in out_of(capsys, "-R")] == \
        ["Node(s)", "0-3", "5", "6", "8-9", "4,7"]


def test_compact_by_number_and_keep_order(mount, capsys) -> None:
    assert [line.split()[0] for line in out_of(capsys, "-N")[1:]] == \
        ["0-3", "4", "5", "6", "7", "8-9"]
    assert [line.split()[0] for line in out_of(capsys, "-O", "9,8,0-2,0,4")[1:]] == \
        ["9,8,0-2,0", "4"]


def test_compact_lines_split_at_the_column_width_and_never_mid_run() -> None:
    rows = [row(n) for n in range(0, 60, 2)]
    lines = bpstat.compact_table(rows, 57)           # 11 columns for the node list
    assert lines[0] == "Node(s)     Status          Mode       User     Group"
    nodes = [line.split()[0] for line in lines[1:]]
    assert all(len(n) <= 11 for n in nodes)
    assert ",".join(nodes).split(",") == [str(n) for n in range(0, 60, 2)]
    assert all(line.split()[1:] == ["up", "---x--x--x", "root", "root"] for line in lines[1:])


def test_compact_refuses_a_window_too_small(mount, capsys) -> None:
    with pytest.raises(bpstat.common.CliError):
        bpstat.compact_table(ROWS, 56)


def test_long_listing_has_address_load_and_memory(mount, capsys) -> None:
    lines = out_of(capsys, "-l")
    assert lines[0] == ("Node Address         Status       Mode          User       Group"
                        "       Load Memory")
    assert lines[1] == ("   0 10.0.0.1        up           ---x--x--x\troot       root"
                        "        0.00 3.0G/8.0G")
    assert lines[5] == ("   4 -               down         ---x--x--x\troot       root"
                        "           - -")
    assert lines[6].split() == ["5", "10.0.0.6", "up", "---x--x--x", "#4242", "root", "1.25",
                                "3.0G/8.0G"]
    assert lines[7].split()[3] == "---x--x---"
    assert len(lines) == 11
    # the tab puts User at column 48, as bproc's header expects
    assert lines[1].expandtabs().index("root") == lines[0].index("User") == 48


def test_long_listing_survives_a_missing_or_garbled_info(mount, capsys) -> None:
    (mount / "nodes/1/info").unlink()
    (mount / "nodes/2/info").write_text("nonsense\n")
    lines = out_of(capsys, "-l", "1-2")
    assert lines[1].split()[-2:] == ["-", "-"]
    assert lines[2].split()[-2:] == ["?", "?"]


@pytest.mark.parametrize("args, expected", [
    (["-a"], [f"10.0.0.{n + 1}" if n not in (4, 7) else "-" for n in range(10)]),
    (["-s"], [r.state for r in ROWS]),
    (["-n"], [str(n) for n in range(10)]),
    (["-t"], ["10"]),
    (["-t", "allup"], ["8"]),
    (["-t", "!down", "4"], ["9"]),
    (["-n", "-R"], [str(n) for n in range(9, -1, -1)]),
    (["-n", "-S"], ["4", "7", "0", "1", "2", "3", "5", "6", "8", "9"]),
    (["-n", "-S", "-R"], ["0", "1", "2", "3", "5", "6", "8", "9", "4", "7"]),
    (["-n", "-O", "3,1,1"], ["3", "1", "1"]),
    (["-n", "3,1"], ["1", "3"]),                  # sorted by number unless -O
    (["-n", "8-", "0"], ["0", "8", "9"]),         # several NODESPECs add up
    (["-n", "n2", ".3"], ["2", "3"]),
    (["-n", "down"], ["4", "7"]),
    (["-n", "99"], []),                           # unknown nodes are dropped, like bproc
    (["-s", "-O", "master"], ["up"]),
    (["-l", "-s"], [r.state for r in ROWS]),      # the last format flag wins
])
def test_script_friendly_formats(mount, capsys, args, expected) -> None:
    assert out_of(capsys, *args) == expected


def test_unknown_ids_show_as_hash_numbers(mount, capsys) -> None:
    assert "#4242" in out_of(capsys, "-l", "5")[1]


def test_bad_nodespec_is_a_one_line_error(mount, capsys) -> None:
    status, out, err = run(capsys, "1,bogus")
    assert status == 1 and out == ""
    assert err.startswith("bpstat: bad node specification 'bogus'") and err.count("\n") == 1


def test_missing_mount_says_so(tmp_path, capsys) -> None:
    status, out, err = run(capsys, "--mount", str(tmp_path / "nowhere"))
    assert status == 1
    assert "nowhere/status: No such file or directory" in err and "mounted" in err
    assert "Traceback" not in err


def test_mount_option_beats_environment(mount, tmp_path, capsys) -> None:
    other = make_tree(tmp_path / "other", [row(0), row(1)])
    assert out_of(capsys, "--mount", str(other), "-t") == ["2"]


def test_help_and_version(mount, capsys) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for opt in ("-c", "-l", "-a", "-s", "-n", "-t", "-R", "-N", "-S", "-O", "-U", "-p", "-P",
                "NODESPEC", "allup", "--mount"):
        assert opt in out
    assert run(capsys, "-h")[0] == 0
    assert out_of(capsys, "-V") == ["bpstat version 0.1.0"]


def test_unknown_option_is_a_usage_error(mount, capsys) -> None:
    status, _, err = run(capsys, "-x")
    assert status == 2 and "No such option" in err


# ---- processes ----------------------------------------------------------------------

PROCS_HEADER = "PID\tNode\t%CPU\tRSS\tTIME"


def proc(pid: int, node: int, state: str = "running") -> ProcStatus:
    return ProcStatus(pid, node, state, 0, 0, "sleep 100", 1700000000.0)


def test_process_list_is_only_the_header_without_processes(mount, capsys) -> None:
    assert out_of(capsys, "-p") == [PROCS_HEADER]


def test_process_list_without_a_procs_directory(mount, capsys) -> None:
    (mount / "procs").rmdir()
    assert out_of(capsys, "-p") == [PROCS_HEADER]


def test_process_list(tmp_path, monkeypatch, capsys) -> None:
    top = make_tree(tmp_path / "b", ROWS, procs=[proc(300, 2), proc(40, 1), proc(50, 3, "exited")])
    monkeypatch.setenv("BPROC_MOUNT", str(top))
    assert out_of(capsys, "-p") == [PROCS_HEADER, "40\t1\t-\t-\t-", "300\t2\t-\t-\t-"]
    assert out_of(capsys, "-p", "2") == [PROCS_HEADER, "300\t2\t-\t-\t-"]


def test_process_list_has_cpu_rss_and_time_once_reported(tmp_path, monkeypatch, capsys) -> None:
    spin = Usage(state="R", utime=3725.4, stime=0.7, rss=5 * 1024 * 1024, cpu_percent=99.5)
    top = make_tree(tmp_path / "b", ROWS, procs=[
        ProcStatus(300, 2, "running", 0, 0, "spin", 1700000000.0, usage=spin)])
    monkeypatch.setenv("BPROC_MOUNT", str(top))
    lines = out_of(capsys, "-p")
    assert lines == [PROCS_HEADER, "300\t2\t99.5\t5120\t01:02:06"]
    assert [line.split("\t")[:2] for line in lines] == [["PID", "Node"], ["300", "2"]]


def test_ps_output_gets_a_node_column(tmp_path, monkeypatch, capsys) -> None:
    top = make_tree(tmp_path / "b", ROWS, procs=[proc(4242, 3), proc(1234567, 1)])
    monkeypatch.setenv("BPROC_MOUNT", str(top))
    ps = ("    PID TTY          TIME CMD\n"
          "      1 ?        00:00:01 init\n"
          "   4242 pts/0    00:00:00 sleep\n"
          "1234567 pts/0    00:00:00 big\n")
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(ps))
    assert out_of(capsys, "-P") == ["NODE\t    PID TTY          TIME CMD",
                                    "\t      1 ?        00:00:01 init",
                                    "3\t   4242 pts/0    00:00:00 sleep",
                                    "1\t1234567 pts/0    00:00:00 big"]


def test_node_of_address(mount, capsys) -> None:
    assert out_of(capsys, "-A", "10.0.0.4") == ["3"]
    status, _, err = run(capsys, "-A", "10.9.9.9")
    assert status == 1 and "no node with address 10.9.9.9" in err


@pytest.mark.parametrize("n, text", [(0, "0B"), (1023, "1023B"), (1024, "1.0K"),
                                     (int(3.65 * GiB), "3.7G"), (13 * GiB + 1, "14G"),
                                     (8 * GiB, "8.0G"), (1 << 50, "1.0P")])
def test_human_sizes_are_written_like_df_h(n: int, text: str) -> None:
    assert bpstat.human(n) == text


# ---- -U: redraw when an event arrives ---------------------------------------------

def _env(top: Path) -> dict:
    return dict(os.environ, BPROC_MOUNT=str(top), PYTHONPATH=str(ROOT))


def _read_until(fd: int, needle: bytes, timeout: float = 10) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf!r}")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"EOF waiting for {needle!r}; got {buf!r}")
        buf += chunk
    return buf


def test_update_redraws_on_each_event_and_ends_cleanly_on_ctrl_c(tmp_path) -> None:
    top = make_tree(tmp_path / "b", ROWS[:3])
    (top / "events").unlink()
    os.mkfifo(top / "events")
    writer = os.open(top / "events", os.O_RDWR)     # a live "events" that blocks readers
    p = subprocess.Popen([sys.executable, "-m", "bpfs.cli.bpstat", "-U"], env=_env(top),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = _read_until(p.stdout.fileno(), b"0-2 ")
        assert first.startswith(bpstat.CLEAR.encode())
        (top / "status").write_text(formats.render_status([ROWS[0], ROWS[1], row(2, "down")]))
        os.write(writer, formats.render_event(formats.Event(1.0, "node", 2, "state", "down"))
                 .encode())
        second = _read_until(p.stdout.fileno(), b"0-1 ")
        assert b"2       " in second and b"down" in second
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 130
        assert p.stderr.read() == b"\n"
    finally:
        os.close(writer)
        if p.poll() is None:
            p.kill()
            p.wait()


def test_update_polls_when_events_gives_end_of_file(tmp_path) -> None:
    top = make_tree(tmp_path / "b", ROWS[:2])
    p = subprocess.Popen([sys.executable, "-m", "bpfs.cli.bpstat", "-U", "-t"], env=_env(top),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _read_until(p.stdout.fileno(), b"2\n")
        (top / "status").write_text(formats.render_status(ROWS[:3]))
        _read_until(p.stdout.fileno(), b"3\n")
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=10)


# ---- start-up cost ----------------------------------------------------------------

@pytest.mark.parametrize("module", ["bpfs.cli.bpstat", "bpfs.cli.bpctl"])
def test_the_clis_import_nothing_heavy(module: str) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert module in imported
    heavy = {m for m in imported if m.split(".")[0] in ("trio", "msgpack", "psutil", "pyfuse3")}
    assert not heavy

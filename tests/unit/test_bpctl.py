"""bpctl against a fake /bproc whose ctl files are plain files we can read back."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bpfs import formats
from bpfs.cli import bpctl
from bpfs.cli.common import CliError
from bpfs.formats import NodeRow

ROOT = Path(__file__).resolve().parents[2]
STATES = {0: "up", 1: "up", 2: "up", 3: "down", 4: "up"}


def make_tree(top: Path, states: dict[int, str] = STATES) -> Path:
    rows = [NodeRow(n, s, 0o111, "root", "root", "") for n, s in states.items()]
    top.mkdir(parents=True)
    (top / "status").write_text(formats.render_status(rows))
    for r in rows:
        d = top / "nodes" / str(r.number)
        d.mkdir(parents=True)
        (d / "status").write_text(formats.render_word(r.state))
        (d / "ctl").write_text("")
        os.chmod(d, 0o111)
    return top


@pytest.fixture
def mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    top = make_tree(tmp_path / "bproc")
    monkeypatch.setenv("BPROC_MOUNT", str(top))
    return top


def ctl(mount: Path, node: int) -> list[str]:
    return (mount / "nodes" / str(node) / "ctl").read_text().splitlines()


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = bpctl.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def ok(capsys: pytest.CaptureFixture, *args: str) -> None:
    assert run(capsys, *args) == (0, "", "")


def test_commands_are_written_to_each_node_in_the_order_given(mount, capsys) -> None:
    ok(capsys, "-S", "1-2", "-s", "unavailable", "-R", "-H", "-P", "-s", "up")
    for n in (1, 2):
        assert ctl(mount, n) == ["state unavailable", "reboot", "halt", "pwroff", "state up"]
    assert ctl(mount, 0) == ctl(mount, 4) == []


def test_each_s_applies_to_the_latest_set(mount, capsys) -> None:
    ok(capsys, "-S", "0", "-R", "-S", "4,2", "-H", "-S", "allup", "-s", "boot")
    assert ctl(mount, 0) == ["reboot", "state boot"]
    assert ctl(mount, 4) == ["halt", "state boot"]
    assert ctl(mount, 2) == ["halt", "state boot"]
    assert ctl(mount, 3) == []                      # down, so not in allup


def test_nodespec_forms_are_resolved_against_status(mount, capsys) -> None:
    ok(capsys, "-S", "!up", "-s", "up")
    assert [n for n in STATES if ctl(mount, n)] == [3]
    ok(capsys, "-S", "3-", "-H")
    assert ctl(mount, 3) == ["state up", "halt"] and ctl(mount, 4) == ["halt"]


def test_getopt_style_bundles_values_and_long_options(mount, capsys) -> None:
    ok(capsys, "-S1", "-RHs", "halt", "--state=up", "--pw", "--slave", "2", "--reboot", "-f")
    assert ctl(mount, 1) == ["reboot", "halt", "state halt", "state up", "pwroff"]
    assert ctl(mount, 2) == ["reboot"]


def test_mode_user_and_group_change_the_node_directory(mount, capsys) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    ok(capsys, "-S", "1,2", "-m", "0110", "-u", "4242", "-g", "4343", "-m", "100")
    for n in (1, 2):
        st = os.stat(mount / "nodes" / str(n))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o100, 4242, 4343)
    assert stat.S_IMODE(os.stat(mount / "nodes/0").st_mode) == 0o111
    ok(capsys, "-S", "1", "-u", "root", "-g", "root")
    st = os.stat(mount / "nodes/1")
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_actions_of_different_kinds_keep_their_order(mount, capsys, monkeypatch) -> None:
    """chmod/chown leave a mark in the ctl file so one log shows the global order."""
    real_chmod = os.chmod

    def mark(path, text: str) -> None:
        with open(os.path.join(path, "ctl"), "a") as f:
            f.write(text + "\n")
    monkeypatch.setattr(os, "chmod", lambda p, m: (real_chmod(p, m), mark(p, f"chmod {m:o}")))
    monkeypatch.setattr(os, "chown", lambda p, u, g: (mark(p, f"chown {u} {g}")))
    ok(capsys, "-S", "0", "-s", "up", "-m", "0110", "-R", "-u", "7", "-g", "8", "-P")
    assert ctl(mount, 0) == ["state up", "chmod 110", "reboot", "chown 7 -1", "chown -1 8",
                             "pwroff"]


def test_a_failing_node_is_reported_and_the_others_go_on(mount, capsys) -> None:
    shutil.rmtree(mount / "nodes/1")                     # listed in status, but gone
    os.unlink(mount / "nodes/2/ctl")
    os.mkdir(mount / "nodes/2/ctl")                      # write() fails: EISDIR
    status, out, err = run(capsys, "-S", "0-2,4", "-R", "-m", "0111")
    assert status == 1 and out == ""
    assert err.splitlines() == ["1: No such file or directory", "2: Is a directory",
                                "1: No such file or directory"]
    assert ctl(mount, 0) == ctl(mount, 4) == ["reboot"]


def test_an_unknown_node_number_is_reported(mount, capsys) -> None:
    status, _, err = run(capsys, "-S", "0,99", "-H")
    assert status == 1 and err == "99: No such file or directory\n"
    assert ctl(mount, 0) == ["halt"]


def test_permission_errors_come_back_as_bproc_does(tmp_path) -> None:
    """A user who does not own a node may not chmod it: `N: Operation not permitted`."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    if not all(os.stat(d).st_mode & 0o005 == 0o005 for d in [ROOT, *ROOT.parents]):
        pytest.skip("the checkout is not readable by other users")
    top = Path(tempfile.mkdtemp(prefix="bpctl-test-"))
    try:
        os.chmod(top, 0o755)
        make_tree(top / "bproc", {0: "up", 1: "up"})
        os.chown(top / "bproc/nodes/0", 65534, 65534)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                            sys.executable, "-m", "bpfs.cli.bpctl", "--mount", str(top / "bproc"),
                            "-S", "0-1", "-m", "0100"],
                           capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT),
                                    PYTHONDONTWRITEBYTECODE="1"))
        assert (r.returncode, r.stdout, r.stderr) == (1, "", "1: Operation not permitted\n")
        assert stat.S_IMODE(os.stat(top / "bproc/nodes/0").st_mode) == 0o100
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("args, message", [
    (["-S", "0", "-R", "-u", "no-such-user-xyz"], "bpctl: unknown user: no-such-user-xyz\n"),
    (["-S", "0", "-R", "-g", "no-such-group-xyz"], "bpctl: unknown group: no-such-group-xyz\n"),
    (["-S", "0", "-R", "-m", "0999"], "bpctl: invalid mode: 0999 (an octal number such as 0111)\n"),
    (["-S", "0", "-R", "-m", "70000"], "bpctl: invalid mode: 70000 (an octal number such as "
                                       "0111)\n"),
    (["-S", "0", "-R", "-s", "sleepy"], "bpctl: unknown state: sleepy (states: "
                                        + ", ".join(formats.NODE_STATES) + ")\n"),
    (["-S", "0", "-R", "-S", "0-x", "-H"], "bpctl: bad node specification '0-x': not a node "
                                           "number, range, 'all', 'master' or [all][!|not]STATE "
                                           "(" + ", ".join(formats.NODE_STATES) + ")\n"),
])
def test_bad_values_change_nothing_and_exit_1(mount, capsys, args, message) -> None:
    assert run(capsys, *args) == (1, "", message)
    assert ctl(mount, 0) == []


@pytest.mark.parametrize("args, words", [
    ([], "nothing to do"),
    (["-S", "1"], "nothing to do"),
    (["-s", "up", "-S", "1"], "-s needs nodes"),
    (["-S", "1", "-x"], "unknown option '-x'"),
    (["-S", "1", "--bogus"], "unknown option '--bogus'"),
    (["-S", "1", "--h"], "ambiguous option '--h'"),       # --help or --halt
    (["-S", "1", "--reboot=now"], "takes no value"),
    (["-S"], "option '-S' needs a value"),
    (["-S", "1", "--state"], "option '--state' needs a value"),
    (["-S", "1", "-R", "stray"], "unexpected argument 'stray'"),
])
def test_usage_errors_exit_2(mount, capsys, args, words) -> None:
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    assert err.startswith("bpctl: ") and words in err and "--help" in err


def test_help_and_version(mount, capsys) -> None:
    status, out, _ = run(capsys, "-S", "1", "-R", "--help")
    assert status == 0 and ctl(mount, 1) == []
    for opt in ("-S", "-s", "-R", "-H", "-P", "-m", "-u", "-g", "--mount", "NODESPEC"):
        assert opt in out
    assert run(capsys, "-V") == (0, "bpctl version 0.1.0\n", "")


def test_mount_option(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("BPROC_MOUNT", raising=False)
    other = make_tree(tmp_path / "other")
    ok(capsys, "-S", "1", "-R", "--mount", str(other))
    assert ctl(other, 1) == ["reboot"]


def test_missing_mount_says_so(tmp_path, capsys) -> None:
    status, _, err = run(capsys, "--mount", str(tmp_path / "nope"), "-S", "allup", "-R")
    assert status == 1 and "nope/status: No such file or directory" in err


def test_parse_argv_keeps_order() -> None:
    pairs = bpctl.parse_argv(["-S", "1", "-Rm0110", "--user=bob", "-S2", "-g", "x"])
    assert [(o.short or o.long, v) for o, v in pairs] == \
        [("S", "1"), ("R", ""), ("m", "0110"), ("u", "bob"), ("S", "2"), ("g", "x")]
    with pytest.raises(CliError):
        bpctl.parse_argv(["--"] + ["x"])

"""bpsh's command line without a master: option parsing, command lookup, the ctl request
each child writes (bpsh run for real against the fake node of tests/unit/bpsh_fake.py).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from bpfs.cli import bpsh
from bpfs.formats import NodeRow, render_status
from bpfs.wire.execreq import ExecMove, parse_execmove, split_ctl_words
from tests.unit.bpsh_fake import mount, run  # noqa: F401  (fixtures)


# ---- option parsing -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, spec, command", [
    (["1", "ls", "-la"], "1", ["ls", "-la"]),
    (["-p", "1", "-L", "ls", "-la", "-p"], "1", ["ls", "-la", "-p"]),
    (["3", "sh", "-c", "echo $x"], "3", ["sh", "-c", "echo $x"]),
    (["--", "2", "--", "-weird"], "2", ["-weird"]),
    (["-1", "hostname"], "-1", ["hostname"]),
    (["-l", "user", "0-3", "cat", "-"], "0-3", ["cat", "-"]),
])
def test_options_stop_at_the_command(argv, spec, command):
    args = bpsh.parse_args(argv)
    assert (args.nodespec, args.command) == (spec, command)


def test_all_nodes_take_the_nodespec_place():
    args = bpsh.parse_args(["-a", "uptime", "-x"])
    assert args.all_up and args.nodespec is None and args.command == ["uptime", "-x"]
    assert bpsh.parse_args(["-A", "-s", "w"]).all_avail


def test_io_options():
    assert bpsh.parse_args(["-n", "1", "c"]).io == ["null", "socket", "socket"]
    assert bpsh.parse_args(["-N", "1", "c"]).io == ["null"] * 3
    args = bpsh.parse_args(["-Iin", "-O", "out", "--stderr=err", "1", "c"])
    assert args.io == ["file:in", "file:out", "file:err"]
    args = bpsh.parse_args(["--stdin", "a b", "-N", "-O", "o", "1", "c"])   # order matters
    assert args.io == ["null", "file:o", "null"]


def test_output_options():
    o = bpsh.parse_args(["-p", "1", "c"]).output
    assert o.prefix and o.line_buffered and not o.sequential
    o = bpsh.parse_args(["-d", "-b", "0x100", "1", "c"]).output
    assert o.dividers and o.sequential and o.buffer_size == 256
    o = bpsh.parse_args(["-sLb10", "1", "c"]).output
    assert o.sequential and o.line_buffered and o.buffer_size == 10
    assert bpsh.parse_args(["--time", "--mount", "/m", "1", "c"]).mount == "/m"
    assert bpsh.parse_args(["-t", "1", "c"]).time


@pytest.mark.parametrize("argv, message", [
    (["-x", "1", "c"], "invalid option -- 'x'"),
    (["-b", "0", "1", "c"], "Invalid buffer size: 0"),
    (["-b", "lots", "1", "c"], "Invalid buffer size: lots"),
    (["--bogus", "1", "c"], "unrecognized option '--bogus'"),
    (["1", "-I"], "option requires an argument -- 'I'"),
])
def test_bad_options(argv, message):
    with pytest.raises(bpsh.UsageError, match=message):
        bpsh.parse_args(argv)


def test_help_and_usage(run):
    r = run("--help")
    assert r.returncode == 0 and b"usage: bpsh" in r.stdout and b"-p" in r.stdout
    r = run("1")
    assert r.returncode == 2 and b"bpsh: a node specification and a command" in r.stderr
    r = run("-q", "1", "true")
    assert r.returncode == 2 and r.stderr.startswith(b"bpsh: invalid option -- 'q'")
    assert b"Traceback" not in r.stderr


# ---- command lookup -----------------------------------------------------------------------

def test_which(tmp_path: Path):
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    (tmp_path / "dir").mkdir()
    (tmp_path / "plain").write_text("")
    assert bpsh.which("prog", f"/nonexistent:{tmp_path}") == f"{tmp_path}/prog"
    assert bpsh.which("prog", "/nonexistent") is None
    assert bpsh.which("dir", str(tmp_path)) is None
    assert bpsh.which("plain", str(tmp_path)) is None
    assert bpsh.which(str(prog)) == str(prog)
    assert bpsh.which(str(tmp_path / "plain")) is None
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert bpsh.which("prog", "/nonexistent::") == "./prog"     # empty entry is "."
        assert bpsh.which("./prog", "") == "./prog"
    finally:
        os.chdir(old)


def test_command_not_found_before_anything(run, mount):
    r = run("0", "no-such-command-here")
    assert r.returncode == 1
    assert r.stderr == b"bpsh: no-such-command-here: command not found\n"
    assert (mount / "nodes" / "0" / "ctl").read_text() == ""


def test_not_mounted(run, tmp_path):
    r = run("--mount", str(tmp_path / "nowhere"), "0", "true")
    assert r.returncode == 1 and b"is bpfs mounted?" in r.stderr


def test_bad_nodespec(run):
    r = run("upp", "true")
    assert r.returncode == 1 and r.stderr.startswith(b'bpsh: Invalid node specification "upp"')


def test_empty_node_list_is_fine(run, mount):
    (mount / "status").write_text(render_status([NodeRow(0, "down", 0o111, "root", "root", "")]))
    r = run("allup", "echo", "x")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


# ---- the request each child writes ---------------------------------------------------------

def _request(mount: Path, node: int) -> ExecMove:
    line = (mount / "nodes" / str(node) / "ctl").read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    words = split_ctl_words(line)
    assert words[0] == "execmove"
    return parse_execmove(words[1:])


def test_requests_one_per_node(run, mount):
    r = run("2,0,1", "true")
    assert r.returncode == 0, r.stderr
    reqs = {n: _request(mount, n) for n in (0, 1, 2)}
    assert {n: q.rank for n, q in reqs.items()} == {2: 0, 0: 1, 1: 2}
    assert len({(q.port, q.token) for q in reqs.values()}) == 1
    assert all(q.io == ("socket",) * 3 for q in reqs.values())
    assert len(reqs[0].token) == 32


@pytest.mark.parametrize("opts, io", [
    (["-n"], ("null", "socket", "socket")),
    (["-I", "/in file", "-O", "/o", "-E", "/e"], ("file:/in file", "file:/o", "file:/e")),
])
def test_request_io(run, mount, opts, io):
    assert run(*opts, "3", "true", env={"FAKE_NO_LINKS": "1"}).returncode == 0
    assert _request(mount, 3).io == io


def test_request_io_follows_what_our_fds_are(run, mount, tmp_path):
    """/dev/null needs no link; stdout and stderr that are one file need one link."""
    def io(**kw) -> tuple[str, ...]:
        r = run("3", "true", env={"FAKE_NO_LINKS": "1"}, **kw)
        assert r.returncode == 0, r.stderr
        return _request(mount, 3).io
    with open(os.devnull, "r+b") as null:
        assert io(input=None, stdin=null, stdout=null, stderr=null) == ("null",) * 3
    assert io(stderr=subprocess.STDOUT) == ("socket", "socket", "stdout")
    with open(tmp_path / "log", "wb") as log:
        assert io(input=None, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT) \
            == ("socket", "socket", "stdout")


def test_merged_output_arrives_in_order(run):
    r = run("-p", "0,1", "sh", "-c", "echo out; echo err >&2; echo out2",
            stderr=subprocess.STDOUT)
    assert r.returncode == 0
    for n in (0, 1):
        assert [ln for ln in r.stdout.decode().splitlines() if ln.startswith(f"  {n}:")] \
            == [f"  {n}: out", f"  {n}: err", f"  {n}: out2"]


def test_plan_io_on_real_fds(tmp_path):
    null = os.open(os.devnull, os.O_RDWR)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    f = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    g = os.open(tmp_path / "f", os.O_WRONLY)        # the same file, another description
    try:
        def plan(fds, io=("socket",) * 3):
            io = list(io)
            bpsh.plan_io(io, fds)
            return io
        assert plan((null, null, null)) == ["null"] * 3
        assert plan((null, null, null), ("socket", "file:/o", "socket")) == \
            ["null", "file:/o", "null"]
        assert plan((r1, w1, w1)) == ["socket", "socket", "stdout"]
        assert plan((r1, w1, w2)) == ["socket"] * 3
        assert plan((r1, w1, null)) == ["socket", "socket", "null"]
        assert plan((r1, w1, w1), ("socket", "socket", "file:/e")) == \
            ["socket", "socket", "file:/e"]
        assert plan((r1, f, f)) == ["socket", "socket", "stdout"]
        assert plan((r1, f, g)) == ["socket", "socket", "stdout"]    # both at offset 0
        os.write(f, b"x")
        assert plan((r1, f, g)) == ["socket"] * 3    # writes through g would land elsewhere
        assert plan((r1, 99999, w1)) == ["socket"] * 3      # a closed fd: left alone
    finally:
        for fd in (null, r1, w1, r2, w2, f, g):
            os.close(fd)


def test_no_io_single_node_execmoves_itself(run, mount):
    r = run("-N", "1", "sh", "-c", "exit 7")
    assert r.returncode == 7
    assert _request(mount, 1).io == ("null",) * 3


def test_environment_and_rank(run):
    r = run("-s", "1,1,0", "sh", "-c", 'echo "$BPROC_RANK $BPROC_PROGNAME $HOME"',
            env={"HOME": "/some/home"})
    sh = bpsh.which("sh")
    assert r.stdout.decode().splitlines() == [f"{i:07d} {sh} /some/home" for i in range(3)]


def test_ctl_failure_is_reported_per_node(run, mount):
    (mount / "nodes" / "2" / "ctl").unlink()
    (mount / "nodes" / "2" / "ctl").mkdir()                 # open for writing: EISDIR
    r = run("-p", "0,2,7", "echo", "hi")
    assert r.returncode == 1
    assert r.stdout == b"  0: hi\n"
    err = r.stderr.decode().splitlines()
    assert sorted(err) == ["2: Is a directory", "7: No such device"]


def test_migration_error_header(run):
    """A failed migration: the master's reason (one line), then bproc's `N: strerror`."""
    r = run("0,1", "true", env={"FAKE_FAIL": str(errno.EHOSTUNREACH)})
    assert r.returncode == 255
    lines = r.stderr.decode().splitlines()
    assert sorted(lines) == ["0: No route to host", "1: No route to host",
                             "bpsh: node 0: no route to it", "bpsh: node 1: no route to it"]
    for n in (0, 1):
        assert lines.index(f"bpsh: node {n}: no route to it") + 1 == \
            lines.index(f"{n}: No route to host")

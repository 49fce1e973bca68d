"""bpsh without a master: option parsing, the ctl request, the stdio server, exit statuses.

Two kinds of tests:
- the stdio server in-process, with fake node connections made by threads of the test
  and real children (forked, released by the test) whose wait statuses it reaps;
- bpsh run for real against a fake $MOUNT (a `status` file and plain `nodes/N/ctl`
  files) with a fake node: `bpsh.EXEC_PREFIX` makes each child exec `fake_node.py`
  (written below) instead of the command. It reads the request bpsh's child wrote to
  nodes/N/ctl, connects the "socket" fds back with the header of bpfs.wire.execreq (or
  sends the `err` header), puts them on fds 0-2 and execs the command: exactly the
  node's part, done in place, with the same PID as the "ghost".
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bpfs.cli import bpsh
from bpfs.cli.bpsh.stdio import (REASON_MAX, STAGE_CTL, OutputOptions, Proc, StdioServer,
                                 pack_failure)
from bpfs.formats import NodeRow, render_status
from bpfs.wire.execreq import (ExecMove, parse_execmove, render_error, render_header,
                               render_ranks, split_ctl_words)

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

FAKE_NODE = '''
import os, socket, sys
from bpfs.wire.execreq import parse_execmove, render_error, render_header, split_ctl_words
node, path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(os.path.join(os.environ["FAKE_MOUNT"], "nodes", node, "ctl")) as f:
    req = parse_execmove(split_ctl_words(f.readline())[1:])
pid = os.getpid()
if os.environ.get("FAKE_FAIL"):
    s = socket.create_connection(("127.0.0.1", req.port))
    s.sendall(render_error(req.token, pid, int(os.environ["FAKE_FAIL"]),
                           f"node {node}: no route\\nto it"))
    os._exit(255)
if os.environ.get("FAKE_NO_LINKS"):
    os.execv(path, argv)
for fd, spec in enumerate(req.io):
    if spec == "socket":
        s = socket.create_connection(("127.0.0.1", req.port))
        s.sendall(render_header(req.token, pid, fd))
        os.dup2(s.fileno(), fd)
        s.close()
    elif spec == "stdout":
        os.dup2(1, 2)
    else:
        name = "/dev/null" if spec == "null" else spec[5:]
        flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        new = os.open(name, flags, 0o666)
        os.dup2(new, fd)
        os.close(new)
os.execv(path, argv)
'''

RUNNER = '''
import sys
import bpfs.cli.bpsh as b, bpfs.cli.bpcp as c, bpfs.cli.bpsh.stdio as s
b.EXEC_PREFIX[:] = [sys.executable, {fake!r}]
s.LATE_GRACE = {grace!r}
sys.exit((c if sys.argv[1] == "bpcp" else b).main(sys.argv[2:]))
'''


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def mount(tmp_path: Path) -> Path:
    """A fake /bproc: nodes 0-3 up, 4 down, ctl files as plain files."""
    m = tmp_path / "mnt"
    rows = [NodeRow(n, "down" if n == 4 else "up", 0o111, "root", "root", "127.0.0.1")
            for n in range(5)]
    (m / "nodes").mkdir(parents=True)
    (m / "status").write_text(render_status(rows))
    for n in range(5):
        (m / "nodes" / str(n)).mkdir()
        (m / "nodes" / str(n) / "ctl").write_text("")
    return m


class Runner:
    def __init__(self, tmp: Path, mount: Path, grace: float = 0.3) -> None:
        fake = tmp / "fake_node.py"
        fake.write_text(FAKE_NODE)
        self.script = tmp / "runner.py"
        self.script.write_text(RUNNER.format(fake=str(fake), grace=grace))
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_MOUNT=str(mount),
                        BPROC_MOUNT=str(mount))
        self.env.pop("BPROC_RANK", None)

    def __call__(self, *args: str, prog: str = "bpsh", input: bytes | None = b"",
                 env: dict | None = None, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run([PY, str(self.script), prog, *args], input=input,
                              timeout=timeout, env=dict(self.env, **(env or {})), **kw)


@pytest.fixture
def run(tmp_path: Path, mount: Path) -> Runner:
    return Runner(tmp_path, mount)


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


# ---- stdio through the fake node -------------------------------------------------------------

def test_stdout_stderr_and_prefix(run):
    r = run("-p", "0,1,2", "sh", "-c", 'echo out $BPROC_RANK; echo err >&2')
    assert sorted(r.stdout.decode().splitlines()) == [
        "  0: out 0000000", "  1: out 0000001", "  2: out 0000002"]
    assert sorted(r.stderr.decode().splitlines()) == ["  0: err", "  1: err", "  2: err"]


def test_stdin_broadcast_to_three_nodes(run):
    data = os.urandom(300_000)
    r = run("-s", "0,1,2", "cat", input=data)
    assert r.returncode == 0 and r.stdout == data * 3


def test_sequential_dividers(run):
    r = run("-d", "2,0", "sh", "-c", "echo a; sleep 0.2; echo b")
    div = "-" * 69
    assert r.stdout.decode() == f"2\t{div}\na\nb\n0\t{div}\na\nb\n"


def test_master_runs_here(run):
    r = run("-p", "master,0", "sh", "-c", "cat; echo $BPROC_RANK", input=b"in\n")
    assert sorted(r.stdout.decode().splitlines()) == sorted([
        " -1: 0000000", " -1: in", "  0: 0000001", "  0: in"])


def test_remote_file_redirections(run, tmp_path):
    (tmp_path / "in").write_bytes(b"from a file\n")
    r = run("-I", str(tmp_path / "in"), "-O", str(tmp_path / "out"), "1", "cat")
    assert r.returncode == 0 and r.stdout == b""
    assert (tmp_path / "out").read_bytes() == b"from a file\n"


def test_exit_status_is_the_largest(run):
    r = run("0,1,2", "sh", "-c", "exit $(( ${BPROC_RANK#000000} * 21 ))")
    assert r.returncode == 42 and r.stderr == b""


def test_killed_child_is_abnormal(run):
    r = run("0,1", "sh", "-c", '[ "$BPROC_RANK" = 0000001 ] && kill -9 $$; exit 3')
    assert r.returncode == 255
    assert r.stderr == b"bpsh: Child process on node 1 exited abnormally.\n"


def test_no_hang_when_links_never_come(run):
    start = time.monotonic()
    r = run("0,1", "sh", "-c", "exit 4", env={"FAKE_NO_LINKS": "1"})
    assert r.returncode == 4
    assert time.monotonic() - start < 5


def test_broken_stdout_stops_the_remote_writer(run, tmp_path):
    p = subprocess.Popen(f"{PY} {run.script} bpsh 0 yes | head -3", shell=True,
                         stdout=subprocess.PIPE, env=run.env)
    out, _ = p.communicate(timeout=20)
    assert out == b"y\ny\ny\n"


def test_sigint_is_forwarded_and_bpsh_dies_of_it(run):
    p = subprocess.Popen([PY, str(run.script), "bpsh", "0,1", "sleep", "30"], env=run.env,
                         stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=10)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGINT and err == b""


def test_time_option(run):
    r = run("-t", "0", "true")
    assert r.returncode == 0 and float(r.stdout) < 10


def test_throughput_100mb(run, tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 100)
    start = time.monotonic()
    r = run("0", "cat", str(big))
    took = time.monotonic() - start
    assert r.returncode == 0 and r.stdout == big.read_bytes()
    print(f"100 MiB through bpsh in {took:.2f}s")


# ---- the stdio server in-process ---------------------------------------------------------------

class Children:
    """Real children that exit (with a code or by a signal) when the test says so."""

    def __init__(self) -> None:
        self.gates: dict[int, int] = {}

    def spawn(self, code: int = 0, sig: int = 0) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            for gate in self.gates.values():    # the others' gates: each child ends alone
                os.close(gate)
            os.read(r, 1)
            if sig:
                os.kill(os.getpid(), sig)
            os._exit(code)
        os.close(r)
        self.gates[pid] = w
        return pid

    def release(self, pid: int) -> None:
        w = self.gates.pop(pid, None)
        if w is not None:
            os.close(w)

    def cleanup(self) -> None:
        for pid in list(self.gates):
            self.release(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


@pytest.fixture
def children():
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


class Served:
    """A StdioServer with files as stdout/stderr and a listener on loopback."""

    def __init__(self, tmp: Path, options: OutputOptions | None = None,
                 stdin: bytes | None = None, grace: float = 0.5, node_gone=None,
                 status_fd: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.token = os.urandom(16).hex()
        self.out = open(tmp / "out", "w+b")
        self.err = open(tmp / "err", "w+b")
        stdin_fd = None
        if stdin is not None:
            (tmp / "in").write_bytes(stdin)
            self.inp = open(tmp / "in", "rb")
            stdin_fd = self.inp.fileno()
        self.server = StdioServer(self.listener, self.token, options, stdin_fd=stdin_fd,
                                  stdout_fd=self.out.fileno(), stderr_fd=self.err.fileno(),
                                  late_grace=grace, node_gone=node_gone, status_fd=status_fd)

    def send_error(self, pid: int, err: int) -> None:
        """The `err` link a node (or the master) sends when the migration of `pid` failed."""
        with socket.create_connection(("127.0.0.1", self.port)) as c:
            c.sendall(render_error(self.token, pid, err, "failed"))

    def connect(self, pid: int, fd: int, token: str | None = None) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.sendall(render_header(token or self.token, pid, fd))
        return s

    def run(self, feeder) -> list[Proc]:
        t = threading.Thread(target=feeder, daemon=True)
        t.start()
        try:
            return self.server.run()
        finally:
            t.join(10)
            self.listener.close()

    def output(self) -> tuple[bytes, bytes]:
        self.out.seek(0)
        self.err.seek(0)
        return self.out.read(), self.err.read()


def test_server_right_token_flows_wrong_token_dropped(tmp_path, children):
    s = Served(tmp_path)
    pid = children.spawn(3)
    s.server.add_process(0, 5, pid, {1, 2})

    def feed():
        bad = s.connect(pid, 1, token="0" * 32)
        bad.sendall(b"intruder\n")
        stranger = s.connect(pid + 100000, 1)
        stranger.sendall(b"stranger\n")
        garbage = socket.create_connection(("127.0.0.1", s.port))
        garbage.sendall(b"x" * 600)
        out, err = s.connect(pid, 1), s.connect(pid, 2)
        out.sendall(b"hello ")
        err.sendall(b"oops\n")
        out.sendall(b"world\n")
        for c in (out, err, bad, stranger, garbage):
            c.close()
        children.release(pid)

    procs = s.run(feed)
    assert s.output() == (b"hello world\n", b"oops\n")
    assert os.WEXITSTATUS(procs[0].status) == 3


def test_server_headers_whole_in_pieces_late_or_never(tmp_path, children):
    """A header is taken when the connection is accepted if it is there, else as it comes,
    byte by byte if need be; a link that never sends one, or sends too much, is dropped."""
    s = Served(tmp_path)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {1, 2})

    def feed():
        silent = socket.create_connection(("127.0.0.1", s.port))
        endless = socket.create_connection(("127.0.0.1", s.port))
        endless.sendall(b"y" * 300)
        time.sleep(0.05)
        endless.sendall(b"y" * 300)                  # past HEADER_MAX with no newline
        late = socket.create_connection(("127.0.0.1", s.port))
        time.sleep(0.05)                             # accepted before its header comes
        for byte in render_header(s.token, pid, 2):
            late.sendall(bytes([byte]))
            time.sleep(0.002)
        late.sendall(b"late\n")
        whole = s.connect(pid, 1)
        whole.sendall(b"whole\n")
        for c in (silent, endless, late, whole):
            c.close()
        children.release(pid)

    procs = s.run(feed)
    assert s.output() == (b"whole\n", b"late\n")
    assert os.WEXITSTATUS(procs[0].status) == 0


def test_server_stdin_broadcast(tmp_path, children):
    data = os.urandom(3 << 20)
    s = Served(tmp_path, stdin=data)
    pids = [children.spawn() for _ in range(3)]
    for rank, pid in enumerate(pids):
        s.server.add_process(rank, rank, pid, {0})
    got: dict[int, bytes] = {}

    def reader(pid):
        c = s.connect(pid, 0)
        chunks = []
        while chunk := c.recv(1 << 16):
            chunks.append(chunk)
        got[pid] = b"".join(chunks)
        c.close()
        children.release(pid)

    def feed():
        ts = [threading.Thread(target=reader, args=(p,)) for p in pids]
        for t in ts:
            t.start()
            time.sleep(0.05)        # they connect at different times; all get everything
        for t in ts:
            t.join()

    s.run(feed)
    assert [got[p] == data for p in pids] == [True] * 3


def test_server_err_header(tmp_path, children):
    s = Served(tmp_path, grace=30)
    pid = children.spawn(255)
    s.server.add_process(0, 7, pid, {1, 2})

    def feed():
        s.send_error(pid, errno.EACCES)
        time.sleep(0.2)
        children.release(pid)

    start = time.monotonic()
    s.run(feed)
    assert time.monotonic() - start < 10          # no waiting for links after an err
    assert s.output() == (b"", b"7: Permission denied\n")


def test_server_prefix_and_whole_lines(tmp_path, children):
    s = Served(tmp_path, OutputOptions(line_buffered=True, prefix=True, buffer_size=16))
    a, b = children.spawn(), children.spawn()
    s.server.add_process(0, 1, a, {1})
    s.server.add_process(1, 12, b, {1})

    def feed():
        ca, cb = s.connect(a, 1), s.connect(b, 1)
        ca.sendall(b"one-a")
        time.sleep(0.1)
        cb.sendall(b"one-b\ntwo-")
        time.sleep(0.1)
        ca.sendall(b" still one\n" + b"x" * 20 + b"\nlast")
        time.sleep(0.1)
        cb.sendall(b"b\n")
        time.sleep(0.1)
        ca.close()
        cb.close()
        children.release(a)
        children.release(b)

    s.run(feed)
    out = s.output()[0].decode().splitlines()
    assert out == [" 12: one-b", "  1: one-a still one", "  1: " + "x" * 16, "  1: xxxx",
                   " 12: two-b", "  1: last"]


def test_server_line_buffered_without_prefix(tmp_path, children):
    s = Served(tmp_path, OutputOptions(line_buffered=True))
    a, b = children.spawn(), children.spawn()
    s.server.add_process(0, 1, a, {1})
    s.server.add_process(1, 2, b, {1})

    def feed():
        ca, cb = s.connect(a, 1), s.connect(b, 1)
        ca.sendall(b"aaa")
        time.sleep(0.1)
        cb.sendall(b"bbb\n")
        time.sleep(0.1)
        ca.sendall(b"AAA\nrest")
        ca.close()
        cb.close()
        children.release(a)
        children.release(b)

    s.run(feed)
    assert s.output()[0] == b"bbb\naaaAAA\nrest"


def test_server_exit_statuses(tmp_path, children):
    s = Served(tmp_path)
    pids = [children.spawn(0), children.spawn(1), children.spawn(42),
            children.spawn(sig=signal.SIGTERM)]
    for rank, pid in enumerate(pids):
        s.server.add_process(rank, rank + 10, pid, set())

    def feed():
        for pid in pids:
            children.release(pid)

    procs = s.run(feed)
    err_r, err_w = os.pipe()
    code, die_of = bpsh.exit_status(procs, [], stderr_fd=err_w)
    os.close(err_w)
    assert (code, die_of) == (255, None)
    assert os.read(err_r, 1000) == b"bpsh: Child process on node 13 exited abnormally.\n"
    code, die_of = bpsh.exit_status(procs[:3], [])
    assert (code, die_of) == (42, None)
    code, die_of = bpsh.exit_status(procs, [signal.SIGTERM])     # we were told to stop
    assert (code, die_of) == (42, signal.SIGTERM)


def test_server_does_not_hang_for_missing_links(tmp_path, children):
    s = Served(tmp_path, grace=0.3)
    pid = children.spawn(5)
    s.server.add_process(0, 1, pid, {0, 1, 2})

    def feed():
        out = s.connect(pid, 1)
        out.sendall(b"partial\n")
        out.close()
        children.release(pid)          # fds 0 and 2 never connect

    start = time.monotonic()
    procs = s.run(feed)
    assert time.monotonic() - start < 5
    assert s.output()[0] == b"partial\n" and os.WEXITSTATUS(procs[0].status) == 5


def test_server_waits_for_output_of_reaped_process(tmp_path, children):
    """Output sent before the process exit is never lost, even if it arrives late."""
    s = Served(tmp_path, grace=5)
    pid = children.spawn()
    s.server.add_process(0, 1, pid, {1})

    def feed():
        children.release(pid)
        time.sleep(0.5)                 # reaped long before its link shows up
        out = s.connect(pid, 1)
        out.sendall(b"late but whole\n")
        out.close()

    s.run(feed)
    assert s.output()[0] == b"late but whole\n"


def test_node_gone_reads_the_node_status(tmp_path):
    for n, state in enumerate(["up", "down", "boot", "unavailable"]):
        (tmp_path / "nodes" / str(n)).mkdir(parents=True)
        (tmp_path / "nodes" / str(n) / "status").write_text(state + "\n")
    assert [bpsh.node_gone(str(tmp_path), n) for n in range(5)] == \
        [False, True, False, False, True]           # node 4 does not exist: gone


class Nodes:
    """node_gone for the server: which nodes are down, and what it was asked."""

    def __init__(self, *down: int) -> None:
        self.down = set(down)
        self.asked: list[tuple[int, float]] = []

    def __call__(self, node: int) -> bool:
        self.asked.append((node, time.monotonic()))
        return node in self.down


@pytest.mark.parametrize("options", [OutputOptions(), OutputOptions(line_buffered=True),
                                     OutputOptions(sequential=True)])
def test_server_ends_with_the_ghost_of_a_gone_node(tmp_path, children, options):
    """Links a reaped rank left open on a node that is down (its daemon stopped, not dead:
    what runs there keeps them open) are closed after the grace, with what they sent."""
    nodes = Nodes(4)
    s = Served(tmp_path, options, grace=0.3, node_gone=nodes)
    pid, twin = children.spawn(sig=signal.SIGKILL), children.spawn(sig=signal.SIGKILL)
    s.server.add_process(0, 4, pid, {1, 2})         # as the master ends a gone node's ghosts
    s.server.add_process(1, 4, twin, {1})
    held = []

    def feed():
        out, err, other = s.connect(pid, 1), s.connect(pid, 2), s.connect(twin, 1)
        out.sendall(b"sent before\nand a partial line")
        err.sendall(b"oops\n")
        held.extend((out, err, other))              # never closed by "the node"
        time.sleep(0.2)
        children.release(pid)
        children.release(twin)

    start = time.monotonic()
    procs = s.run(feed)
    took = time.monotonic() - start
    for c in held:
        c.close()
    assert took < 3, took
    assert s.output() == (b"sent before\nand a partial line", b"oops\n")
    assert os.WTERMSIG(procs[0].status) == signal.SIGKILL
    # once a round for the ranks due (both, if reaped in one pass), and nothing else
    assert [n for n, _ in nodes.asked] in ([4], [4, 4])


def test_server_keeps_the_links_of_a_reaped_rank_while_its_node_is_up(tmp_path, children):
    """On a node that is up, links that outlive the ghost (a background child holds them)
    stay open until they end, as a local pipe would; the node is asked every grace."""
    nodes = Nodes()
    s = Served(tmp_path, grace=0.2, node_gone=nodes)
    pid, local = children.spawn(), children.spawn()
    s.server.add_process(0, 3, pid, {1})
    s.server.add_process(1, -1, local, {1})         # bpsh's own (node -1): never asked

    def feed():
        out, here = s.connect(pid, 1), s.connect(local, 1)
        children.release(pid)
        children.release(local)
        for i in range(5):
            time.sleep(0.2)
            out.sendall(b"late %d\n" % i)
            here.sendall(b"here %d\n" % i)
        time.sleep(0.5)
        out.sendall(b"last\n")
        out.close()
        here.close()

    s.run(feed)
    out = s.output()[0]
    assert sorted(out.splitlines()) == sorted([b"late %d" % i for i in range(5)] +
                                              [b"here %d" % i for i in range(5)] + [b"last"])
    assert {n for n, _ in nodes.asked} == {3} and len(nodes.asked) >= 2


def test_server_sequential_asks_only_about_the_rank_it_shows(tmp_path, children):
    """-s: a later rank's links wait in their sockets (in order) while an earlier one runs,
    so its node is not asked about until its turn."""
    nodes = Nodes(7)
    s = Served(tmp_path, OutputOptions(sequential=True), grace=0.2, node_gone=nodes)
    first, second = children.spawn(), children.spawn(sig=signal.SIGKILL)
    s.server.add_process(0, 6, first, {1})
    s.server.add_process(1, 7, second, {1})
    held = []

    def feed():
        a, b = s.connect(first, 1), s.connect(second, 1)
        b.sendall(b"second\n")
        held.append(b)
        children.release(second)
        time.sleep(1.0)
        a.sendall(b"first\n")
        a.close()
        children.release(first)

    s.run(feed)
    for c in held:
        c.close()
    assert s.output()[0] == b"first\nsecond\n"
    assert [n for n, _ in nodes.asked] == [7]


def test_server_reasons_on_the_status_pipe_in_pieces(tmp_path, children):
    """Launch failure records carry the master's reason; a record may come in pieces.
    The reason of a per-node refusal (no x permission...) is not printed: bproc's line
    says it all."""
    r, w = os.pipe()
    s = Served(tmp_path, status_fd=r)
    a, b, c = children.spawn(1), children.spawn(1), children.spawn(1)
    for rank, pid in enumerate((a, b, c)):
        s.server.add_process(rank, rank + 4, pid, {1, 2})
    data = (pack_failure(0, STAGE_CTL, errno.EINVAL, "control message 'execmove' is\n"
                                                     "5000 bytes")
            + pack_failure(1, STAGE_CTL, errno.EACCES, "no permission to run on node 5")
            + pack_failure(2, STAGE_CTL, errno.EPERM, "é" * 2000))

    def feed():
        for i in range(0, len(data), 7):
            os.write(w, data[i:i + 7])
            time.sleep(0.001)
        os.close(w)
        for pid in (a, b, c):
            children.release(pid)

    s.run(feed)
    lines = s.output()[1].decode().splitlines()
    assert lines[:4] == ["bpsh: control message 'execmove' is 5000 bytes",
                         "4: Invalid argument", "5: Permission denied",
                         "bpsh: " + "é" * (REASON_MAX // 2)]
    assert lines[4:] == ["6: Operation not permitted"]


def test_server_50mb_byte_for_byte(tmp_path, children):
    data = os.urandom(1 << 20) * 50
    s = Served(tmp_path)
    pid = children.spawn()
    s.server.add_process(0, 1, pid, {1})

    def feed():
        out = s.connect(pid, 1)
        view = memoryview(data)
        for i in range(0, len(data), 1 << 18):
            out.sendall(view[i:i + (1 << 18)])
        out.close()
        children.release(pid)

    start = time.monotonic()
    s.run(feed)
    took = time.monotonic() - start
    out = s.output()[0]
    assert len(out) == len(data) and out == data
    print(f"50 MiB through the stdio server in {took:.3f}s ({50 / took:.0f} MiB/s)")


# ---- a multi-node run: one writer, the ranks link, links held until it comes ----------

def _ranks_link(s: Served, writer: int, ranks: list[int]) -> None:
    c = socket.create_connection(("127.0.0.1", s.port))
    c.sendall(render_ranks(s.token, writer, ranks))
    c.close()


def test_server_vector_holds_links_until_the_ranks_link(tmp_path, children):
    s = Served(tmp_path)
    writer, clone = children.spawn(3), children.spawn(5)
    s.server.add_vector([(0, 4), (1, 6), (2, 9)], writer, {1, 2})

    def feed():
        early = s.connect(clone, 1)             # before the ranks link: held, not dropped
        early.sendall(b"from rank 2\n")
        early.close()
        time.sleep(0.2)
        _ranks_link(s, writer, [-errno.EACCES, writer, clone])
        for pid in (writer, clone):
            s.connect(pid, 2).close()
        late = s.connect(writer, 1)
        late.sendall(b"from rank 1\n")
        late.close()
        children.release(writer)
        children.release(clone)

    procs = s.run(feed)
    out, err = s.output()
    assert sorted(out.splitlines()) == [b"from rank 1", b"from rank 2"]
    assert err == b"4: Permission denied\n"
    assert [(p.rank, p.node, p.pid) for p in procs] == [(0, 4, 0), (1, 6, writer),
                                                        (2, 9, clone)]
    assert [os.WEXITSTATUS(p.status) for p in procs] == [1, 3, 5]


def test_server_vector_writer_failed_before_the_ranks(tmp_path, children):
    s = Served(tmp_path, grace=30)
    writer = children.spawn(255)
    s.server.add_vector([(0, 1), (1, 2)], writer, {1, 2})

    def feed():
        s.send_error(writer, errno.EHOSTDOWN)
        time.sleep(0.1)
        children.release(writer)

    start = time.monotonic()
    procs = s.run(feed)
    assert time.monotonic() - start < 10
    assert s.output() == (b"", b"1: Host is down\n2: Host is down\n")
    assert [os.WEXITSTATUS(p.status) for p in procs] == [255, 255]


def test_server_vector_writer_killed_and_no_ranks_link(tmp_path, children):
    s = Served(tmp_path, grace=0.3)
    writer = children.spawn(sig=signal.SIGKILL)
    s.server.add_vector([(0, 1), (1, 2)], writer, {1})
    procs = s.run(lambda: children.release(writer))
    assert [os.WTERMSIG(p.status) for p in procs] == [signal.SIGKILL] * 2
    assert bpsh.exit_status(procs, [], stderr_fd=s.err.fileno())[0] == 255


def test_server_vector_writer_ends_first_and_its_status_survives_later_reaps(tmp_path,
                                                                             children):
    """The writer's rank may end before the ranks link comes (the master sends it once
    every ghost exists): its status is kept, however many SIGCHLDs (other ranks ending)
    come in between, and given to its rank when the link arrives."""
    s = Served(tmp_path, grace=5)
    writer, other, third = children.spawn(3), children.spawn(0), children.spawn(0)
    s.server.add_vector([(0, 4), (1, 6), (2, 7)], writer, {1})

    def feed():
        children.release(writer)
        time.sleep(0.2)                  # the writer is reaped ...
        children.release(other)          # ... and other ranks end: more reaps
        time.sleep(0.2)
        _ranks_link(s, writer, [writer, other, third])
        time.sleep(0.1)
        children.release(third)
        for pid in (writer, other, third):
            s.connect(pid, 1).close()

    procs = s.run(feed)
    assert [os.WEXITSTATUS(p.status) for p in procs] == [3, 0, 0]

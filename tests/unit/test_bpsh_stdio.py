"""bpsh's stdio server without a master: forwarding, reaping, exit statuses.

Two kinds of tests:
- bpsh run for real against the fake $MOUNT and fake node of tests/unit/bpsh_fake.py;
- the stdio server in-process, with fake node connections made by threads of the test
  and real children (forked, released by the test) whose wait statuses it reaps.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bpfs.cli import bpsh
from bpfs.child import CTL, REASON_MAX, Report
from bpfs.cli.bpsh.links import Proc
from bpfs.cli.bpsh.output import OutputOptions
from bpfs.cli.bpsh.stdio import StdioServer
from bpfs.wire.execreq import render_error, render_header, render_ranks
from tests.unit.bpsh_fake import PY, mount, run  # noqa: F401  (fixtures)


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
    data = (Report(0, CTL, errno.EINVAL, "control message 'execmove' is\n5000 bytes").pack()
            + Report(1, CTL, errno.EACCES, "no permission to run on node 5").pack()
            + Report(2, CTL, errno.EPERM, "é" * 2000).pack())

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

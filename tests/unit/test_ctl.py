"""The ctl command table: parsing garbage, lookup errors, node commands."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given, strategies as st

from bpfs import ctl
from bpfs.errors import BpfsError
from bpfs.formats import Facts
from bpfs.model import Caller, Cluster
from bpfs.wire import messages
from bpfs.wire.execreq import ExecMove, parse_execmove, split_ctl_words

ROOT = Caller(0, 0)
ALICE = Caller(1000, 1000)


class FakeServices:
    """Implements ctl.Services over a real Cluster; records what would go to nodes."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.persisted = 0

    async def send_node(self, node: int, msg: dict[str, Any]) -> None:
        if not self.cluster.node(node).connected:
            raise BpfsError(errno.EHOSTDOWN, f"node {node} is down")
        self.sent.append((node, msg))

    async def persist(self) -> None:
        self.persisted += 1

    async def execmove(self, node: int, caller: Caller, req: Any, rank_errors: Any = ()) -> int:
        self.sent.append((node, {"t": "execmove", "pid": caller.pid, "req": req,
                                 "errors": [e.errno if e else 0 for e in rank_errors]}))
        return caller.pid

    async def signal_proc(self, pid: int, sig: int) -> None:
        self.sent.append((self.cluster.proc(pid).node, {"t": "signal", "pid": pid, "sig": sig}))

    async def exec_command(self, node: int, caller: Caller, argv: list[str]) -> int:
        self.sent.append((node, {"t": "exec", "uid": caller.uid, "argv": argv}))
        return 4242


def services(up: int = 2, configured: int = 3) -> FakeServices:
    c = Cluster(configured)
    for n in range(up):
        c.attach(n, "a", Facts(), 0.0)
        c.reported_state(n, "up", 0.0)
    return FakeServices(c)


async def run(s: FakeServices, data: bytes, caller: Caller = ROOT, node: int = 0) -> str:
    return await ctl.execute(ctl.NODE_CTL, ctl.CtlContext(s, caller, node), data)


def einval_message(data: bytes) -> str:
    with pytest.raises(BpfsError) as info:
        ctl.parse(data)
    assert info.value.errno == errno.EINVAL
    return info.value.message


@pytest.mark.parametrize("data, words", [
    (b"reboot\n", [["reboot"]]),
    (b"state up", [["state", "up"]]),
    (b"  state   error  \r\n\nreboot\n", [["state", "error"], ["reboot"]]),
    (b"exec sh -c 'echo hi there'\n", [["exec", "sh", "-c", "echo hi there"]]),
])
def test_parse(data, words):
    assert ctl.parse(data) == words


@pytest.mark.parametrize("data, needle", [
    (b"", "empty"),
    (b"\n \n\t\n", "empty"),
    (b"state\0up", "NUL"),
    (b"\xff\xfe state", "UTF-8"),
    (b"state \x01up", "binary"),
    (b"x" * (ctl.MAX_CTL_WRITE + 1), str(ctl.MAX_CTL_WRITE)),
    (b"state 'up", "bad quoting in control message: No closing quotation"),
])
def test_garbage_is_einval_with_a_readable_message(data, needle):
    assert needle in einval_message(data)


def test_lookup_messages():
    with pytest.raises(BpfsError) as info:
        ctl.lookup(ctl.NODE_CTL, ["foo"])
    assert (info.value.errno, info.value.message) == (errno.EINVAL, "unknown control message 'foo'")
    with pytest.raises(BpfsError) as info:
        ctl.lookup(ctl.NODE_CTL, ["state"])
    assert info.value.message == "wrong number of arguments for 'state'"
    with pytest.raises(BpfsError) as info:
        ctl.lookup(ctl.NODE_CTL, ["reboot", "now"])
    assert info.value.message == "wrong number of arguments for 'reboot'"
    with pytest.raises(BpfsError) as info:
        ctl.lookup(ctl.NODE_CTL, ["x" * 1000])
    assert len(info.value.message) < 120


async def test_adding_a_command_is_a_table_row():
    async def hello(ctx: ctl.CtlContext, args: list[str]) -> str:
        return f"ok {ctx.target} {' '.join(args)}"
    table = ctl.NODE_CTL + (ctl.Command("hello", (0, None), hello),)
    s = services()
    assert await ctl.execute(table, ctl.CtlContext(s, ROOT, 1), b"hello a b c") == "ok 1 a b c"


async def test_state_command():
    s = services()
    assert await run(s, b"state unavailable\n") == "ok"
    assert s.cluster.node(0).state == "unavailable" and s.persisted == 1
    await run(s, b"state up")
    assert s.cluster.node(0).state == "up"


@pytest.mark.parametrize("data, caller, node, err", [
    (b"state error", ALICE, 0, errno.EPERM),
    (b"state down", ROOT, 0, errno.EINVAL),
    (b"state halt", ROOT, 0, errno.EINVAL),
    (b"state error", ROOT, 2, errno.EHOSTDOWN),
    (b"reboot", ALICE, 0, errno.EPERM),
    (b"halt", ROOT, 2, errno.EHOSTDOWN),
    (b"pwroff", ALICE, 2, errno.EPERM),
])
async def test_refusals(data, caller, node, err):
    s = services()
    with pytest.raises(BpfsError) as info:
        await run(s, data, caller, node)
    assert info.value.errno == err
    assert s.sent == []


@pytest.mark.parametrize("cmd", ["reboot", "halt", "pwroff"])
async def test_power_commands_go_to_the_node_and_show(cmd):
    s = services()
    assert await run(s, cmd.encode() + b"\n", node=1) == "ok"
    assert s.sent == [(1, messages.Ctl(cmd=cmd))]
    assert s.cluster.node(1).state == cmd


async def test_lines_run_in_order_and_stop_at_the_first_failure():
    s = services()
    with pytest.raises(BpfsError) as info:
        await run(s, b"state error\nbogus\nreboot\n")
    assert info.value.errno == errno.EINVAL
    assert s.cluster.node(0).state == "error"     # the first line ran
    assert s.sent == []                           # the third did not


TOKEN = "0123456789abcdef0123456789abcdef"


async def test_execmove_checks_then_arms():
    s = services()
    s.cluster.chmod(0, 0o100, ROOT)
    req = f"execmove --port 5 --token {TOKEN} --stdout null".encode()
    for data, caller, node, err in [
        (req, Caller(1000, 1000, pid=7), 0, errno.EACCES),
        (req, Caller(0, 0, pid=7), 2, errno.EHOSTDOWN),
        (b"execmove --port 5", Caller(0, 0, pid=7), 0, errno.EINVAL),
        (b"execmove --port 5 --token xyz", Caller(0, 0, pid=7), 0, errno.EINVAL),
    ]:
        with pytest.raises(BpfsError) as info:
            await run(s, data, caller, node)
        assert info.value.errno == err, data
    assert s.sent == []
    assert await run(s, req, Caller(0, 0, pid=7), 0) == "ok 7"
    (node, msg), = s.sent
    assert node == 0 and msg["req"].port == 5 and msg["req"].io == ("socket", "null", "socket")


def test_execmove_stderr_may_be_stdout_and_nothing_else_may():
    words = ["--port", "5", "--token", TOKEN]
    assert parse_execmove(words + ["--stderr", "stdout"]).io == ("socket", "socket", "stdout")
    for opt in ("--stdin", "--stdout"):
        with pytest.raises(BpfsError) as info:
            parse_execmove(words + [opt, "stdout"])
        assert info.value.errno == errno.EINVAL and "for fd" in info.value.message


async def test_execmove_nodes_checks_each_rank_and_fails_only_if_none_may_run():
    s = services(up=2, configured=4)            # 0, 1 up; 2, 3 down; 7 does not exist
    s.cluster.chmod(1, 0o100, ROOT)
    alice = Caller(1000, 1000, pid=9)
    req = f"execmove --port 5 --token {TOKEN} --nodes 0,1,2,7,0".encode()
    assert await run(s, req, alice, 0) == "ok 9"
    (node, msg), = s.sent
    assert msg["req"].nodes == (0, 1, 2, 7, 0)
    assert msg["errors"] == [0, errno.EACCES, errno.EHOSTDOWN, errno.ENODEV, 0]
    for data, node, err in [
        (f"execmove --port 5 --token {TOKEN} --nodes 1,2".encode(), 1, errno.EACCES),
        (f"execmove --port 5 --token {TOKEN} --nodes 0,1".encode(), 3, errno.EINVAL),
        (f"execmove --port 5 --token {TOKEN} --nodes 0,x".encode(), 0, errno.EINVAL),
        (f"execmove --port 5 --token {TOKEN} --nodes 0,1 --rank 2".encode(), 0, errno.EINVAL),
        (f"execmove --port 5 --token {TOKEN} --nodes ,".encode(), 0, errno.EINVAL),
    ]:
        with pytest.raises(BpfsError) as info:
            await run(s, data, alice, node)
        assert info.value.errno == err, data
    assert len(s.sent) == 1


def test_an_over_long_write_names_its_command_and_size():
    assert einval_message(b"execmove --nodes " + b"1," * 3000) == \
        "control message 'execmove' is 6017 bytes, over the 4096-byte limit"
    assert einval_message(b" \n" * 3000) == \
        "control message is 6000 bytes, over the 4096-byte limit"
    message = einval_message(b"\x01" * 100 + b"x" * 5000)
    assert message.isprintable() and len(message) < 140, message


def test_a_request_for_1024_ranks_is_short_and_reads_back_the_same():
    """bpsh -a on 1,024 nodes: the node list goes compact ("0-1023"), far under the ctl
    limit (its plain list, 4,131 bytes, was over it), and parses back rank for rank."""
    nodes = tuple(range(1024))
    line = ExecMove(65535, TOKEN, 0, nodes=nodes).render().encode()
    assert len(line) < 200 and b"--nodes 0-1023" in line
    assert ctl.parse(line) == [split_ctl_words(line.decode())]
    assert parse_execmove(split_ctl_words(line.decode())[1:]).nodes == nodes


@given(st.lists(st.integers(0, 1200), min_size=1, max_size=1500))
def test_node_lists_keep_order_and_duplicates_through_the_request(nodes):
    req = ExecMove(2223, TOKEN, 0, nodes=tuple(nodes))
    words = split_ctl_words(req.render())
    assert parse_execmove(words[1:]) == req


@pytest.mark.parametrize("text, needle", [
    ("0-70000", "70001 nodes, more than 65536"),
    ("0-4294967295", "more than 65536"),          # counted, never listed
    ("3-", "open range"),
    ("master", "not the master"),
    ("0,-1", "bad node specification"),
    ("1000000000", "not the master"),
    ("up", "needs the node list"),
])
def test_request_node_lists_that_are_refused(text, needle):
    with pytest.raises(BpfsError) as info:
        parse_execmove(["--port", "5", "--token", TOKEN, "--nodes", text])
    assert info.value.errno == errno.EINVAL and needle in info.value.message, \
        info.value.message


@pytest.mark.parametrize("word, sig", [("9", 9), ("KILL", 9), ("sigkill", 9), ("SIGTERM", 15),
                                       ("usr1", 10), ("64", 64)])
def test_parse_signal(word, sig):
    assert ctl.parse_signal(word) == sig


@pytest.mark.parametrize("word", ["0", "65", "FOO", "SIG", "-9", "9x", "SIGKILLX",
                                  "\u0669", "\uff19", "1\u0665", "\u00b2"])
def test_parse_signal_refuses(word):
    with pytest.raises(BpfsError) as info:
        ctl.parse_signal(word)
    assert info.value.errno == errno.EINVAL


async def test_proc_ctl_and_signal_files():
    s = services()
    s.cluster.start_proc(42, 1, 1000, 1000, "sleep", 1.0)
    ctx = lambda caller: ctl.CtlContext(s, caller, 42)  # noqa: E731
    assert await ctl.execute(ctl.PROC_CTL, ctx(ALICE), b"stop\n") == "ok"
    assert await ctl.execute(ctl.PROC_SIGNAL, ctx(ROOT), b"HUP\n") == "ok"
    assert [m["sig"] for _, m in s.sent] == [19, 1]
    for table, data, caller, err in [
        (ctl.PROC_CTL, b"kill", Caller(1001, 1000), errno.EPERM),
        (ctl.PROC_SIGNAL, b"9", Caller(1001, 1000), errno.EPERM),
        (ctl.PROC_SIGNAL, b"9 9", ROOT, errno.EINVAL),
        (ctl.PROC_SIGNAL, b"NOPE", ROOT, errno.EINVAL),
        (ctl.PROC_CTL, b"kill now", ROOT, errno.EINVAL),
    ]:
        with pytest.raises(BpfsError) as info:
            await ctl.execute(table, ctx(caller), data)
        assert info.value.errno == err, data
    s.cluster.exited(42, 0, None)
    with pytest.raises(BpfsError) as info:
        await ctl.execute(ctl.PROC_CTL, ctx(ROOT), b"kill")
    assert info.value.errno == errno.ESRCH


@pytest.mark.parametrize("args, argv", [
    (["hostname"], ["hostname"]),
    (["--", "hostname"], ["hostname"]),
    (["--", "-weird", "x"], ["-weird", "x"]),
    (["sh", "-c", "echo --"], ["sh", "-c", "echo --"]),
])
def test_parse_exec(args, argv):
    assert ctl.parse_exec(args) == argv


@pytest.mark.parametrize("args", [[], ["--"], [""], ["--", ""], ["", "x"]])
def test_parse_exec_refuses_no_command_or_an_empty_name(args):
    with pytest.raises(BpfsError) as info:
        ctl.parse_exec(args)
    assert info.value.errno == errno.EINVAL


async def test_exec_checks_then_starts():
    s = services()
    s.cluster.chmod(1, 0o100, ROOT)
    for data, caller, node, err in [
        (b"exec", ROOT, 0, errno.EINVAL),
        (b"exec --", ROOT, 0, errno.EINVAL),
        (b"exec -x hostname", ROOT, 0, errno.EINVAL),
        (b"exec hostname", ALICE, 1, errno.EACCES),
        (b"exec hostname", ROOT, 2, errno.EHOSTDOWN),
    ]:
        with pytest.raises(BpfsError) as info:
            await run(s, data, caller, node)
        assert info.value.errno == err, data
    assert s.sent == []
    assert await run(s, b"exec sh -c 'echo hi'\n", ALICE, 0) == "ok 4242"
    assert s.sent == [(0, {"t": "exec", "uid": 1000, "argv": ["sh", "-c", "echo hi"]})]


def test_fan_out_chunks_cover_every_rank_once_in_order():
    from bpfs.master.migrations import _chunks
    assert _chunks([], (3, 9)) == []
    assert _chunks([1, 2], (3, 9)) == [[1, 2]]
    assert _chunks(list(range(5)), (3, 9)) == [[0, 1, 2], [3, 4]]
    assert _chunks(list(range(31)), (3, 9)) == [list(range(3)), list(range(3, 12)),
                                                 list(range(12, 31))]

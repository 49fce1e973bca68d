"""bpsh's stdio server takes links made again after a move (`again` headers): run
in-process over real loopback sockets, with real children it reaps (the Served and
Children helpers of test_bpsh_stdio), the test's threads playing the nodes."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from bpfs.cli.bpsh.output import OutputOptions
from bpfs.wire.execreq import render_header
from tests.unit.test_bpsh_stdio import Children, Served

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def children():
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


def again(s: Served, pid: int, fd: int, consumed: int = 0,
          token: str | None = None) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", s.port))
    c.sendall(render_header(token or s.token, pid, fd, consumed))
    return c


def recv_exactly(c: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def recv_all(c: socket.socket) -> bytes:
    c.settimeout(10)
    chunks = []
    while chunk := c.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def refused(c: socket.socket) -> bool:
    """True once bpsh has closed `c` without sending anything (EOF, or a reset: what we
    sent was unread)."""
    try:
        return recv_all(c) == b""
    except ConnectionResetError:
        return True


def reset(c: socket.socket) -> None:
    """Close with a RST, as a node's dropped copy may."""
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def test_output_of_the_old_link_comes_first(tmp_path, children):
    s = Served(tmp_path)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {1, 2})

    def feed():
        out, err = s.connect(pid, 1), s.connect(pid, 2)
        out.sendall(b"one ")
        err.sendall(b"e1 ")
        time.sleep(0.1)
        out2, err2 = again(s, pid, 1), again(s, pid, 2)
        out2.sendall(b"three ")                 # the new node writes before the old EOF
        err2.sendall(b"e3")
        time.sleep(0.1)
        out.sendall(b"two ")                    # the old one still brings what it had
        err.sendall(b"e2 ")
        out.close()
        err.close()
        time.sleep(0.1)
        out3 = again(s, pid, 1)                 # moved once more
        out3.sendall(b"four")
        time.sleep(0.05)
        out2.close()
        out3.close()
        err2.close()
        children.release(pid)

    procs = s.run(feed)
    assert s.output() == (b"one two three four", b"e1 e2 e3")
    assert procs[0].status == 0 and not procs[0].queued


def test_old_link_ends_before_the_new_one_comes(tmp_path, children):
    """The old node dropped its copy first: bpsh waits for its child, not for links."""
    s = Served(tmp_path, grace=0.2)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {1})

    def feed():
        out = s.connect(pid, 1)
        out.sendall(b"before\n")
        out.close()
        time.sleep(0.6)                         # longer than the grace: still waited for
        out2 = again(s, pid, 1)
        out2.sendall(b"after\n")
        out2.close()
        children.release(pid)

    s.run(feed)
    assert s.output() == (b"before\nafter\n", b"")


def test_a_reset_old_link_gives_what_it_brought(tmp_path, children):
    s = Served(tmp_path)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {1})

    def feed():
        out = s.connect(pid, 1)
        out2 = again(s, pid, 1)
        out2.sendall(b"new")
        out.sendall(b"old ")
        time.sleep(0.1)
        reset(out)
        time.sleep(0.05)
        out2.close()
        children.release(pid)

    s.run(feed)
    assert s.output() == (b"old new", b"")


def test_whole_lines_go_on_across_the_move(tmp_path, children):
    s = Served(tmp_path, OutputOptions(line_buffered=True, prefix=True))
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {1})

    def feed():
        out = s.connect(pid, 1)
        out.sendall(b"a whole line\npar")
        out2 = again(s, pid, 1)
        out2.sendall(b"tial\nend")
        time.sleep(0.1)
        out.close()
        time.sleep(0.05)
        out2.close()
        children.release(pid)

    s.run(feed)
    assert s.output() == (b"  5: a whole line\n  5: partial\n  5: end\n", b"")


def test_links_again_that_are_not_ours_are_refused(tmp_path, children):
    s = Served(tmp_path)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {1})
    closed: list[bool] = []

    def feed():
        out = s.connect(pid, 1)
        bad = [again(s, pid, 1, token="0" * 32), again(s, pid + 100000, 1),
               again(s, pid, 2)]                # fd 2 never was a link of pid
        for c in bad:
            c.sendall(b"intruder\n")
        closed.extend(refused(c) for c in bad)
        out.sendall(b"mine\n")
        out.close()
        for c in bad:
            c.close()
        children.release(pid)

    s.run(feed)
    assert closed == [True, True, True]
    assert s.output()[0] == b"mine\n"


def test_stdin_again_from_consumed_exactly_once(tmp_path, children):
    data = bytes(range(256)) * 4096                 # 1 MiB, each offset recognisable
    s = Served(tmp_path, stdin=data)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {0})
    got: dict[str, bytes] = {}

    def feed():
        old = s.connect(pid, 0)
        first = recv_exactly(old, 100_000)          # the process read this much
        time.sleep(0.2)                             # bpsh has sent more, unread
        new = again(s, pid, 0, consumed=len(first))
        got["rest"] = recv_all(new)
        old.close()
        new.close()
        got["first"] = first
        children.release(pid)

    s.run(feed)
    assert got["first"] + got["rest"] == data


def test_stdin_again_after_the_old_link_ended_and_after_eof(tmp_path, children):
    data = b"0123456789" * 1000
    s = Served(tmp_path, stdin=data)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {0})
    got: list[bytes] = []

    def feed():
        old = s.connect(pid, 0)
        everything = recv_all(old)                  # all of it, and bpsh's EOF
        old.close()
        time.sleep(0.1)
        new = again(s, pid, 0, consumed=4321)       # it had read only this much
        got.append(everything)
        got.append(recv_all(new))
        new.close()
        children.release(pid)

    s.run(feed)
    assert got == [data, data[4321:]]


def test_stdin_consumed_too_old_is_refused_and_said_once(tmp_path, children):
    data = b"x" * 200_000
    s = Served(tmp_path, stdin=data)
    s.server.stdin.replay = 1000                    # keep only the last 1000 bytes sent
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {0})
    got: list[bytes] = []

    def feed():
        old = s.connect(pid, 0)
        recv_all(old)
        old.close()
        for consumed in (10, 20, len(data) + 1):    # too old twice, then beyond the end
            c = again(s, pid, 0, consumed=consumed)
            got.append(recv_all(c))
            c.close()
        ok = again(s, pid, 0, consumed=len(data) - 500)
        got.append(recv_all(ok))
        ok.close()
        children.release(pid)

    s.run(feed)
    assert got == [b"", b"", b"", b"x" * 500]       # a CONSUMED in range is still served
    err = s.output()[1].decode()
    assert err.count("bpsh: ") == 1 and "moved having read 10 bytes" in err


def test_stdin_within_the_replay_bound(tmp_path, children):
    data = b"y" * 200_000
    s = Served(tmp_path, stdin=data)
    s.server.stdin.replay = 1000
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {0})
    got: list[bytes] = []

    def feed():
        old = s.connect(pid, 0)
        recv_all(old)
        new = again(s, pid, 0, consumed=len(data) - 1000)
        got.append(recv_all(new))
        old.close()
        new.close()
        children.release(pid)

    s.run(feed)
    assert got == [data[-1000:]] and s.output() == (b"", b"")


def test_stdin_kept_for_a_moving_rank_while_another_reads_on(tmp_path, children):
    """Two ranks share the broadcast: one moves, the other goes on reading."""
    data = bytes(range(256)) * 8192                 # 2 MiB
    s = Served(tmp_path, stdin=data)
    a, b = children.spawn(0), children.spawn(0)
    s.server.add_process(0, 1, a, {0})
    s.server.add_process(1, 2, b, {0})
    got: dict[str, bytes] = {}

    def steady():
        c = s.connect(b, 0)
        got["b"] = recv_all(c)
        c.close()
        children.release(b)

    def feed():
        t = threading.Thread(target=steady)
        t.start()
        old = s.connect(a, 0)
        head = recv_exactly(old, 70_000)
        old.close()                                 # its node dropped it
        time.sleep(0.3)
        new = again(s, a, 0, consumed=len(head))
        got["a"] = head + recv_all(new)
        new.close()
        children.release(a)
        t.join(10)

    s.run(feed)
    assert got["a"] == data and got["b"] == data


def test_stdin_back_to_the_old_link_when_the_move_fails(tmp_path, children):
    """The new node connected, then failed (its link ends before the old one): the
    process goes on where it was, its old link carrying the rest from where it was."""
    data = bytes(range(256)) * 1024
    s = Served(tmp_path, stdin=data)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {0})
    got: list[bytes] = []

    def feed():
        old = s.connect(pid, 0)
        head = recv_exactly(old, 10_000)
        time.sleep(0.1)
        new = again(s, pid, 0, consumed=len(head))
        recv_exactly(new, 5000)                     # the new node read some, then failed
        reset(new)
        got.append(head + recv_all(old))            # all of it, once, on the old link
        old.close()
        children.release(pid)

    s.run(feed)
    assert got == [data]


def test_stdin_old_link_ends_the_move_is_over(tmp_path, children):
    """The old node dropped its copy: from then on the new link's end is the process's."""
    data = b"z" * 50_000
    s = Served(tmp_path, stdin=data)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {0})
    got: list[bytes] = []

    def feed():
        old = s.connect(pid, 0)
        head = recv_exactly(old, 1000)
        new = again(s, pid, 0, consumed=len(head))
        part = recv_exactly(new, 1000)
        reset(old)                                  # the old copy is gone
        time.sleep(0.2)
        new.close()                                 # then the process closed its stdin
        got.append(head + part)
        children.release(pid)

    procs = s.run(feed)
    assert got == [data[:2000]]
    assert procs[0].stdin_link is None and procs[0].stdin_parked is None


def test_stdin_through_three_moves_counted_as_a_node_counts(tmp_path, children):
    """Each "node" reads some, stops with bytes unread in its socket, and works out
    CONSUMED as a node does (stdin_consumed with the link's base): the process sees its
    stdin exactly once, in order, across every move."""
    from bpfs.wire.stdiolink import stdin_consumed
    data = bytes(range(251)) * 4000                 # ~1 MiB, a period prime to the reads
    s = Served(tmp_path, stdin=data)
    pid = children.spawn(0)
    s.server.add_process(0, 5, pid, {0})
    seen = bytearray()

    def feed():
        link, base = s.connect(pid, 0), 0
        for amount in (12_345, 200_000, 1):
            seen.extend(recv_exactly(link, amount))
            time.sleep(0.1)                         # more arrives, unread: a stopped process
            consumed = stdin_consumed(link.fileno(), base)
            assert consumed == len(seen)
            new = again(s, pid, 0, consumed=consumed)
            link.close()                            # the old node drops its copy
            link, base = new, consumed
        seen.extend(recv_all(link))
        link.close()
        children.release(pid)

    s.run(feed)
    assert bytes(seen) == data

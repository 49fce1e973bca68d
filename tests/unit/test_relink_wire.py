"""Links made again after a move, the client side: the `again` header (render, parse,
hostile input), `stdin_consumed` on real TCP sockets, and the Connector's headers."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import pytest
import trio

from bpfs.errors import BpfsError
from bpfs.node.stdio import Links
from bpfs.wire import execreq
from bpfs.wire.execreq import MAX_CONSUMED, Header, parse_header, render_header
from bpfs.wire.stdiolink import LinkTarget, connect_links, stdin_consumed

pytestmark = pytest.mark.timeout(20)

TOKEN = "0123456789abcdef" * 2


# ---- the header ------------------------------------------------------------------------

@pytest.mark.parametrize("fd,consumed", [(0, 0), (0, 12345), (0, MAX_CONSUMED), (1, 0),
                                         (2, 0)])
def test_again_header_round_trips(fd, consumed):
    line = render_header(TOKEN, 4242, fd, consumed)
    assert line == f"{TOKEN} 4242 {fd} again {consumed}\n".encode()
    assert parse_header(line, TOKEN) == Header(4242, fd, again=True, consumed=consumed)


def test_plain_header_is_unchanged():
    assert render_header(TOKEN, 7, 1) == f"{TOKEN} 7 1\n".encode()
    assert parse_header(render_header(TOKEN, 7, 1), TOKEN) == Header(7, 1)
    assert not parse_header(render_header(TOKEN, 7, 1), TOKEN).again


@pytest.mark.parametrize("tail", [
    "0 again", "0 again ", "0 again -1", "0 again +1", "0 again 1.5", "0 again 0x10",
    "0 again 1e3", "0 again 1 2", "0 again  1", f"0 again {MAX_CONSUMED + 1}",
    "0 again " + "9" * 40, "0 again 00000000000000000001", "0 Again 1", "0 agian 1",
    "3 again 0", "-1 again 0", "err again 0", "ranks again 0", "0 again \t1", "0 again 1\r",
])
def test_hostile_again_headers_are_dropped(tail):
    assert parse_header(f"{TOKEN} 99 {tail}\n".encode(), TOKEN) is None


def test_again_header_non_ascii_and_wrong_token():
    assert parse_header(f"{TOKEN} 99 0 again \uff11\n".encode(), TOKEN) is None
    assert parse_header(render_header("f" * 32, 99, 0, 5), TOKEN) is None


def test_render_refuses_a_consumed_out_of_range():
    for bad in (-1, MAX_CONSUMED + 1):
        with pytest.raises(BpfsError) as exc:
            render_header(TOKEN, 1, 0, bad)
        assert exc.value.errno == errno.EINVAL


def test_parse_count_bounds():
    assert execreq.parse_count("0", 10) == 0
    assert execreq.parse_count("10", 10) == 10
    assert execreq.parse_count("11", 10) is None
    assert execreq.parse_count("", 10) is None


# ---- stdin_consumed ----------------------------------------------------------------------

def _pair() -> tuple[socket.socket, socket.socket]:
    """(sender, reader): a TCP connection on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        reader = socket.create_connection(lst.getsockname())
        sender, _ = lst.accept()
    return sender, reader


def _arrived(reader: socket.socket, n: int) -> None:
    """Wait until `n` bytes (and whatever FIN was sent) are in reader's queue."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        select.select([reader], [], [], 0.05)
        if len(reader.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= n:
            time.sleep(0.05)                # the FIN, if any, is right behind
            return
    raise AssertionError("data did not arrive")


def test_stdin_consumed_counts_what_the_reader_read():
    sender, reader = _pair()
    with sender, reader:
        assert stdin_consumed(reader.fileno()) == 0
        sender.sendall(b"x" * 1000)
        _arrived(reader, 1000)
        assert stdin_consumed(reader.fileno()) == 0
        assert len(reader.recv(300)) == 300
        assert stdin_consumed(reader.fileno()) == 300
        assert stdin_consumed(reader.fileno(), base=4000) == 4300     # a link made again
        sender.sendall(b"y" * 500)
        _arrived(reader, 1200)
        assert stdin_consumed(reader.fileno()) == 300


def test_stdin_consumed_after_the_servers_eof():
    """The peer's FIN counts in tcpi_bytes_received but is no stdin byte."""
    sender, reader = _pair()
    with sender, reader:
        sender.sendall(b"z" * 1000)
        sender.shutdown(socket.SHUT_WR)
        _arrived(reader, 1000)
        assert stdin_consumed(reader.fileno()) == 0
        got = reader.recv(400)
        assert stdin_consumed(reader.fileno()) == len(got)
        while reader.recv(1 << 16):
            pass                            # read to EOF, the FIN too
        assert stdin_consumed(reader.fileno()) == 1000


def test_stdin_consumed_of_a_non_socket():
    r, w = os.pipe()
    try:
        with pytest.raises(BpfsError) as exc:
            stdin_consumed(r)
        assert exc.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)


# ---- connecting links again --------------------------------------------------------------

def _headers(lst: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(5)
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            out.append(line)
    return sorted(out)


async def test_connect_links_sends_again_headers():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        fds = await connect_links({0: LinkTarget("127.0.0.1", port, TOKEN, 77, consumed=5),
                                   2: LinkTarget("127.0.0.1", port, TOKEN, 77, consumed=0)})
        try:
            assert sorted(fds) == [0, 2] and all(os.get_blocking(fd) for fd in fds.values())
            got = await trio.to_thread.run_sync(_headers, lst, 2)
        finally:
            for fd in fds.values():
                os.close(fd)
    assert got == [render_header(TOKEN, 77, 0, 5), render_header(TOKEN, 77, 2, 0)]


def test_node_links_again_checks_its_targets_and_connects():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        target = LinkTarget("127.0.0.1", port, TOKEN, 9, consumed=0)
        for bad in ({1: target}, {1: target, 2: LinkTarget("127.0.0.1", port, TOKEN, 9)}):
            with pytest.raises(BpfsError) as exc:
                Links.again(["null", "socket", "socket"], bad)
            assert exc.value.errno == errno.EINVAL
        links = Links.again(["null", "socket", "stdout"], {1: target})
        assert links.ready()
        fds = links.fds()
        try:
            assert fds[0] is None and fds[2] is None and fds[1] is not None
            assert _headers(lst, 1) == [render_header(TOKEN, 9, 1, 0)]
        finally:
            os.close(fds[1])


def test_a_refused_connect_is_an_errno():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
    with pytest.raises(BpfsError) as exc:
        links = Links("127.0.0.1", port, TOKEN, 9, ["socket", "null", "null"])
        links.ready()
    assert exc.value.errno == errno.ECONNREFUSED

"""bpfs/node/earlylinks.py: a moved process's links connect at `again`, used by its restore."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Iterator

import pytest

from bpfs.node import earlylinks
from bpfs.wire import execreq, messages

pytestmark = pytest.mark.timeout(30)

TOKEN = "ab" * 16
IO = ("socket", "socket", "stdout")


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A stdio server's listening socket on loopback."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(5)
    try:
        yield s
    finally:
        s.close()


def session() -> SimpleNamespace:
    return SimpleNamespace(node=SimpleNamespace(cfg=SimpleNamespace(host="127.0.0.1")),
                           again={}, early={})


def again(port: int, consumed: int = 7, **kw) -> messages.Again:
    fields = dict(port=port, token=TOKEN, io=IO, pid=300)
    fields.update(kw)
    return messages.Again(id=5, consumed=consumed, **fields)


def restore(port: int, token: str = TOKEN) -> messages.Restore:
    return messages.Restore(id=5, image=memoryview(b""), uid=0, gid=0, groups=(), io=IO,
                            port=port, token=token, pid=300)


def headers(server: socket.socket, n: int) -> list[tuple[socket.socket, bytes]]:
    out = []
    for _ in range(n):
        conn, _ = server.accept()
        conn.settimeout(5)
        out.append((conn, conn.recv(4096)))
    return out


def test_links_made_at_again_are_the_restores_when_they_fit(server) -> None:
    s, port = session(), server.getsockname()[1]
    msg = again(port)
    s.again[5] = msg.consumed
    earlylinks.on_again(s, msg)
    got = headers(server, 2)                # connected before the restore came
    assert sorted(h for _, h in got) == sorted(
        execreq.render_header(TOKEN, 300, n, 7 if n == 0 else 0) for n in (0, 1))
    early = s.early[5][1]
    links = earlylinks.links_for(s, restore(port), 300)
    assert links is early and links.ready() and not s.early and not s.again
    for fd in links.fds():
        if fd is not None:
            socket.socket(fileno=fd).close()
    for conn, _ in got:
        conn.close()


def test_links_that_do_not_fit_are_closed_and_made_again(server) -> None:
    s, port = session(), server.getsockname()[1]
    s.again[5] = 7
    earlylinks.on_again(s, again(port))
    early = headers(server, 2)
    links = earlylinks.links_for(s, restore(port, token="cd" * 16), 300)
    for conn, _ in early:
        assert conn.recv(10) == b""         # the early ones closed
        conn.close()
    assert links.ready()
    fresh = headers(server, 2)
    assert sorted(h for _, h in fresh) == sorted(
        execreq.render_header("cd" * 16, 300, n, 7 if n == 0 else 0) for n in (0, 1))
    links.close()
    for conn, _ in fresh:
        conn.close()


def test_an_again_without_the_links_fields_makes_nothing_early(server) -> None:
    s = session()
    earlylinks.on_again(s, messages.Again(id=5, consumed=0))
    assert not s.early


def test_links_never_used_are_closed_at_abort_or_the_end(server) -> None:
    s, port = session(), server.getsockname()[1]
    earlylinks.on_again(s, again(port))
    conns = headers(server, 2)
    earlylinks.drop(s, 5)
    assert not s.early
    for conn, _ in conns:
        assert conn.recv(10) == b""
        conn.close()
    for rid in range(earlylinks.MAX_EARLY + 2):   # bounded: the oldest go first
        earlylinks.on_again(s, messages.Again(id=rid, consumed=0, port=port, token=TOKEN,
                                              io=("socket", "null", "null"), pid=300))
    assert len(s.early) == earlylinks.MAX_EARLY and 0 not in s.early
    earlylinks.drop_all(s)
    assert not s.early


def test_a_server_that_refuses_leaves_the_restore_to_connect_itself() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]       # nothing listens there once closed
    s = session()
    earlylinks.on_again(s, again(port))
    assert not s.early                      # refused at once on loopback: not kept

"""The master's one-way links to bpsh (ranks, error headers) over real loopback sockets:
written at once when they can be, finished by a task when they cannot, never lost."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest
import trio

from bpfs.master import tell_bpsh

pytestmark = pytest.mark.timeout(30)


def _listener() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen(4)
    return s, s.getsockname()[1]


def _read_all(listener: socket.socket, out: list[bytes]) -> threading.Thread:
    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            chunks = []
            while data := conn.recv(1 << 16):
                chunks.append(data)
        out.append(b"".join(chunks))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_small_link_goes_at_once() -> None:
    listener, port = _listener()
    with listener:
        got: list[bytes] = []
        reader = _read_all(listener, got)
        assert tell_bpsh.send_now(port, b"token 42 ranks\n42 43\n", "ranks") is None
        reader.join(5)
        assert got == [b"token 42 ranks\n42 43\n"]


async def test_what_does_not_fit_is_finished_by_a_task() -> None:
    listener, port = _listener()
    with listener:
        data = os.urandom(16 << 20)             # more than the socket buffers hold
        left = tell_bpsh.send_now(port, data, "big")
        assert left is not None
        assert not left.connecting and 0 < len(left.data) < len(data)
        got: list[bytes] = []
        reader = _read_all(listener, got)
        await tell_bpsh.finish(left, "big")
        await trio.to_thread.run_sync(reader.join, 5)
        assert got == [data] and left.sock.fileno() == -1


async def test_nobody_listening_is_logged_not_raised(caplog) -> None:
    caplog.set_level(logging.INFO)
    listener, port = _listener()
    listener.close()                            # the port is free again: refused
    assert tell_bpsh.send_now(port, b"x", "the ranks") is None
    await tell_bpsh.send(port, b"x", "an error")
    assert "cannot tell bpsh" in caplog.text

"""Hostile peers on the node port: raw sockets, with and without the cluster key.

A peer that can reach the node port but holds no key sends handshake frames with
fields of every wrong type and size; one that holds the key sends malformed and
out-of-order frames before and after it registers; a hostile master feeds a real
node daemon. Every frame is checked against the message table (bpfs/messages.py)
right after decoding: a bad one closes that one connection with one log line naming
the peer, never a traceback, never a stall of the master, never state that outlives
the connection. The master runs as `python -m bpfs.master` (tests/e2e/test_master.py's
`Master`), on real sockets and a real FUSE mount.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from typing import Any

import pytest
import trio

from bpfs import wire
from tests.e2e.test_master import (FACTS, Master, fake_node, master, node_state,  # noqa: F401
                                   register, wait_for)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with allow_other needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="no FUSE"),
]

HELLO = {"t": "hello", "v": wire.VERSION}


# ---- a raw peer, with blocking sockets ----------------------------------------------------

def connect(m: Master, source: str = "127.0.0.1") -> socket.socket:
    """A connection from `source`, any loopback address: the master logs at most
    RefusalLog.BURST refusals of one host a minute, so tests that count lines give each
    connection a host of its own."""
    return socket.create_connection(("127.0.0.1", m.port), timeout=10,
                                    source_address=(source, 0))


def peer_name(s: socket.socket) -> str:
    host, port = s.getsockname()[:2]
    return f"{host}:{port}"


def read_exact(s: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_frame(s: socket.socket) -> dict[str, Any] | None:
    """The next message, or None at EOF (or a reset: the master closed without reading)."""
    try:
        head = read_exact(s, 4)
        body = None if head is None else read_exact(s, int.from_bytes(head, "big"))
    except ConnectionResetError:
        return None
    return None if body is None else wire.unpack(body)


def closed_within(s: socket.socket, timeout: float) -> bool:
    """True if the master closes `s` within `timeout` (whatever it says before)."""
    s.settimeout(timeout)
    try:
        while read_frame(s) is not None:
            pass
        return True
    except TimeoutError:
        return False


def hello(m: Master, source: str = "127.0.0.1") -> tuple[socket.socket, dict[str, Any]]:
    s = connect(m, source)
    s.sendall(wire.pack({**HELLO, "nonce": os.urandom(wire.NONCE_BYTES)}))
    challenge = read_frame(s)
    assert challenge is not None and challenge["t"] == "challenge", challenge
    return s, challenge


class Reader(threading.Thread):
    """Reads /bproc/status over and over while an attack runs; keeps the slowest read."""

    def __init__(self, m: Master) -> None:
        super().__init__(daemon=True)
        self.path = m.path("status")
        self.slowest = 0.0
        self.reads = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            with open(self.path) as f:
                f.read()
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.reads += 1
            time.sleep(0.01)

    def __enter__(self) -> "Reader":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.join(30)


def log_lines_about(m: Master, peer: str) -> list[str]:
    return [line for line in m.log().splitlines() if peer in line]


def assert_no_traceback(m: Master) -> None:
    log = m.log()
    assert "Traceback" not in log and "Error:" not in log.replace("ProtocolError", ""), log[-3000:]


# ---- before authentication ------------------------------------------------------------------

MACS = [8_000_000_000, 2**63, 2**64 - 1, -1, "x" * 40, [1, 2, 3], {"a": 1}, None, True, 1.5,
        b"short", b"\0" * 4000]


def test_auth_mac_of_any_type_or_size_is_refused_without_a_stall(master: Master) -> None:
    """`auth` with an integer mac made the master allocate bytes(N) in its event loop (8e9:
    every /bproc read stalled 6 s); a string mac raised a TypeError with a traceback."""
    with Reader(master) as reader:
        for i, mac in enumerate(MACS):
            s, _ = hello(master, f"127.0.1.{i + 1}")
            peer = peer_name(s)
            with s:
                s.sendall(wire.pack({"t": "auth", "mac": mac}))
                assert closed_within(s, 5), f"mac {mac!r:.40}: connection still open"
            wait_for_sync(lambda: log_lines_about(master, peer), 5)
            lines = log_lines_about(master, peer)
            assert len(lines) == 1, (mac, lines)
            assert "auth" in lines[0] and "mac" in lines[0], lines[0]
        time.sleep(0.2)
    print(f"\nslowest /bproc/status read during {len(MACS)} bad auth frames: "
          f"{reader.slowest * 1e3:.1f} ms ({reader.reads} reads)")
    assert reader.slowest < 0.5
    assert_no_traceback(master)
    assert master.proc is not None and master.proc.poll() is None


def wait_for_sync(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)

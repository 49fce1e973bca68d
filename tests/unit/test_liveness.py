"""bpfs/master/liveness.py: the timing rules, and the kernel's word on when data last arrived."""

from __future__ import annotations

import socket
import time

import pytest
import trio
import trio.testing

from bpfs.master import liveness
from bpfs.master.daemon import MasterConfig


@pytest.mark.parametrize("timeout, beat", [(5.0, 1.0), (60.0, 1.0), (0.5, 0.1), (0.1, 0.02),
                                           (2.0, 0.4)])
def test_heartbeat_is_a_fifth_of_the_timeout_at_most_a_second(timeout: float, beat: float) -> None:
    assert liveness.heartbeat_for(timeout) == pytest.approx(beat)
    assert liveness.settings_problem(timeout, None) is None
    assert MasterConfig(ping_timeout=timeout).heartbeat == pytest.approx(beat)


def test_an_explicit_heartbeat_is_kept_and_checked() -> None:
    assert MasterConfig(ping_timeout=1.5, heartbeat=0.2).heartbeat == 0.2
    assert liveness.settings_problem(1.5, 0.2) is None
    assert liveness.settings_problem(0.5, 1.0) == (
        "heartbeat (1 s) must be positive and shorter than the ping timeout (0.5 s); "
        "leave it out to get 0.1 s")
    for beat in (0.5, 0.0, -1.0):
        assert liveness.settings_problem(0.5, beat) is not None
    assert liveness.settings_problem(0.0, None) == "ping timeout (0 s) must be positive"


def test_check_interval_is_a_quarter_of_the_timeout_within_bounds() -> None:
    assert liveness.check_interval(1.0) == 0.25
    assert liveness.check_interval(0.1) == 0.05
    assert liveness.check_interval(60.0) == 1.0


def test_silence_counts_data_the_kernel_received_and_nobody_read() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        conn, _ = server.accept()
        with conn:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            time.sleep(0.3)
            assert liveness.silence(stream) == pytest.approx(0.3, abs=0.15)   # since connected
            client.sendall(b"frame")
            assert liveness.silence(stream) < 0.1           # received, not read
            time.sleep(0.3)
            assert liveness.silence(stream) == pytest.approx(0.3, abs=0.15)


def test_silence_is_unknown_for_what_is_not_a_tcp_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert liveness.silence(trio.SocketStream(trio.socket.from_stdlib_socket(a))) is None
    left, _right = trio.testing.memory_stream_pair()
    assert liveness.silence(left) is None
    assert liveness.silence(object()) is None

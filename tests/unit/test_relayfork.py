"""The relay fork-server (bpfs/cli/bpsh/relayfork.py) and the master's side of it
(bpfs/master/relayfork.py, bpfs/master/relay.py): real server, real forked relays as a
real user, over real loopback links; the test plays the master's P (a `sleep`) and the
node (its links)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from bpfs.master import relay as relays
from bpfs.master.relayfork import ForkedRelay, RelayForks
from bpfs.wire import relaystart
from bpfs.wire.execreq import render_header

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = os.urandom(16).hex()


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def alive(pid: int) -> bool:
    try:
        return status_of(pid).get("State", "Z")[:1] not in ("Z", "X")
    except OSError:
        return False


class Stdio:
    """P (a `sleep`) and pipes standing for its fds 0-2, the ready and the token pipes."""

    def __init__(self) -> None:
        self.target = subprocess.Popen(["sleep", "30"])
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()
        self.token_r, token_w = os.pipe()
        os.write(token_w, TOKEN.encode())
        os.close(token_w)

    def fds(self) -> list[int]:
        return [self.in_r, self.out_w, self.err_w, self.ready_w, self.token_r]

    def given(self) -> None:
        """The master's copies closed once the relay has them."""
        for name in ("in_r", "out_w", "err_w", "ready_w", "token_r"):
            os.close(getattr(self, name))
            setattr(self, name, -1)

    def port(self) -> int:
        with os.fdopen(self.ready_r, "rb") as f:
            self.ready_r = -1
            return int(f.read())

    def close(self) -> None:
        if self.target.poll() is None:
            self.target.kill()
        self.target.wait(5)
        for name in ("in_r", "in_w", "out_r", "out_w", "err_r", "err_w", "ready_r",
                     "ready_w", "token_r"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))


def run_with_forks(body) -> None:
    """trio.run `body(forks)` with a fork-server running; stopped after, as the master does."""
    async def main() -> None:
        forks = RelayForks(relaystart.environment())
        async with trio.open_nursery() as nursery:
            await nursery.start(forks.run)
            try:
                await body(forks)
            finally:
                nursery.cancel_scope.cancel()
        assert forks.server_pid is None
    trio.run(main)


def test_a_forked_relay_runs_as_the_user_serves_and_ends_with_its_process(users):
    alice = users["alice"]
    io = Stdio()
    seen: dict = {}

    async def body(forks: RelayForks) -> None:
        t0 = time.perf_counter()
        relay = await forks.fork(io.target.pid, alice.uid, alice.gid, sorted(alice.groups),
                                 "127.0.0.1", io.fds())
        assert isinstance(relay, ForkedRelay)
        io.given()
        port = await trio.to_thread.run_sync(io.port)
        seen["ms"] = (time.perf_counter() - t0) * 1000
        st = status_of(relay.pid)
        seen["status"] = st
        seen["sid"] = os.getsid(relay.pid)
        with open(f"/proc/{relay.pid}/comm") as f:
            seen["comm"] = f.read().strip()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(render_header(TOKEN, io.target.pid, 1) + b"from the node\n")
        io.target.kill()
        with trio.fail_after(5):
            await relay.wait()                      # it ends once P has ended
        seen["relay"] = relay.pid

    try:
        run_with_forks(body)
        st = seen["status"]
        assert st["Uid"].split() == [str(alice.uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(alice.gid)] * 4, st["Gid"]
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == 0     # no root left
        assert sorted(map(int, st["Groups"].split())) == sorted(alice.groups)
        assert seen["sid"] == seen["relay"]        # a session of its own
        ignored = int(st["SigIgn"], 16)             # as in a spawned Python relay:
        assert ignored & (1 << (signal.SIGPIPE - 1))                # EPIPE, not death
        assert not ignored & (1 << (signal.SIGTERM - 1)) and int(st["SigBlk"], 16) == 0
        assert seen["comm"] == f"bprelay {io.target.pid}"
        assert os.read(io.out_r, 100) == b"from the node\n"
        assert not alive(seen["relay"])
        print(f"forked relay listening after {seen['ms']:.1f} ms")
    finally:
        io.close()


def test_a_killed_server_is_started_again_and_meanwhile_the_relay_is_spawned():
    io, io2 = Stdio(), Stdio()
    seen: dict = {}

    async def body(forks: RelayForks) -> None:
        first = forks.server_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with trio.fail_after(5):                    # its end, not yet seen by `run`
            while alive(first):
                await trio.sleep(0.01)
        seen["fallback"] = await forks.fork(io.target.pid, 0, 0, [], "127.0.0.1", io.fds())
        with trio.fail_after(10):
            while forks.server_pid in (None, first):
                await trio.sleep(0.01)
        seen["starts"] = forks.starts
        again = await forks.fork(io2.target.pid, 0, 0, [], "127.0.0.1", io2.fds())
        io2.given()
        seen["again"] = again
        assert isinstance(again, ForkedRelay)
        await trio.to_thread.run_sync(io2.port)
        io2.target.kill()
        with trio.fail_after(5):
            await again.wait()

    try:
        run_with_forks(body)
        assert seen["fallback"] is None             # the caller spawns it instead
        assert seen["starts"] == 2
    finally:
        io.close()
        io2.close()


def test_the_master_stopping_leaves_no_server_and_no_relay():
    io = Stdio()
    seen: dict = {}

    async def body(forks: RelayForks) -> None:
        relay = await forks.fork(io.target.pid, 0, 0, [], "127.0.0.1", io.fds())
        io.given()
        await trio.to_thread.run_sync(io.port)
        seen["relay"], seen["server"] = relay.pid, forks.server_pid     # P still runs

    try:
        t0 = time.monotonic()
        run_with_forks(body)
        assert time.monotonic() - t0 < 10
        assert not alive(seen["server"]) and not alive(seen["relay"])
        assert io.target.poll() is None             # P itself is not the server's
    finally:
        io.close()


def test_a_bad_request_is_refused_and_the_server_goes_on():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen([sys.executable, "-m", "bpfs.cli.bpsh.relayfork", "--fd",
                               str(b.fileno())], pass_fds=(b.fileno(),), cwd="/",
                              env=relaystart.environment())
    b.close()
    try:
        a.settimeout(10)
        r, w = os.pipe()
        socket.send_fds(a, [b'{"pid": "x"}'], [r, w])
        os.close(r)
        os.close(w)
        msg, fds, _, _ = socket.recv_fds(a, 4096, 2)
        assert fds == [] and json.loads(msg)["errno"] == 22
        socket.send_fds(a, [b"not json"], [])
        assert json.loads(a.recv(4096))["errno"] == 22
        a.close()                                   # EOF: it ends
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)


@pytest.mark.parametrize("forked", [True, False])
def test_the_masters_start_takes_the_stdio_of_p_forked_or_spawned(forked):
    """bpfs/master/relay.start as a move calls it: P's fds 0-2 copied from P itself,
    `on_asked` once the relay is on its way, the port once it listens."""
    out_r, out_w = os.pipe()
    target = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL, stdout=out_w)
    os.close(out_w)
    seen: dict = {"asked": 0}

    async def body(forks: RelayForks) -> None:
        def asked() -> None:
            seen["asked"] += 1
        relay = await relays.start(target.pid, 0, 0, [], "127.0.0.1",
                                   forks if forked else None, on_asked=asked)
        seen["kind"] = type(relay.process).__name__
        with socket.create_connection(("127.0.0.1", relay.port)) as c:
            c.sendall(render_header(relay.token, target.pid, 1) + b"via the relay\n")
        target.kill()
        with trio.fail_after(10):
            await relays.reap(relay)

    try:
        run_with_forks(body)
        assert seen["asked"] == 1
        assert seen["kind"] == ("ForkedRelay" if forked else "_Spawned")
        assert os.read(out_r, 100) == b"via the relay\n"
    finally:
        if target.poll() is None:
            target.kill()
        target.wait(5)
        os.close(out_r)

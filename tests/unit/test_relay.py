"""The relay (`python -m bpfs.cli.bpsh.relay`): bpsh's link server for a process that did
not start under bpsh, run for real as the master runs it (fds 0-2 given, the port on
--ready-fd), over real loopback sockets; the test's threads play the nodes."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from bpfs.wire.execreq import render_header

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = os.urandom(16).hex()


class Relay:
    """A relay for a `sleep` the test started (its P), with pipes as its fds 0-2."""

    def __init__(self, *extra: str, user=None) -> None:
        self.target = subprocess.Popen(["sleep", "30"])
        cred = {} if user is None else dict(user=user.uid, group=user.gid,
                                            extra_groups=list(user.groups))
        self.in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        token_r, token_w = os.pipe()
        os.write(token_w, TOKEN.encode() + b"\n")
        os.close(token_w)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bpfs.cli.bpsh.relay", "--pid", str(self.target.pid),
                 "--token-fd", str(token_r), "--host", "127.0.0.1", "--ready-fd",
                 str(ready_w), *extra],
                stdin=self.in_r, stdout=out_w, stderr=err_w, pass_fds=(ready_w, token_r),
                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                **cred)
        finally:
            for fd in (out_w, err_w, ready_w, token_r):
                os.close(fd)
        with os.fdopen(ready_r, "rb") as f:
            line = f.read()                 # to EOF: the relay closes it after the port
        self.port = int(line)

    def link(self, fd: int, consumed: int | None = None, token: str = TOKEN,
             pid: int | None = None) -> socket.socket:
        c = socket.create_connection(("127.0.0.1", self.port))
        c.settimeout(10)
        c.sendall(render_header(token, pid or self.target.pid, fd, consumed))
        return c

    def end_target(self) -> None:
        self.target.kill()
        self.target.wait(5)

    def wait(self) -> tuple[int, bytes, bytes]:
        """The relay's exit status, stdout and stderr (it must end on its own)."""
        os.close(self.in_w)
        self.in_w = -1
        code = self.proc.wait(10)
        return code, _read(self.out_r), _read(self.err_r)

    def close(self) -> None:
        for p in (self.proc, self.target):
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for fd in (self.in_r, self.in_w, self.out_r, self.err_r):
            if fd >= 0:
                os.close(fd)


def _read(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def relay():
    made: list[Relay] = []

    def make(*extra: str, user=None) -> Relay:
        made.append(Relay(*extra, user=user))
        return made[-1]
    try:
        yield make
    finally:
        for r in made:
            r.close()


def recv_all(c: socket.socket) -> bytes:
    chunks = []
    while chunk := c.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_exactly(c: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def refused(c: socket.socket) -> bool:
    try:
        return recv_all(c) == b""
    except ConnectionResetError:
        return True


def test_output_in_order_across_a_move_and_the_end(relay):
    r = relay("--fds", "1,2")
    out, err = r.link(1), r.link(2)
    out.sendall(b"one ")
    err.sendall(b"oops ")
    out2, err2 = r.link(1, consumed=0), r.link(2, consumed=0)
    out2.sendall(b"three")
    err2.sendall(b"again")
    time.sleep(0.1)
    out.sendall(b"two ")
    out.close()
    err.close()
    out2.close()
    err2.close()
    r.end_target()
    assert r.wait() == (0, b"one two three", b"oops again")


def test_stdin_is_not_read_before_a_link_then_goes_on_from_consumed(relay):
    r = relay("--fds", "0")
    data = bytes(range(256)) * 200                  # 51200 bytes: they fit in the pipe
    os.write(r.in_w, data)
    time.sleep(0.3)
    waiting = struct.unpack("i", fcntl.ioctl(r.in_r, termios.FIONREAD, b"\0" * 4))[0]
    assert waiting == len(data)                     # no link yet: left to the process
    old = r.link(0)
    head = recv_exactly(old, 20_000)
    time.sleep(0.1)                                 # the relay has sent the rest: unread
    new = r.link(0, consumed=len(head))
    more = b"after the move" * 1000

    def writer() -> None:
        os.write(r.in_w, more)
    t = threading.Thread(target=writer)
    t.start()
    rest = recv_exactly(new, len(data) - len(head) + len(more))
    t.join(5)
    old.close()
    r.end_target()
    code, _, err = r.wait()
    assert head + rest == data + more and code == 0 and err == b""
    assert refused(new)                             # P ended: its stdin link is closed


def test_links_not_ours_and_consumed_out_of_range_are_refused(relay):
    r = relay()
    bad = [r.link(1, token="0" * 32), r.link(1, pid=r.target.pid + 1), r.link(0, consumed=10**12)]
    assert [refused(c) for c in bad] == [True, True, True]
    for c in bad:
        c.close()
    out = r.link(1)
    out.sendall(b"fine\n")
    out.close()
    r.end_target()
    code, stdout, stderr = r.wait()
    assert code == 0 and stdout == b"fine\n"
    assert stderr.count(b"bpsh-relay: ") == 1 and b"moved having read 1000000000000" in stderr


def test_the_relay_ends_when_its_process_ends(relay):
    r = relay()
    out = r.link(1)
    out.sendall(b"last words\n")
    r.end_target()
    time.sleep(0.3)
    assert r.proc.poll() is None                    # an output link is still open
    out.close()
    start = time.monotonic()
    code, stdout, _ = r.wait()
    assert code == 0 and stdout == b"last words\n" and time.monotonic() - start < 5


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_token_on_the_command_line_and_an_ipv6_host():
    target = subprocess.Popen(["sleep", "30"])
    ready_r, ready_w = os.pipe()
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bpfs.cli.bpsh.relay", "--pid", str(target.pid), "--token",
             TOKEN, "--host", "::1", "--ready-fd", str(ready_w), "--fds", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=(ready_w,), cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as f:
            port = int(f.read())
        with socket.create_connection(("::1", port)) as c:
            c.sendall(render_header(TOKEN, target.pid, 1) + b"over v6\n")
        target.kill()
        target.wait(5)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and out == b"over v6\n"
    finally:
        for p in (proc, target):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)


def test_a_process_that_never_moved(relay):
    """A move that failed before any link: the relay reads nothing and ends with P."""
    r = relay()
    os.write(r.in_w, b"for the process\n")
    r.end_target()
    code, stdout, stderr = r.wait()
    assert (code, stdout, stderr) == (0, b"", b"")
    assert os.read(r.in_r, 100) == b"for the process\n"


def test_usage_errors_and_help():
    run = dict(capture_output=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
               timeout=10)
    cmd = [sys.executable, "-m", "bpfs.cli.bpsh.relay"]
    done = subprocess.run([*cmd, "--help"], **run)
    assert done.returncode == 0 and b"--ready-fd" in done.stdout and b"again" in done.stdout
    done = subprocess.run([*cmd, "--pid", "1", "--token", "xyz", "--host", "127.0.0.1",
                           "--ready-fd", "9"], **run)
    assert done.returncode == 2 and b"32 hex digits" in done.stderr
    done = subprocess.run([*cmd, "--pid", "1", "--token", TOKEN, "--token-fd", "5",
                           "--host", "127.0.0.1", "--ready-fd", "9"], **run)
    assert done.returncode == 2 and b"not allowed with" in done.stderr
    done = subprocess.run([*cmd, "--pid", "1", "--token-fd", "57", "--host", "127.0.0.1",
                           "--ready-fd", "9"], **run)
    assert done.returncode == 2 and b"--token-fd 57: Bad file descriptor" in done.stderr
    done = subprocess.run([*cmd, "--pid", str(2**22 + 1), "--token", TOKEN, "--host",
                           "127.0.0.1", "--ready-fd", "9"], **run)
    assert done.returncode == 1 and b"No such process" in done.stderr



def test_as_another_user_in_a_session_of_its_own(relay, users):
    """As the master runs it: the process's user, no controlling terminal."""
    alice = users["alice"]
    r = relay("--fds", "0,1", user=alice)
    with open(f"/proc/{r.proc.pid}/status") as f:
        assert f"Uid:\t{alice.uid}\t{alice.uid}" in f.read()
    assert os.getsid(r.proc.pid) == r.proc.pid
    os.write(r.in_w, b"to the process\n")
    inp, out = r.link(0), r.link(1)
    out.sendall(b"from the process\n")
    assert recv_exactly(inp, 15) == b"to the process\n"
    inp.close()
    out.close()
    r.end_target()
    assert r.wait() == (0, b"from the process\n", b"")

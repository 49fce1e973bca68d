"""bpfs.migrate.sendpages: a stopped process writes its own big run into our socket (its
bytes exactly, in order, through a full socket), and goes on afterwards exactly as it was:
no fd more, no mapping more, its signal mask back; a peer gone fails EPIPE, the process
untouched."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from typing import Any, Iterator

import pytest

from bpfs.migrate import dump, procfs, running
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.lazyrun import LazyRun
from bpfs.migrate.sendpages import PageSender
from tests.engine.running_rig import PY, started

pytestmark = pytest.mark.timeout(60)

MB = 24
# 24 MB of a pattern in one big anonymous run, then a line per tick
HOLDER = ("import mmap, signal, sys, time\n"
          "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])\n"
          f"m = mmap.mmap(-1, {MB} << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
          f"for i in range(0, {MB} << 20, 4096):\n"
          "    m[i:i + 4096] = bytes([i // 4096 % 251 + 1]) * 4096\n"
          "print('filled', flush=True)\n"
          "n = 0\n"
          "while True:\n"
          "    n += 1\n"
          "    print(n, flush=True)\n"
          "    time.sleep(0.02)\n")


def _big_run(pid: int) -> LazyRun:
    img = running.dump_running(pid, frozenset({0, 1, 2}), lazy=True)
    runs = [data for r in img.regions for _, data in r.pages if isinstance(data, LazyRun)
            and len(data) >= MB << 20]
    assert runs, "no big lazy run in the dump"
    return runs[0]


def _state(pid: int) -> tuple:
    return (sorted(os.listdir(f"/proc/{pid}/fd")), procfs.read_text(pid, "maps"),
            pt.get_sigmask(pid), pt.getregs(pid).pack())


def _received(sock: socket.socket, size: int, out: bytearray) -> threading.Thread:
    def take() -> None:
        while len(out) < size:
            time.sleep(0.002)            # a slow reader: the socket fills, sendto waits
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            out.extend(chunk)
    t = threading.Thread(target=take)
    t.start()
    return t


@contextlib.contextmanager
def _stopped_holder(tmp_path) -> Iterator[tuple[Any, LazyRun]]:
    """The holder seized and stopped, and its big run; once the body is done, its state
    is as it was, and released it goes on."""
    with started([PY, "-S", "-c", HOLDER], str(tmp_path / "out")) as prog:
        prog.wait_lines(2)
        running.seize_running(prog.pid)
        running.stop(prog.pid)
        run = _big_run(prog.pid)
        before = _state(prog.pid)
        yield prog, run
        assert _state(prog.pid) == before
        running.release(prog.pid)
        n = len(prog.lines())
        prog.wait_lines(n + 3)
        assert prog.alive()


def test_a_stopped_process_sends_its_run_and_goes_on_as_it_was(tmp_path) -> None:
    with _stopped_holder(tmp_path) as (prog, run):
        ours, theirs = socket.socketpair()
        got = bytearray()
        reader = _received(theirs, len(run), got)
        try:
            with PageSender(prog.pid, ours.fileno(), timeout=10) as s:
                s.send(run.addr, run.size)
                assert s.sent == run.size
        finally:
            ours.close()
            reader.join(timeout=20)
            theirs.close()
        assert bytes(got) == bytes(run.read())


def test_a_peer_gone_fails_epipe_and_leaves_the_process_as_it_was(tmp_path) -> None:
    with _stopped_holder(tmp_path) as (prog, run):
        ours, theirs = socket.socketpair()
        theirs.close()
        try:
            with pytest.raises(MigrateError) as caught:
                with PageSender(prog.pid, ours.fileno(), timeout=10) as s:
                    s.send(run.addr, run.size)
        finally:
            ours.close()
        assert caught.value.errno in (errno.EPIPE, errno.ECONNRESET)
    assert "Traceback" not in open(prog.out).read()         # no SIGPIPE, nothing raised


def test_the_gadget_is_found_after_the_dump(tmp_path) -> None:
    with started([PY, "-S", "-c", HOLDER], str(tmp_path / "out")) as prog:
        prog.wait_lines(1)
        running.seize_running(prog.pid)
        running.stop(prog.pid)
        gadget = dump.syscall_gadget(prog.pid)
        assert pt.read_memory(prog.pid, [(gadget, 2)]) == b"\x0f\x05"
        running.release(prog.pid)


def test_frames_one_at_a_time_heads_and_bytes_in_order(tmp_path) -> None:
    """send_frame (the master's tracer: one frame a request): each head from us, then the
    piece's bytes, a LazyRun's by the process, any other buffer from us; on a blocking
    socket (`blocking`), as the master's stream is for the while."""
    from bpfs.migrate.sendpages import blocking
    with _stopped_holder(tmp_path) as (prog, run):
        ours, theirs = socket.socketpair()
        frames = [(b"head-1", run.cut(0, 8 << 20)), (b"head-2", b"plain bytes"),
                  (b"head-3", run.cut(8 << 20, 8 << 20))]
        size = sum(len(h) + len(p) for h, p in frames)
        got = bytearray()
        reader = _received(theirs, size, got)
        blocking(ours.fileno(), True, 10)
        try:
            with PageSender(prog.pid, ours.fileno(), timeout=10) as s:
                for head, piece in frames:
                    s.send_frame(head, piece)
        finally:
            ours.close()
            reader.join(timeout=20)
            theirs.close()
        want = b"".join(h + (p.read() if isinstance(p, LazyRun) else p) for h, p in frames)
        assert bytes(got) == want

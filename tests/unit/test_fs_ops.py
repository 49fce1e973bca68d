"""The FUSE operations called directly, without a mount (s3ql's t3 layer)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator

import pyfuse3
import pytest
import trio

from bpfs import formats
from bpfs.fs import procfs
from bpfs.fs.inodes import Ino, Kind
from bpfs.fs.ops import BpfsOperations, RefusalLog
from bpfs.model import Caller, Proc
from bpfs.output import ProcOutput
from tests.unit.test_ctl import FakeServices, services


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


@dataclass
class Fields:
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


ROOT = Ctx()
ALICE = Ctx(1000, 1000)


class FakePin:
    """Stands for bpfs.pin.Pin where the callers are made up (no such process): it pins
    whatever it is given and counts what is open. The real one is tested in test_pin.py
    and through the mount (tests/hostile/test_pid_reuse.py)."""
    open: set["FakePin"] = set()

    def __init__(self, tid: int, uid: int, gid: int) -> None:
        self.tid, self.uid, self.gid, self.groups = tid, uid, gid, frozenset()
        FakePin.open.add(self)

    def check(self) -> None:
        pass

    def close(self) -> None:
        FakePin.open.discard(self)


class Listing:
    """The token readdir passes to its reply (pyfuse3's is the kernel's request): it takes
    entries until `room` runs out, as a full reply buffer does, and keeps the last next id."""

    def __init__(self, room: int | None = None) -> None:
        self.names: list[str] = []
        self.next_id = 0
        self.room = room


def readdir_reply(token: Listing, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
    """Stands for pyfuse3.readdir_reply: False, and the entry not taken, once the buffer is full."""
    if token.room is not None and len(token.names) >= token.room:
        return False
    token.names.append(name.decode())
    token.next_id = next_id
    return True


def make(up: int = 2, configured: int = 3) -> tuple[BpfsOperations, FakeServices]:
    s = services(up, configured)
    return BpfsOperations(s, take_pin=FakePin, readdir_reply=readdir_reply), s


async def errno_of(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def path_ino(ops: BpfsOperations, path: str) -> int:
    ino = pyfuse3.ROOT_INODE
    for part in path.strip("/").split("/"):
        if part:
            ino = (await ops.lookup(ino, part.encode(), ROOT)).st_ino
    return ino


async def read_all(ops: BpfsOperations, path: str, ctx: Ctx = ROOT) -> str:
    fi = await ops.open(await path_ino(ops, path), os.O_RDONLY, ctx)
    try:
        out, off = b"", 0
        while chunk := await ops.read(fi.fh, off, 7):     # small reads: offsets must work
            out, off = out + chunk, off + len(chunk)
        return out.decode()
    finally:
        await ops.release(fi.fh)


async def listdir(ops: BpfsOperations, path: str) -> list[str]:
    listing = Listing()
    fh = await ops.opendir(await path_ino(ops, path), ROOT)
    await ops.readdir(fh, 0, listing)
    await ops.releasedir(fh)
    return listing.names


def test_inode_encoding_round_trips():
    for ino in (Ino(Kind.ROOT), Ino(Kind.NODE_CTL, 65535), Ino(Kind.PROC_STATUS, 4194304, 77)):
        assert Ino.decode(ino.encode()) == ino
    assert Ino(Kind.ROOT).encode() == pyfuse3.ROOT_INODE


async def test_tree_listing():
    ops, _ = make()
    assert await listdir(ops, "/") == ["status", "events", "nodes", "procs"]
    assert await listdir(ops, "/nodes") == ["0", "1", "2"]
    assert await listdir(ops, "/nodes/1") == ["status", "ctl", "info", "procs"]
    assert await listdir(ops, "/procs") == []
    ops.cluster.start_proc(77, 1, 1000, 100, "sleep", 1.0)
    assert await listdir(ops, "/procs") == ["77"]
    assert await listdir(ops, "/procs/77") == ["status", "stat", "node", "signal", "ctl"]
    d = await ops.getattr(await path_ino(ops, "/procs/77"), ROOT)
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (1000, 100, 0o555)


async def test_readdir_resumes_after_a_full_buffer():
    ops, _ = make()
    fh = await ops.opendir(await path_ino(ops, "/nodes/1"), ROOT)
    first, rest = Listing(room=2), Listing()
    await ops.readdir(fh, 0, first)
    await ops.readdir(fh, first.next_id, rest)
    await ops.releasedir(fh)
    assert (first.names, rest.names) == (["status", "ctl"], ["info", "procs"])


async def test_lookup_refusals():
    ops, _ = make()
    root = pyfuse3.ROOT_INODE
    assert await errno_of(ops.lookup(root, b"nope", ROOT)) == errno.ENOENT
    nodes = await path_ino(ops, "/nodes")
    for name in (b"3", b"01", b"-1", b"x", b"\xff"):
        assert await errno_of(ops.lookup(nodes, name, ROOT)) == errno.ENOENT
    status = await path_ino(ops, "/status")
    assert await errno_of(ops.lookup(status, b"x", ROOT)) == errno.ENOTDIR
    assert await errno_of(ops.getattr(0xFE, ROOT)) == errno.ENOENT


async def test_every_file_renders_through_the_formats_parsers():
    ops, s = make()
    s.cluster.add_proc(Proc(4242, 1, 1000, 100, "sleep 100", 1732170000.5, gen=1))
    rows = formats.parse_status(await read_all(ops, "/status"))
    assert [(r.number, r.state, r.mode, r.user, r.group) for r in rows] == [
        (0, "up", 0o111, "root", "root"), (1, "up", 0o111, "root", "root"),
        (2, "down", 0o111, "root", "root")]
    assert formats.parse_node_state(await read_all(ops, "/nodes/2/status")) == "down"
    info = formats.parse_info(await read_all(ops, "/nodes/1/info"))
    assert info.address == "a" and info.procs == 1
    assert formats.parse_pids(await read_all(ops, "/nodes/1/procs")) == [4242]
    p = formats.parse_proc_status(await read_all(ops, "/procs/4242/status"))
    assert (p.pid, p.node, p.cmd, p.uid) == (4242, 1, "sleep 100", 1000)
    assert formats.parse_word(await read_all(ops, "/procs/4242/node")) == "1"


async def test_size_is_content_length_and_modes():
    ops, _ = make()
    for path in ("/status", "/nodes/0/status", "/nodes/0/info", "/nodes/0/procs"):
        attr = await ops.getattr(await path_ino(ops, path), ROOT)
        assert attr.st_size == len((await read_all(ops, path)).encode())
        assert stat.S_IMODE(attr.st_mode) == 0o444
    ctl = await ops.getattr(await path_ino(ops, "/nodes/0/ctl"), ROOT)
    assert stat.S_IMODE(ctl.st_mode) == 0o666
    d = await ops.getattr(await path_ino(ops, "/nodes/0"), ROOT)
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o111


async def test_stale_proc_inode_is_enoent_after_pid_reuse():
    ops, s = make()
    s.cluster.add_proc(Proc(50, 0, 0, 0, "a", 1.0, gen=1))
    old = await path_ino(ops, "/procs/50/status")
    s.cluster.add_proc(Proc(50, 0, 0, 0, "b", 2.0, gen=2))
    assert await errno_of(ops.getattr(old, ROOT)) == errno.ENOENT
    assert (await ops.getattr(await path_ino(ops, "/procs/50/status"), ROOT)).st_ino != old


async def test_read_only_files_refuse_writing():
    ops, _ = make()
    for path in ("/status", "/events", "/nodes/0/status", "/nodes/0/info"):
        ino = await path_ino(ops, path)
        assert await errno_of(ops.open(ino, os.O_WRONLY, ROOT)) == errno.EACCES
        assert await ops.access(ino, os.W_OK, ROOT) is False
        assert await ops.access(ino, os.R_OK, ALICE) is True
    assert await errno_of(ops.open(await path_ino(ops, "/nodes"), os.O_RDONLY, ROOT)) == errno.EISDIR


async def test_ctl_write_result_and_error_text():
    ops, s = make()
    fi = await ops.open(await path_ino(ops, "/nodes/0/ctl"), os.O_RDWR, ROOT)
    assert await ops.read(fi.fh, 0, 100) == b""
    assert await ops.write(fi.fh, 0, b"state error\n") == 12
    assert await ops.read(fi.fh, 0, 100) == b"ok\n"
    assert s.cluster.node(0).state == "error"
    assert await errno_of(ops.write(fi.fh, 0, b"frobnicate")) == errno.EINVAL
    assert await ops.read(fi.fh, 0, 100) == b"unknown control message 'frobnicate'\n"
    assert await errno_of(ops.write(fi.fh, 0, b"\xff\x00")) == errno.EINVAL
    await ops.release(fi.fh)


async def test_ctl_uses_the_openers_credentials():
    ops, s = make()
    fi = await ops.open(await path_ino(ops, "/nodes/0/ctl"), os.O_WRONLY, ALICE)
    assert await errno_of(ops.write(fi.fh, 0, b"reboot")) == errno.EPERM
    assert s.sent == []
    await ops.release(fi.fh)


async def test_ctl_truncate_is_accepted():
    ops, _ = make()
    ino = await path_ino(ops, "/nodes/0/ctl")
    await ops.setattr(ino, pyfuse3.EntryAttributes(), Fields(update_size=True), None, ROOT)
    status = await path_ino(ops, "/nodes/0/status")
    assert await errno_of(ops.setattr(status, pyfuse3.EntryAttributes(), Fields(update_size=True),
                                      None, ROOT)) == errno.EACCES


def attrs(mode: int = 0, uid: int = 0, gid: int = 0) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_mode, a.st_uid, a.st_gid = stat.S_IFDIR | mode, uid, gid
    return a


async def test_chmod_chown_through_setattr():
    ops, s = make()
    ino = await path_ino(ops, "/nodes/1")
    a = await ops.setattr(ino, attrs(0o755), Fields(update_mode=True), None, ROOT)
    assert stat.S_IMODE(a.st_mode) == 0o111
    a = await ops.setattr(ino, attrs(0, 1000, 100), Fields(update_uid=True, update_gid=True), None, ROOT)
    assert (a.st_uid, a.st_gid) == (1000, 100)
    a = await ops.setattr(ino, attrs(0o100), Fields(update_mode=True), None, ALICE)
    assert stat.S_IMODE(a.st_mode) == 0o100
    assert s.persisted == 3
    assert await errno_of(ops.setattr(ino, attrs(0, 1001), Fields(update_uid=True), None, ALICE)) == errno.EPERM
    assert await errno_of(ops.setattr(ino, attrs(0, 0, 4242), Fields(update_gid=True), None, ALICE)) == errno.EPERM
    down = await path_ino(ops, "/nodes/2")
    assert await errno_of(ops.setattr(down, attrs(0o100), Fields(update_mode=True), None, ROOT)) == errno.EBUSY
    status = await path_ino(ops, "/nodes/1/status")
    assert await errno_of(ops.setattr(status, attrs(0o777), Fields(update_mode=True), None, ROOT)) == errno.EPERM
    # time updates (touch) change nothing and do not fail
    await ops.setattr(ino, attrs(), Fields(update_atime=True, update_mtime=True), None, ALICE)


async def test_events_block_until_news_then_return_lines():
    ops, s = make()
    fi = await ops.open(await path_ino(ops, "/events"), os.O_RDONLY, Ctx(pid=os.getpid()))
    assert fi.nonseekable and fi.direct_io
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        async def reader() -> None:
            got.append(await ops.read(fi.fh, 0, 65536))
        nursery.start_soon(reader)
        await trio.sleep(0.3)
        assert got == []                       # nothing new: still blocked
        s.cluster.chmod(0, 0o100, Caller(0, 0))
    events = formats.parse_events(got[0].decode())
    assert [(e.id, e.what, e.detail) for e in events] == [(0, "mode", "0100")]
    await ops.release(fi.fh)


async def test_events_reads_split_long_news_by_size():
    ops, s = make()
    fi = await ops.open(await path_ino(ops, "/events"), os.O_RDONLY, ROOT)
    s.cluster.detach(0)
    s.cluster.detach(1)
    first = await ops.read(fi.fh, 0, 10)
    rest = await ops.read(fi.fh, 0, 65536)
    assert len(first) == 10
    assert [e.id for e in formats.parse_events((first + rest).decode())] == [0, 1]


async def test_events_nonblocking_is_eagain():
    ops, _ = make()
    fi = await ops.open(await path_ino(ops, "/events"), os.O_RDONLY | os.O_NONBLOCK, ROOT)
    assert await errno_of(ops.read(fi.fh, 0, 100)) == errno.EAGAIN


@contextlib.contextmanager
def stopped_with_sigterm_pending() -> Iterator[int]:
    """The pid of a stopped `sleep` with a SIGTERM pending (it stays pending while stopped):
    a reader that a signal will kill, whose blocked reads must answer EINTR."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.1)
        os.kill(child.pid, signal.SIGTERM)
        time.sleep(0.1)
        yield child.pid
    finally:
        child.kill()
        child.wait()


async def test_events_reader_with_a_pending_signal_gets_eintr():
    with stopped_with_sigterm_pending() as pid:
        assert procfs.interrupting_signal(pid)
        ops, _ = make()
        fi = await ops.open(await path_ino(ops, "/events"), os.O_RDONLY, Ctx(pid=pid))
        with trio.fail_after(5):
            assert await errno_of(ops.read(fi.fh, 0, 100)) == errno.EINTR


def test_procfs_quiet_signals_do_not_interrupt():
    child = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)
        assert not procfs.interrupting_signal(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.1)
        os.kill(child.pid, signal.SIGTSTP)     # a stop signal: not a reason to fail a read
        time.sleep(0.1)
        assert not procfs.interrupting_signal(child.pid)
        assert not procfs.interrupting_signal(2**30)   # no such task
    finally:
        child.kill()
        child.wait()


async def test_poll_on_events():
    ops, s = make()
    ino = await path_ino(ops, "/events")
    fi = await ops.open(ino, os.O_RDONLY, ROOT)
    assert await ops.poll(ino, fi.fh, None, ROOT) == 0
    s.cluster.detach(0)
    assert await ops.poll(ino, fi.fh, None, ROOT) != 0


class PollHandle:
    """Stands for pyfuse3's poll handle: the kernel's poller, woken by notify()."""

    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


@pytest.mark.parametrize("path", ["/events", "/procs/77/stdout"])
async def test_a_poller_is_woken_once_by_news(path):
    ops, s = make()
    out = with_output(ops)
    news = {"/events": lambda n: s.cluster.detach(n),
            "/procs/77/stdout": lambda n: out.append("stdout", b"%d" % n)}[path]
    ino = await path_ino(ops, path)
    fi = await ops.open(ino, os.O_RDONLY, ROOT)
    ph = PollHandle()
    assert await ops.poll(ino, fi.fh, ph, ROOT) == 0
    news(0)
    news(1)
    assert ph.notified == 1                     # once: the kernel polls again to wait more
    assert await ops.poll(ino, fi.fh, None, ROOT) == select.POLLIN


async def test_internal_errors_become_eio_and_are_logged(caplog):
    ops, s = make()

    def boom(*a):
        raise RuntimeError("bug")
    s.cluster.node = boom  # type: ignore[method-assign]
    ino = Ino(Kind.NODE_STATUS, 0).encode()
    assert await errno_of(ops.getattr(ino, ROOT)) == errno.EIO
    assert "internal error" in caplog.text


async def test_the_tree_cannot_be_changed_by_name_operations():
    ops, _ = make()
    root = pyfuse3.ROOT_INODE
    assert await errno_of(ops.mkdir(root, b"x", 0o755, ROOT)) == errno.EACCES
    assert await errno_of(ops.create(root, b"x", 0o644, os.O_WRONLY, ROOT)) == errno.EACCES
    assert await errno_of(ops.unlink(root, b"status", ROOT)) == errno.EACCES
    assert await errno_of(ops.rename(root, b"status", root, b"s", 0, ROOT)) == errno.EACCES


def with_output(ops: BpfsOperations, pid: int = 77, uid: int = 1000) -> ProcOutput:
    out = ProcOutput(capacity=16, notify=ops.cluster.output_changed)
    ops.cluster.start_proc(pid, 1, uid, 100, "x", 1.0, output=out)
    return out


async def test_output_files_exist_only_for_processes_that_keep_output():
    ops, _ = make()
    ops.cluster.start_proc(76, 1, 1000, 100, "sleep", 1.0)
    with_output(ops)
    assert await listdir(ops, "/procs/76") == ["status", "stat", "node", "signal", "ctl"]
    assert await errno_of(ops.lookup(await path_ino(ops, "/procs/76"), b"stdout", ROOT)) \
        == errno.ENOENT
    assert await listdir(ops, "/procs/77") == [
        "status", "stat", "node", "signal", "ctl", "stdout", "stderr"]
    attr = await ops.getattr(await path_ino(ops, "/procs/77/stdout"), ROOT)
    assert (stat.S_IMODE(attr.st_mode), attr.st_uid) == (0o400, 1000)


async def test_output_is_the_owners_and_roots_only():
    ops, _ = make()
    with_output(ops)
    ino = await path_ino(ops, "/procs/77/stderr")
    assert await errno_of(ops.open(ino, os.O_RDONLY, Ctx(1001, 100))) == errno.EACCES
    assert await errno_of(ops.open(ino, os.O_WRONLY, ROOT)) == errno.EACCES
    for ctx in (ALICE, ROOT):
        await ops.release((await ops.open(ino, os.O_RDONLY, ctx)).fh)


async def test_output_reads_block_like_a_pipe_until_eof():
    ops, _ = make()
    out = with_output(ops)
    ino = await path_ino(ops, "/procs/77/stdout")
    fi = await ops.open(ino, os.O_RDONLY, Ctx(pid=os.getpid()))
    assert fi.nonseekable and await ops.poll(ino, fi.fh, None, ROOT) == 0
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        async def reader() -> None:
            while chunk := await ops.read(fi.fh, 0, 4):
                got.append(chunk)
        nursery.start_soon(reader)
        await trio.sleep(0.1)
        out.append("stdout", b"hello\n")
        await trio.sleep(0.1)
        assert b"".join(got) == b"hello\n"
        ops.cluster.exited(77, 0, None)          # ended, but the link still open
        await trio.sleep(0.1)
        assert nursery.child_tasks
        out.append("stdout", b"late\n")
        out.link_over("stdout")
    assert b"".join(got) == b"hello\nlate\n"
    assert out.streams["stdout"].eof_read and not out.all_read
    assert await ops.poll(ino, fi.fh, None, ROOT) != 0
    ops.cluster.remove_proc(77)                  # an open handle still reads (EOF)
    assert await ops.read(fi.fh, 0, 100) == b""
    await ops.release(fi.fh)


async def test_output_beyond_the_ring_is_dropped_oldest_first():
    ops, _ = make()
    out = with_output(ops)                       # 16 bytes kept per stream
    fi = await ops.open(await path_ino(ops, "/procs/77/stdout"), os.O_RDONLY, ROOT)
    out.append("stdout", b"0123456789")
    assert await ops.read(fi.fh, 0, 4) == b"0123"
    out.append("stdout", b"abcdefghijklmnop")     # the reader was at 4; 10 were dropped
    assert await ops.read(fi.fh, 0, 100) == b"abcdefghijklmnop"
    fi2 = await ops.open(await path_ino(ops, "/procs/77/stdout"), os.O_RDONLY | os.O_NONBLOCK,
                         ROOT)
    assert await ops.read(fi2.fh, 0, 100) == b"abcdefghijklmnop"
    assert await errno_of(ops.read(fi2.fh, 0, 100)) == errno.EAGAIN


async def test_output_reader_with_a_pending_signal_gets_eintr():
    with stopped_with_sigterm_pending() as pid:
        ops, _ = make()
        with_output(ops)
        fi = await ops.open(await path_ino(ops, "/procs/77/stderr"), os.O_RDONLY, Ctx(pid=pid))
        with trio.fail_after(5):
            assert await errno_of(ops.read(fi.fh, 0, 100)) == errno.EINTR


async def test_proc_generations_wrap_within_what_an_inode_holds():
    from bpfs.model import PROC_GENERATIONS
    ops, s = make()
    s.cluster._proc_serial = PROC_GENERATIONS - 2
    s.cluster.start_proc(60, 0, 0, 0, "a", 1.0)
    s.cluster.start_proc(61, 0, 0, 0, "b", 1.0)       # generation 2**24 before: ENOENT
    assert [s.cluster.proc(p).gen for p in (60, 61)] == [PROC_GENERATIONS - 1, 1]
    for pid in (60, 61):
        ino = await path_ino(ops, f"/procs/{pid}/status")
        assert (await ops.getattr(ino, ROOT)).st_ino == ino


async def test_a_procs_ctl_write_stops_at_a_command_for_a_reused_pid():
    """`stop` waits (a message to the node); the pid is another process's when `cont`
    comes: ESRCH, and nothing is sent for it."""
    ops, s = make()
    s.cluster.start_proc(70, 1, 1000, 100, "old", 1.0)
    sent = s.signal_proc

    async def signal_then_reuse(pid: int, sig: int) -> None:
        await sent(pid, sig)
        s.cluster.exited(pid, 0, None)
        s.cluster.start_proc(pid, 1, 1000, 100, "new", 2.0)
    s.signal_proc = signal_then_reuse
    fi = await ops.open(await path_ino(ops, "/procs/70/ctl"), os.O_WRONLY, ALICE)
    assert await errno_of(ops.write(fi.fh, 0, b"stop\ncont\n")) == errno.ESRCH
    assert [m["sig"] for _, m in s.sent] == [signal.SIGSTOP]
    await ops.release(fi.fh)


async def test_ctl_handles_pin_their_openers_and_release_them(monkeypatch):
    import bpfs.fs.ops as ops_module
    monkeypatch.setattr(ops_module, "MAX_PINS_PER_UID", 3)
    ops, s = make()
    assert ops_module.pin_limit() == 3
    ctl = await path_ino(ops, "/nodes/0/ctl")
    FakePin.open.clear()
    ro = await ops.open(ctl, os.O_RDONLY, ALICE)             # cannot write: no pin
    assert not FakePin.open
    fhs = [(await ops.open(ctl, os.O_WRONLY, ALICE)).fh for _ in range(3)]
    assert len(FakePin.open) == 3
    assert await errno_of(ops.open(ctl, os.O_WRONLY, ALICE)) == errno.EMFILE
    root = (await ops.open(ctl, os.O_WRONLY, ROOT)).fh        # root is not bounded
    await ops.release(fhs.pop())
    fhs.append((await ops.open(ctl, os.O_WRONLY, ALICE)).fh)
    for fh in [*fhs, root, ro.fh]:
        await ops.release(fh)
    assert not FakePin.open and not ops._pins


def test_pins_take_at_most_an_eighth_of_the_masters_descriptors(monkeypatch):
    import resource

    import bpfs.fs.ops as ops_module
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1024, 4096))
    assert ops_module.pin_limit() == 128
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY,) * 2)
    assert ops_module.pin_limit() == ops_module.MAX_PINS_PER_UID


async def test_refused_ctl_writes_are_logged_with_the_reason_but_not_flooded(caplog):
    """FUSE carries only the errno back to the writer: the master's log says why."""
    caplog.set_level(logging.INFO, logger="bpfs.fs")
    ops, s = make()
    fi = await ops.open(await path_ino(ops, "/nodes/0/ctl"), os.O_WRONLY, ALICE)
    assert await errno_of(ops.write(fi.fh, 0, b"reboot")) == errno.EPERM
    assert await errno_of(ops.write(fi.fh, 0, b"x" * 5000)) == errno.EINVAL
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"nodes/0/ctl: write by uid {ALICE.uid}") and "EPERM" in lines[0]
    assert "EINVAL" in lines[1] and "4096" in lines[1]
    for _ in range(100):
        await errno_of(ops.write(fi.fh, 0, b"frobnicate"))
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == RefusalLog.BURST + 1
    assert "more than 10 refused ctl writes" in lines[-1] and "counting the rest" in lines[-1]
    await ops.release(fi.fh)

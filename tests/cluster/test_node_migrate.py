"""The node side of migration: a real bpslave (own PID and mount namespaces) restores real
images, against a fake master (the real wire protocol) and the test acting as bpsh.

Images come from `bpfs.migrate.launch` + `dump` in this process (the program is then killed
here); their PID is free in the node's fresh PID namespace, and the node must give it to the
restored process. The test plays bpsh: a listening socket that takes the node's stdio links
(`bpfs.wire.execreq` header with this run's token) and the program's output.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trio

from bpfs import migrate
from bpfs.migrate.filecache import hash_bytes
from bpfs.wire import execreq, framing as wire
from tests.cluster.test_node import Conn, FakeMaster, children, make_key, start_node, stop

pytestmark = pytest.mark.timeout(60)

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C", "HOME": "/"}


def make_image(argv: list[str], cwd: str = "/") -> tuple[bytes, migrate.Image]:
    """Start argv here, stopped at its entry point; dump it; kill it. (bytes, image)."""
    pid = migrate.launch(argv, ENV, cwd)
    try:
        img = migrate.dump.dump(pid)
    finally:
        migrate.kill(pid)
    return migrate.dumps(img), img


class FakeBpsh:
    """bpsh's listening end: keeps each link whose header carries our token, by (pid, fd)."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.port = 0
        self.links: dict[tuple[int, int], trio.SocketStream] = {}
        self.errors: list[execreq.Header] = []
        self.changed = trio.Event()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._accept, listeners)

    async def _accept(self, stream: trio.SocketStream) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < execreq.HEADER_MAX:
            chunk = await stream.receive_some(1)
            if not chunk:
                break
            line += chunk
        header = execreq.parse_header(line, self.token)
        if header is None:
            await stream.aclose()
            return
        if header.fd < 0:
            self.errors.append(header)
        else:
            self.links[header.pid, header.fd] = stream
        self.changed.set()
        self.changed = trio.Event()
        await trio.sleep_forever()              # the test reads and closes the link

    async def link(self, pid: int, fd: int, timeout: float = 10) -> trio.SocketStream:
        with trio.fail_after(timeout):
            while (pid, fd) not in self.links:
                await self.changed.wait()
        return self.links[pid, fd]

    async def read_all(self, pid: int, fd: int, timeout: float = 10) -> bytes:
        stream = await self.link(pid, fd, timeout)
        data = b""
        with trio.fail_after(timeout):
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data


@dataclass
class NodeUnderTest:
    conn: Conn
    bpsh: FakeBpsh
    daemon: int
    log: Path
    ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 1000)))

    def request(self, image: bytes, io: tuple[str, str, str] = ("socket",) * 3, uid: int = 0,
                gid: int = 0, groups: tuple[int, ...] = ()) -> dict[str, Any]:
        return {"t": "restore", "id": next(self.ids), "image": image, "uid": uid, "gid": gid,
                "groups": list(groups), "io": list(io), "port": self.bpsh.port,
                "token": self.bpsh.token}

    async def restore(self, image: bytes, **kw: Any) -> wire.Message:
        """Send a restore; the node's `restored` or `failed` for it."""
        req = self.request(image, **kw)
        await self.conn.fs.send(req)
        return await self.wait(lambda m: m["t"] in ("restored", "failed")
                               and m["id"] == req["id"])

    async def run(self, argv: list[str], **kw: Any) -> tuple[migrate.Image, wire.Message]:
        data, img = make_image(argv)
        reply = await self.restore(data, **kw)
        assert reply["t"] == "restored", reply
        assert reply["pid"] == img.pid
        return img, reply

    async def exited(self, pid: int, timeout: float = 10) -> wire.Message:
        return await self.wait(lambda m: m["t"] == "exited" and m["pid"] == pid, timeout)

    async def wait(self, pred: Callable[[wire.Message], bool], timeout: float = 10
                   ) -> wire.Message:
        with trio.fail_after(timeout):
            while True:
                for m in self.conn.inbox:
                    if pred(m):
                        return m
                if self.conn.closed.is_set():
                    raise AssertionError("the node hung up")
                self.conn.changed = trio.Event()
                await self.conn.changed.wait()

    def held(self) -> list[int]:
        """Host PIDs of what the daemon holds (its children but the restore helper)."""
        return children(self.daemon)


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.fixture
async def node(tmp_path: Path, nursery: trio.Nursery) -> NodeUnderTest:
    fm = FakeMaster(make_key(tmp_path / "key"), heartbeat=0.1)
    await nursery.start(fm.serve)
    bpsh = FakeBpsh()
    await nursery.start(bpsh.serve)
    proc = await start_node(tmp_path, fm.port, tmp_path / "key", "--node", "1", "-r", "-vv")
    try:
        conn = await fm.next_conn()
        with trio.fail_after(10):
            await conn.wait_for("state")
        (daemon,) = children(proc.pid)
        n = NodeUnderTest(conn, bpsh, daemon, tmp_path / "node-0.log")
        n.master = fm   # type: ignore[attr-defined]
        yield n
    finally:
        await stop(proc)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A sticky world-writable directory (as /tmp) that test users can reach."""
    d = Path(tempfile.mkdtemp(prefix="bpfs-nodemig-"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- tests -------------------------------------------------------------------------------

async def test_echo_output_comes_back_and_exit_is_reported(node):
    img, _ = await node.run(["/bin/echo", "hello"])
    assert await node.bpsh.read_all(img.pid, 1) == b"hello\n"
    assert await node.bpsh.read_all(img.pid, 2) == b""
    ex = await node.exited(img.pid)
    assert (ex["code"], ex["signal"]) == (0, None)
    await node.bpsh.link(img.pid, 0)               # stdin was linked too
    assert re.search(r"restore 1: pid \d+ \(echo\) as uid 0: [\d.]+ ms on the node",
                     node.log.read_text())


async def test_process_has_the_images_pid(node):
    img, _ = await node.run(["/bin/sh", "-c", "echo $$; cat /proc/$PPID/comm"])
    # its parent is its job's keeper (a session of its own), not the daemon
    assert (await node.bpsh.read_all(img.pid, 1)).split() == [str(img.pid).encode(),
                                                              b"bpfs-job"]
    assert (await node.exited(img.pid))["code"] == 0


async def test_exit_code_and_null_io(node):
    img, _ = await node.run(["/bin/sh", "-c", "cat; echo out; echo err >&2; exit 3"],
                            io=("null", "null", "null"))
    ex = await node.exited(img.pid)
    assert (ex["code"], ex["signal"]) == (3, None)
    assert not node.bpsh.links                     # nothing was linked
    img, _ = await node.run(["/bin/false"], io=("null", "socket", "null"))
    assert await node.bpsh.read_all(img.pid, 1) == b""
    assert (await node.exited(img.pid))["code"] == 1


async def test_signal_is_forwarded_and_death_by_signal_reported(node):
    data, img = make_image(["/bin/sleep", "100"])
    assert (await node.restore(data, io=("null", "null", "null")))["t"] == "restored"
    again = await node.restore(data, io=("null", "null", "null"))     # its PID is taken
    assert (again["t"], again["errno"]) == ("failed", errno.EEXIST)
    await node.conn.fs.send({"t": "signal", "pid": 999999, "sig": 9})   # not ours: ignored
    await trio.sleep(0.2)
    assert not [m for m in node.conn.inbox if m["t"] == "exited"]
    await node.conn.fs.send({"t": "signal", "pid": img.pid, "sig": signal.SIGKILL})
    ex = await node.exited(img.pid)
    assert (ex["code"], ex["signal"]) == (None, signal.SIGKILL)


async def test_stdin_through_the_link(node):
    img, _ = await node.run(["/bin/cat"])
    stdin = await node.bpsh.link(img.pid, 0)
    data = b"".join(b"line %d of the input\n" % i for i in range(5000))
    async with trio.open_nursery() as n:
        async def feed() -> None:
            await stdin.send_all(data)
            await stdin.send_eof()
        n.start_soon(feed)
        assert await node.bpsh.read_all(img.pid, 1) == data
    assert (await node.exited(img.pid))["code"] == 0


async def test_file_io_on_the_node(node, shared_dir):
    src, out = shared_dir / "in.txt", shared_dir / "out.txt"
    src.write_text("abc\n")
    img, _ = await node.run(["/bin/sh", "-c", "tr a-z A-Z; echo done >&2"],
                            io=(f"file:{src}", f"file:{out}", f"file:{out}"))
    assert (await node.exited(img.pid))["code"] == 0
    assert out.read_text() == "ABC\ndone\n"                 # one shared file description
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~img.umask
    missing = shared_dir / "nope" / "x"
    data, _ = make_image(["/bin/true"])
    reply = await node.restore(data, io=("null", f"file:{missing}", "socket"))
    assert (reply["t"], reply["errno"]) == ("failed", errno.ENOENT)
    assert str(missing) in reply["message"]


def images_of_a_copy(tmp_path: Path, *args: list[str]
                     ) -> tuple[bytes, list[tuple[bytes, migrate.Image]]]:
    """A copy of /bin/echo at a path the node will not have (gone once dumped): its
    content, and an image of it per argument list."""
    prog = tmp_path / "echo-copy"
    shutil.copy("/bin/echo", prog)
    content = prog.read_bytes()
    images = [make_image([str(prog), *a]) for a in args]
    prog.unlink()
    return content, images


async def test_missing_file_content_is_asked_for_and_cached(node, tmp_path):
    content, images = images_of_a_copy(tmp_path, *(["copy", str(i)] for i in range(3)))
    want = hash_bytes(content)

    facts_before = len(node.conn.inbox)
    req = node.request(images[0][0])
    await node.conn.fs.send(req)
    need = await node.wait(lambda m: m["t"] == "need")
    assert (need["id"], need["hashes"]) == (req["id"], [want])
    await trio.sleep(0.5)          # the node keeps heart-beating while it waits
    assert sum(m["t"] == "facts" for m in node.conn.inbox[facts_before:]) >= 3
    await node.conn.fs.send({"t": "files", "id": req["id"], "contents": {want: b"forged"}})
    bad = await node.wait(lambda m: m["t"] == "failed" and m["id"] == req["id"])
    assert bad["errno"] == errno.EINVAL

    req = node.request(images[1][0])
    await node.conn.fs.send(req)
    need = await node.wait(lambda m: m["t"] == "need" and m["id"] == req["id"])
    await node.conn.fs.send({"t": "files", "id": req["id"], "contents": {want: content}})
    await node.wait(lambda m: m["t"] == "restored" and m["id"] == req["id"])
    assert await node.bpsh.read_all(images[1][1].pid, 1) == b"copy 1\n"

    needs = sum(m["t"] == "need" for m in node.conn.inbox)
    reply = await node.restore(images[2][0])       # the node cached the content: no need
    assert reply["t"] == "restored"
    assert await node.bpsh.read_all(images[2][1].pid, 1) == b"copy 2\n"
    assert sum(m["t"] == "need" for m in node.conn.inbox) == needs


async def test_corrupt_image_fails_with_einval_and_nothing_runs(node):
    data, img = make_image(["/bin/echo", "never"])
    for bad in (b"not an image", data[: len(data) // 2]):
        reply = await node.restore(bad)
        assert (reply["t"], reply["errno"]) == ("failed", errno.EINVAL)
        assert "corrupt image" in reply["message"]
    # fields that fit the `Restore` class but not a restore (a malformed one ends the session:
    # tests/hostile/test_hostile_peer.py)
    reply = await node.restore(data, io=("null", "tty", "null"))
    assert (reply["t"], reply["errno"]) == ("failed", errno.EINVAL)
    assert "bad stdio spec 'tty'" in reply["message"]
    assert not node.held() and not node.bpsh.links


@pytest.mark.parametrize("with_pid", [False, True])
async def test_unreachable_bpsh_fails_and_nothing_runs(node, with_pid):
    """Without a PID the image is loaded first (a task); with one (our master's way) the
    handler connects and restores at once: both fail the same way."""
    data, img = make_image(["/bin/echo", "never"])
    req = node.request(data)
    if with_pid:
        req["pid"] = img.pid
    with trio.socket.socket() as s:                 # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        req["port"] = s.getsockname()[1]
    await node.conn.fs.send(req)
    reply = await node.wait(lambda m: m["t"] == "failed" and m["id"] == req["id"])
    assert reply["errno"] == errno.ECONNREFUSED
    assert not node.held()
    img2, _ = await node.run(["/bin/echo", "after"])       # the node still restores
    assert await node.bpsh.read_all(img2.pid, 1) == b"after\n"


async def test_with_the_pid_the_handler_restores_or_a_task_fetches_files_first(node, tmp_path):
    """The master's way (pid given): restored by the handler; or, when the node lacks a
    file's content, `need` first and the restore finished after `files`."""
    data, img = make_image(["/bin/echo", "quick"])
    req = node.request(data)
    req["pid"] = img.pid
    await node.conn.fs.send(req)
    reply = await node.wait(lambda m: m["t"] in ("restored", "failed") and m["id"] == req["id"])
    assert (reply["t"], reply["pid"]) == ("restored", img.pid)
    assert await node.bpsh.read_all(img.pid, 1) == b"quick\n"
    assert (await node.exited(img.pid))["code"] == 0

    content, [(data, img)] = images_of_a_copy(tmp_path, ["fetched"])
    req = node.request(data)
    req["pid"] = img.pid
    await node.conn.fs.send(req)
    need = await node.wait(lambda m: m["t"] == "need" and m["id"] == req["id"])
    assert need["hashes"] == [hash_bytes(content)]
    await node.conn.fs.send({"t": "files", "id": req["id"],
                             "contents": {hash_bytes(content): content}})
    reply = await node.wait(lambda m: m["t"] in ("restored", "failed") and m["id"] == req["id"])
    assert (reply["t"], reply["pid"]) == ("restored", img.pid)
    assert await node.bpsh.read_all(img.pid, 1) == b"fetched\n"


async def test_restore_runs_as_the_user(node, users, shared_dir):
    alice = users["alice"]
    img, _ = await node.run(["/usr/bin/id"], uid=alice.uid, gid=alice.gid, groups=alice.groups)
    out = (await node.bpsh.read_all(img.pid, 1)).decode()
    assert f"uid={alice.uid}(" in out and f"gid={alice.gid}(" in out
    assert (await node.exited(img.pid))["code"] == 0

    mine = shared_dir / "alice.txt"              # she may create files where she may write
    img, _ = await node.run(["/bin/echo", "hi"], uid=alice.uid, gid=alice.gid,
                            io=("null", f"file:{mine}", "null"))
    assert (await node.exited(img.pid))["code"] == 0
    assert (mine.read_text(), mine.stat().st_uid) == ("hi\n", alice.uid)

    roots = shared_dir / "root.txt"              # ...but never write a file root owns
    roots.write_text("root's\n")
    roots.chmod(0o644)
    data, _ = make_image(["/bin/echo", "overwritten"])
    reply = await node.restore(data, uid=alice.uid, gid=alice.gid,
                               io=("null", f"file:{roots}", "socket"))
    assert (reply["t"], reply["errno"]) == ("failed", errno.EACCES)
    assert roots.read_text() == "root's\n"
    img, _ = await node.run(["/bin/echo", "root"], io=("null", f"file:{roots}", "null"))
    assert (await node.exited(img.pid))["code"] == 0      # root's own restore still can
    assert roots.read_text() == "root\n"


async def test_lost_master_kills_the_restored_processes(node):
    img, _ = await node.run(["/bin/sleep", "100"], io=("null", "null", "null"))
    (held,) = node.held()
    await node.conn.fs.aclose()                        # the master drops the node
    with trio.fail_after(5):
        while Path(f"/proc/{held}").exists():
            await trio.sleep(0.05)
    node.conn = await node.master.next_conn()          # -r: it comes back...
    await node.conn.wait_for("state")
    img2, _ = await node.run(["/bin/echo", "again"])   # ...and restores with a fresh helper
    assert await node.bpsh.read_all(img2.pid, 1) == b"again\n"
    assert (await node.exited(img2.pid))["code"] == 0
    assert not [m for m in node.conn.inbox if m["t"] == "exited" and m["pid"] == img.pid]

"""`exec` on nodes/N/ctl as the master does it, with a fake node (no node daemon, no restore).

The writer (a root Python process) writes `exec ...` to nodes/N/ctl; the master forks
the child, seizes it, captures its exec and sends `restore` to the fake node, which
plays the node: it connects the stdio links to the master's endpoint itself, answers
`restored` or `failed`, and reports `exited`. So these tests hold the master's side:
the link protocol and its refusals, the bounded output, the ghost whose parent is the
master (reaped by the tracer, no zombie), failures reaching the write's errno, and when
procs/PID goes (the sweeper, driven with explicit times).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from bpfs import formats
from bpfs.master.exec import LINGER, LINK_GRACE, READ_GRACE, ExecService, Record
from bpfs.model import Cluster
from bpfs.output import ProcOutput
from bpfs.wire import execreq
from tests.cluster.test_master import Master, fake_node, master, wait_for  # noqa: F401
from tests.cluster.test_master_procs import first_restore, messages, proc_state, read_events
from tests.conftest import CTL_WRITER

WRITER = CTL_WRITER


async def exec_ctl(m: Master, node: int, line: str) -> tuple[int, str]:
    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", WRITER, m.path(f"nodes/{node}/ctl"), line],
                              capture_output=True, text=True, timeout=60, cwd="/")
    r = await trio.to_thread.run_sync(run)
    assert r.returncode == 0, r.stderr
    err, _, text = r.stdout.strip().partition(" ")
    return int(err), text


async def link(port: int, header: bytes, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(header + data)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def at_eof(fd: int) -> bool:
    try:
        return os.read(fd, 100) == b""
    except BlockingIOError:
        return False


def master_children(m: Master) -> list[str]:
    assert m.proc is not None
    out = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "--ppid", str(m.proc.pid)],
                         capture_output=True, text=True).stdout.splitlines()
    return [line for line in out                # the daemon's own helpers aside
            if "doorbell" not in line and "bpfs-relayfork" not in line]


@asynccontextmanager
async def exec_started(master: Master, line: str) -> AsyncIterator[tuple]:
    """`line` written to a fake node 0's ctl, up to the restore the master sends it:
    (the node, the write's result once it returns, the restore message, the pid)."""
    async with fake_node(master) as node, trio.open_nursery() as nursery:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        result: list[tuple[int, str]] = []

        async def write() -> None:
            result.append(await exec_ctl(master, 0, line))
        nursery.start_soon(write)
        msg = await first_restore(node)
        [pid] = [int(p) for p in os.listdir(master.path("procs"))]
        yield node, result, msg, pid


async def test_exec_output_links_and_the_ghost_the_master_reaps(master: Master) -> None:
    async with exec_started(master, "exec -- sleep 30") as (node, result, msg, pid):
        assert msg["io"] == ["null", "socket", "socket"] and (msg["uid"], msg["gid"]) == (0, 0)
        port, token = msg["port"], msg["token"]
        assert proc_state(master, pid) == "starting"
        # links that are not this run's are closed
        for bad in (execreq.render_header("f" * 32, pid, 1),
                    execreq.render_header(token, pid + 1, 1),
                    execreq.render_header(token, pid, 0), b"garbage\n"):
            s = await trio.to_thread.run_sync(lambda: socket.create_connection(("127.0.0.1", port)))
            with s:
                s.sendall(bad)
                assert await trio.to_thread.run_sync(closed_by_peer, s), bad
        big = b"x" * (3 << 19)                                  # 1.5 MiB: 1 MiB is kept
        out = await link(port, execreq.render_header(token, pid, 1), big)
        err = await link(port, execreq.render_header(token, pid, 2), b"oops\n")
        err.close()
        try:
            await trio.sleep(0.3)
            assert not result, "the write returned before the node restored the process"
            await node.fs.send({"t": "restored", "id": msg["id"], "pid": pid})
            await wait_for(lambda: result, what="the exec write")
            assert result == [(0, f"ok {pid}")] and proc_state(master, pid) == "running"
            fd = os.open(master.path(f"procs/{pid}/stderr"), os.O_RDONLY | os.O_NONBLOCK)
            try:
                assert os.read(fd, 100) == b"oops\n"
                try:
                    os.read(fd, 100)
                    raise AssertionError("EOF while the process runs")
                except BlockingIOError:
                    pass
            finally:
                os.close(fd)
            # the real process ends: the ghost (the master's child) ends too, reaped
            await node.fs.send({"t": "exited", "pid": pid, "code": 5, "signal": None})
            await wait_for(lambda: not master_children(master), what="the ghost reaped")
            st = formats.parse_proc_status(master.read(f"procs/{pid}/status"))
            assert (st.state, st.exit) == ("exited", "5")
            with open(master.path(f"procs/{pid}/stderr"), "rb") as f:
                assert f.read() == b"oops\n"
            fd = os.open(master.path(f"procs/{pid}/stdout"), os.O_RDONLY | os.O_NONBLOCK)
            try:
                got = b""
                while len(got) < 1 << 20:
                    got += os.read(fd, 1 << 20)
                assert got == big[-(1 << 20):]
                try:                                             # link still open: no EOF
                    os.read(fd, 100)
                    raise AssertionError("EOF before the stdout link ended")
                except BlockingIOError:
                    pass
                out.close()
                await wait_for(lambda: at_eof(fd), what="EOF on stdout")
            finally:
                os.close(fd)
            await wait_for(lambda: not os.path.exists(master.path(f"procs/{pid}")),
                           what="procs/PID to go once read")
        finally:
            out.close()
    assert "Traceback" not in master.log()


async def test_a_failed_restore_is_the_writes_errno(master: Master) -> None:
    events = os.open(master.path("events"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with exec_started(master, "exec sleep 30") as (node, result, msg, pid):
            await node.fs.send({"t": "failed", "id": msg["id"], "errno": errno.ENOEXEC,
                                "message": "other kernel"})
            await wait_for(lambda: result, what="the exec write")
        assert result == [(errno.ENOEXEC, "other kernel")]
        assert os.listdir(master.path("procs")) == []
        got = [(e.what, e.detail) for e in read_events(events) if e.id == pid]
        assert got == [("start", "0"), ("exit", "failed ENOEXEC")]
        await wait_for(lambda: not master_children(master), what="the ghost reaped")
    finally:
        os.close(events)


async def test_a_node_lost_while_restoring_is_ehostdown(master: Master) -> None:
    result: list[tuple[int, str]] = []
    async with trio.open_nursery() as nursery:
        async with fake_node(master) as node:
            await wait_for(lambda: master.read("nodes/0/status") == "up\n")

            async def write() -> None:
                result.append(await exec_ctl(master, 0, "exec sleep 30"))
            nursery.start_soon(write)
            await first_restore(node)
        await wait_for(lambda: result, what="the exec write")
    assert result[0][0] == errno.EHOSTDOWN
    assert os.listdir(master.path("procs")) == []
    await wait_for(lambda: not master_children(master), what="the ghost reaped")


def test_the_sweeper_bounds_how_long_procs_pid_stays() -> None:
    """Driven with explicit times: link grace, read grace, linger."""
    c = Cluster(1)
    svc = ExecService(c, None, "/nonexistent")           # type: ignore[arg-type]

    def start(pid: int) -> tuple[ProcOutput, Record]:
        out = ProcOutput(notify=c.output_changed)
        c.start_proc(pid, 0, 0, 0, "x", 0.0, output=out)
        rec = Record(pid, f"t{pid}", out, live=True)
        svc._records[rec.token] = rec
        return out, rec

    out, rec = start(5)
    svc._sweep(rec, 0.0)
    assert 5 in c.procs and not out.ended                # running: it stays
    rec.links.add("stdout")
    c.exited(5, 0, None)
    svc._sweep(rec, 10.0)
    assert not any(r.closed for r in out.streams.values())
    svc._sweep(rec, 10.0 + LINK_GRACE)                   # stderr never connected: given up
    assert out.streams["stderr"].closed and not out.streams["stdout"].closed
    svc._sweep(rec, 10.0 + LINGER - 0.1)
    assert 5 in c.procs                                  # stdout's link still open
    svc._sweep(rec, 10.0 + LINGER)
    assert 5 not in c.procs and out.streams["stdout"].closed and not svc._records

    out, rec = start(6)
    c.exited(6, 0, None)
    for name in ("stdout", "stderr"):
        out.link_over(name)
        out.streams[name].eof_read = True
    svc._sweep(rec, 1.0)
    svc._sweep(rec, 1.0 + READ_GRACE - 0.1)
    assert 6 in c.procs                                  # read: a grace to read status
    svc._sweep(rec, 1.0 + READ_GRACE)
    assert 6 not in c.procs

    out, rec = start(7)
    c.start_proc(7, 0, 0, 0, "reused pid", 0.0)          # replaced: forgotten, not removed
    svc._sweep(rec, 1.0)
    assert c.procs[7].cmd == "reused pid" and not svc._records and out.streams["stdout"].closed

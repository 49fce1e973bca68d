"""Migrated processes as the master sees them, with fake nodes (no node daemon, no restore).

A writer (`sh -c 'echo execmove ... > ctl; exec sleep 30'`) asks for its next execve to be
migrated; the master seizes it, catches the exec and parks it as the ghost; the fake node
answers `restored`, `failed` or `exited` itself. So these tests hold the master's side of
migration: procs/PID files and their permissions, signal forwarding both ways, the ghost's end
status, the err header to bpsh, refusals of execmove, ghosts dying with their node.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
from typing import Any

import trio

from bpfs import formats
from tests.cluster.test_master import (Master, as_user, fake_node, master, wait_for,  # noqa: F401
                                       write_errno)

TOKEN = "0123456789abcdef0123456789abcdef"


def request(port: int = 1, io: str = "null") -> str:
    return (f"execmove --port {port} --token {TOKEN} --rank 0 --stdin {io} --stdout {io} "
            f"--stderr {io}")


def writer(m: Master, node: int, req: str, prog: str = "exec sleep 30") -> subprocess.Popen:
    """A shell that writes `req` to nodes/N/ctl itself (a builtin echo) and then execs."""
    ctl = m.path(f"nodes/{node}/ctl")
    return subprocess.Popen(["sh", "-c", f"echo '{req}' > {ctl} || exit 99; {prog}"])


def messages(node: Any, kind: str) -> list[dict[str, Any]]:
    return [msg for msg in node.received if msg["t"] == kind]


async def first_restore(node: Any) -> dict[str, Any]:
    """The first `restore` the fake node received, once it has come."""
    await wait_for(lambda: messages(node, "restore"), what="restore")
    return messages(node, "restore")[0]


async def restored(m: Master, node: Any, proc: subprocess.Popen) -> dict[str, Any]:
    """Wait for the `restore` of `proc` (the node's next one), answer `restored`, wait for
    procs/PID."""
    seen = getattr(node, "answered", 0)
    await wait_for(lambda: len(messages(node, "restore")) > seen or proc.poll() is not None,
                   what="restore")
    assert proc.poll() is None, f"writer exited {proc.returncode}"
    msg = messages(node, "restore")[seen]
    node.answered = seen + 1
    await node.fs.send({"t": "restored", "id": msg["id"], "pid": proc.pid})
    await wait_for(lambda: proc_state(m, proc.pid) == "running", what="procs/PID running")
    return msg


def proc_state(m: Master, pid: int) -> str | None:
    try:
        return formats.parse_proc_status(m.read(f"procs/{pid}/status")).state
    except FileNotFoundError:
        return None


async def wait_exit(proc: subprocess.Popen, timeout: float = 10) -> int:
    with trio.fail_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.02)
    return proc.returncode


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


async def test_restored_process_files_signals_and_exit_status(master: Master, users) -> None:
    bob = users["bob"]
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        proc = writer(master, 0, request())
        try:
            msg = await restored(master, node, proc)
            assert (msg["uid"], msg["gid"], msg["io"]) == (0, 0, ["null"] * 3)
            assert msg["token"] == TOKEN and isinstance(msg["image"], (bytes, memoryview))
            d = master.path(f"procs/{proc.pid}")
            st = formats.parse_proc_status(master.read(f"procs/{proc.pid}/status"))
            assert (st.pid, st.node, st.state, st.cmd, st.exit) == (proc.pid, 0, "running",
                                                                  "sleep 30", "-")
            assert master.read(f"procs/{proc.pid}/node") == "0\n"
            assert formats.parse_pids(master.read("nodes/0/procs")) == [proc.pid]
            assert stat.S_ISDIR(os.stat(d).st_mode) and os.stat(d).st_uid == 0
            # the ghost: same pid, its own command line, asleep
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                assert f.read() == b"sleep\x0030\x00"
            # others may not signal it; bad signals are EINVAL
            for text in ("9", "KILL", "kill"):
                r = as_user(bob, f"/bin/echo {text} > {d}/signal")
                assert r.returncode != 0 and b"Operation not permitted" in r.stderr
            r = as_user(bob, f"/bin/echo stop > {d}/ctl")
            assert b"Operation not permitted" in r.stderr
            for bad in (b"FOO\n", b"0\n", b"65\n", b"9 9\n", b"SIG\n"):
                assert write_errno(f"{d}/signal", bad) == errno.EINVAL, bad
            assert write_errno(f"{d}/ctl", b"frobnicate\n") == errno.EINVAL
            # root may: procs/PID/signal and ctl go to the node
            assert write_errno(f"{d}/signal", b"SIGUSR1\n") == 0
            assert write_errno(f"{d}/ctl", b"stop\n") == 0
            assert formats.parse_proc_status(master.read(f"procs/{proc.pid}/status")).state == \
                "stopped"
            assert write_errno(f"{d}/ctl", b"cont\n") == 0
            # a signal sent to the ghost on the master is forwarded
            os.kill(proc.pid, signal.SIGTERM)
            await wait_for(lambda: len(messages(node, "signal")) == 4, what="signals")
            assert [(s["pid"], s["sig"]) for s in messages(node, "signal")] == [
                (proc.pid, signal.SIGUSR1), (proc.pid, signal.SIGSTOP),
                (proc.pid, signal.SIGCONT), (proc.pid, signal.SIGTERM)]
            assert proc.poll() is None          # the ghost survived the suppressed SIGTERM
            # the real process ends: the ghost ends the same way; procs/PID goes away
            await node.fs.send({"t": "exited", "pid": proc.pid, "code": 7, "signal": None})
            assert await wait_exit(proc) == 7
            await wait_for(lambda: not os.path.exists(d), what="procs/PID removed")
        finally:
            reap(proc)


async def test_killed_ghost_kills_the_real_process(master: Master) -> None:
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        proc = writer(master, 0, request())
        try:
            await restored(master, node, proc)
            os.kill(proc.pid, signal.SIGKILL)
            assert await wait_exit(proc) == -signal.SIGKILL
            await wait_for(lambda: messages(node, "signal"), what="SIGKILL forwarded")
            assert messages(node, "signal")[0]["sig"] == signal.SIGKILL
            await wait_for(lambda: not os.path.exists(master.path(f"procs/{proc.pid}")))
        finally:
            reap(proc)


async def test_exit_by_signal_and_lost_node(master: Master) -> None:
    async with fake_node(master, number=1) as node:
        await wait_for(lambda: master.read("nodes/1/status") == "up\n")
        p1, p2 = writer(master, 1, request()), None
        try:
            await restored(master, node, p1)
            await node.fs.send({"t": "exited", "pid": p1.pid, "code": None,
                                "signal": signal.SIGSEGV})
            assert await wait_exit(p1) == -signal.SIGSEGV
            p2 = writer(master, 1, request())
            await restored(master, node, p2)
        except BaseException:
            reap(p1)
            raise
    try:          # the node's connection is gone: its ghosts die by SIGKILL
        assert p2 is not None and await wait_exit(p2) == -signal.SIGKILL
        await wait_for(lambda: not os.listdir(master.path("procs")))
    finally:
        reap(p1)
        if p2 is not None:
            reap(p2)


async def test_failed_restore_reports_to_bpsh_and_ghost_exits_255(master: Master) -> None:
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        proc = writer(master, 0, request(port, "socket"))
        try:
            msg = await first_restore(node)
            assert msg["port"] == port and msg["io"] == ["socket"] * 3
            await node.fs.send({"t": "failed", "id": msg["id"], "errno": errno.ENOEXEC,
                                "message": "other kernel"})
            conn, _ = await trio.to_thread.run_sync(listener.accept)
            with conn:
                line = conn.makefile("rb").readline()
            assert line == f"{TOKEN} {proc.pid} err {errno.ENOEXEC} other kernel\n".encode()
            assert await wait_exit(proc) == 255
            assert not os.path.exists(master.path(f"procs/{proc.pid}"))
        finally:
            reap(proc)
            listener.close()


async def test_execmove_refusals(master: Master, users) -> None:
    bob = users["bob"]
    async with fake_node(master):
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        ctl0, ctl2 = master.path("nodes/0/ctl"), master.path("nodes/2/ctl")
        for bad in ("execmove", "execmove --port 1", "execmove --port x --token " + TOKEN,
                    "execmove --port 1 --token short", request() + " --stdin bogus",
                    "execmove --frob 1 --port 1 --token " + TOKEN):
            assert write_errno(ctl0, bad.encode()) == errno.EINVAL, bad
        assert write_errno(ctl2, request().encode()) == errno.EHOSTDOWN
        os.chmod(master.path("nodes/0"), 0o100)
        r = as_user(bob, f"/bin/echo '{request()}' > {ctl0}")
        assert r.returncode != 0 and b"Permission denied" in r.stderr
        assert not os.listdir(master.path("procs"))


async def test_writer_that_never_execs_leaves_nothing(master: Master) -> None:
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        procs = [writer(master, 0, request(), prog="exit 5"),
                 writer(master, 0, request(), prog="exec /nonexistent/prog")]
        try:
            assert [await wait_exit(p) for p in procs] == [5, 127]
            await trio.sleep(0.3)
            assert not messages(node, "restore") and not os.listdir(master.path("procs"))
            assert "Traceback" not in master.log()
        finally:
            for p in procs:
                reap(p)


def read_events(fd: int) -> list[formats.Event]:
    try:
        return formats.parse_events(os.read(fd, 65536).decode())
    except BlockingIOError:
        return []


async def test_procs_pid_exists_while_starting_and_queues_signals(master: Master) -> None:
    """procs/PID appears when the ghost is held, before `restore` is answered: state
    starting; a signal written then reaches the node once it has restored the process."""
    events = os.open(master.path("events"), os.O_RDONLY | os.O_NONBLOCK)
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        proc = writer(master, 0, request())
        try:
            msg = await first_restore(node)
            assert proc_state(master, proc.pid) == "starting"   # before any `restored`
            d = master.path(f"procs/{proc.pid}")
            assert write_errno(f"{d}/signal", b"USR1\n") == 0
            os.kill(proc.pid, signal.SIGUSR2)                  # to the ghost, also queued
            await trio.sleep(0.2)
            assert not messages(node, "signal")
            node.answered = 1
            await node.fs.send({"t": "restored", "id": msg["id"], "pid": proc.pid})
            await wait_for(lambda: len(messages(node, "signal")) == 2, what="queued signals")
            assert sorted(s["sig"] for s in messages(node, "signal")) == [
                signal.SIGUSR1, signal.SIGUSR2]
            assert proc_state(master, proc.pid) == "running"
            await node.fs.send({"t": "exited", "pid": proc.pid, "code": 0, "signal": None})
            assert await wait_exit(proc) == 0
            got = [(e.what, e.detail) for e in read_events(events) if e.id == proc.pid]
            assert got[0] == ("start", "0") and got[-1] == ("exit", "0")
        finally:
            reap(proc)
            os.close(events)


async def test_failed_start_removes_procs_pid_with_an_exit_event(master: Master) -> None:
    events = os.open(master.path("events"), os.O_RDONLY | os.O_NONBLOCK)
    async with fake_node(master) as node:
        await wait_for(lambda: master.read("nodes/0/status") == "up\n")
        proc = writer(master, 0, request())
        try:
            msg = await first_restore(node)
            assert proc_state(master, proc.pid) == "starting"
            await node.fs.send({"t": "failed", "id": msg["id"],
                                "errno": errno.ENOEXEC, "message": "other kernel"})
            assert await wait_exit(proc) == 255
            assert proc_state(master, proc.pid) is None
            got = [(e.what, e.detail) for e in read_events(events) if e.id == proc.pid]
            assert got == [("start", "0"), ("exit", "failed ENOEXEC")]
        finally:
            reap(proc)
            os.close(events)

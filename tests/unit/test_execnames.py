"""bpfs/node/execnames.py: one task looks for the new command line of every process that
exec'd, and is not woken for one that ended first. Real processes (their /proc cmdline)."""

from __future__ import annotations

import math
import subprocess

import pytest
import trio

from bpfs.node import procread
from bpfs.node.execnames import ExecNames

pytestmark = pytest.mark.timeout(30)


def spawn(script: str) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", script])


async def until(pred, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


async def test_a_new_command_line_is_reported_once_and_a_dropped_one_never() -> None:
    seen: list[tuple[str, int, bytes]] = []
    names = ExecNames(lambda job, pid, cmdline: seen.append((job, pid, cmdline)))
    late = spawn("sleep 0.03; exec sleep 5")        # execs after the first look: the second
    same = spawn("sleep 5")                         # never changes
    gone = spawn("exec sleep 5")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(names.run)
            await trio.sleep(0.01)
            for p in (late, same, gone):
                names.add("job", p.pid, procread.cmdline(p.pid))
            names.drop(gone.pid)
            await until(lambda: seen)
            await trio.sleep(0.05)
            assert seen == [("job", late.pid, b"sleep\x005\x00")]
            assert len(names) == 1                  # `same`: looked at again later
            names.drop(same.pid)
            assert len(names) == 0
            # its due look stays until the task's next wake-up; then nothing is due
            await until(lambda: names._scope is not None and
                        names._scope.deadline == math.inf)
            nursery.cancel_scope.cancel()
    finally:
        for p in (late, same, gone):
            p.kill()
            p.wait()


async def test_an_ended_process_is_not_renamed() -> None:
    seen: list[int] = []
    names = ExecNames(lambda job, pid, cmdline: seen.append(pid))
    p = spawn("exec sleep 5")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(names.run)
            await trio.sleep(0)
            names.add(None, p.pid, b"something else")  # would differ, but it ends first
            p.kill()                                    # a zombie until reaped: state Z
            await until(lambda: len(names) == 0)
            assert seen == []
            nursery.cancel_scope.cancel()
    finally:
        p.kill()
        p.wait()


async def test_notes_from_another_thread_wake_the_task_once_per_look() -> None:
    """`add_soon` from a receiver thread: the new name is reported; while a look is due
    the task is not woken again for more notes (one wake-up per LOOK_EVERY at most)."""
    import threading
    seen: list[int] = []
    posted: list[object] = []
    names = ExecNames(lambda job, pid, cmdline: seen.append(pid))
    procs = [spawn("sleep 0.2; exec sleep 5") for _ in range(5)]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(names.run)
            await until(lambda: all(procread.cmdline(p.pid).startswith(b"sh\0")
                                    for p in procs) and names._offset is not None)
            token = trio.lowlevel.current_trio_token()

            def post(fn, *args):
                posted.append(fn)
                token.run_sync_soon(fn, *args)
            before = {p.pid: procread.cmdline(p.pid) for p in procs}
            threads = [threading.Thread(target=names.add_soon, args=(None, p.pid,
                                                                      before[p.pid], post))
                       for p in procs]
            for t in threads:
                t.start()
                t.join()
            await until(lambda: len(seen) == len(procs))
            assert sorted(seen) == sorted(p.pid for p in procs)
            assert len(posted) == 1
            nursery.cancel_scope.cancel()
    finally:
        for p in procs:
            p.kill()
            p.wait()

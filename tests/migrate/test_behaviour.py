"""Programs that, after migration, start threads, take signals, grow the stack, allocate,
read vdso clocks and the CPU, and look at /proc/self; a static binary too."""

from __future__ import annotations

import os

import pytest

from tests.migrate.conftest import local, migrate

pytestmark = pytest.mark.timeout(60)

MODES = ["threads", "signals", "stack", "alloc", "clocks", "getcpu", "proc", "hello"]


@pytest.mark.parametrize("mode", MODES)
def test_dynamic(node, cprogs, mode) -> None:
    argv = [cprogs["dynamic"], mode]
    got = migrate(node, argv)
    assert got.triple() == local(argv).triple()


@pytest.mark.parametrize("mode", ["hello", "threads", "signals", "proc", "getcpu", "clocks"])
def test_static(node, cprogs, mode) -> None:
    if "static" not in cprogs:
        pytest.skip("gcc cannot link statically here (no libc.a)")
    argv = [cprogs["static"], mode]
    got = migrate(node, argv)
    assert got.triple() == local(argv).triple()


def test_proc_self_values(node, cprogs) -> None:
    exe = cprogs["dynamic"]
    got = migrate(node, [exe, "proc"])
    assert got.stdout == (f"exe {exe}\ncmdline [{exe}] [proc]\ncomm {os.path.basename(exe)}\n"
                          "pid ok 1\n").encode()


def test_python_threads_and_signals(node) -> None:
    code = ("import os, signal, threading\n"
            "got = []\n"
            "signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
            "ts = [threading.Thread(target=lambda i=i: print(i, flush=True)) for i in range(3)]\n"
            "[t.start() or t.join() for t in ts]\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "print('got', got, os.getpid() == int(open('/proc/self/stat').read().split()[0]))\n")
    argv = ["/usr/bin/python3", "-c", code]
    got = migrate(node, argv)
    assert got.triple() == local(argv).triple()
    assert got.stdout.endswith(b"got [10] True\n")

"""Programs that, after migration, start threads, take signals, grow the stack, allocate,
read vdso clocks and the CPU, and look at /proc/self; a static binary too."""

from __future__ import annotations

import os

import pytest

from tests.engine.support import local, migrate

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


def test_restored_layout_is_the_masters(node) -> None:
    """No trace of the helper: same mappings as dumped, vdso where it was, not traced."""
    from bpfs.migrate import dump, image
    from bpfs.migrate.restore import SCRATCH
    from tests.engine.support import ENV, migrate_image

    pid = dump.launch(["/bin/cat", "/proc/self/maps", "/proc/self/status"], ENV, "/")
    try:
        img = dump.dump(pid)
    finally:
        dump.kill(pid)
    got = migrate_image(node, image.dumps(img), img)
    assert got.code == 0
    text = got.stdout.decode()
    assert f"{SCRATCH:x}" not in text
    vdso = img.special["vdso"]
    assert f"{vdso[0]:x}-{vdso[1]:x} r-xp 00000000 00:00 0" in text
    for r in img.regions:
        if r.kind == "file":
            assert f"{r.start:x}-{r.end:x}" in text or r.prot & 2  # data may merge with brk
    assert "\nTracerPid:\t0\n" in text


def test_pending_signal_travels(node, cprogs) -> None:
    """A signal blocked and pending across execve is pending in the restored process too."""
    import signal
    import subprocess

    from bpfs.migrate import image
    from tests.engine.support import ENV, migrate_image, seized_at_exec

    argv = [cprogs["dynamic"], "pending"]

    def block_and_raise() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        os.kill(os.getpid(), signal.SIGUSR1)

    with seized_at_exec(argv, block_and_raise) as (_, img):
        pass
    assert img.pending == [signal.SIGUSR1]
    got = migrate_image(node, image.dumps(img), img)
    ref = subprocess.run(argv, capture_output=True, env=ENV, preexec_fn=block_and_raise)
    assert got.triple() == (ref.stdout, ref.stderr, ref.returncode)
    assert got.stdout == b"USR1 pending at start 1\nhandler got 10\n"

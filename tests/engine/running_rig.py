"""Running programs for the tests of bpfs.migrate.running: each one is a grandchild (its
parent a small waiter, so the tracer is not its parent, as on a node or the master), prints
to a file, and is killed and reaped in `finally`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from bpfs.migrate import image, running
from bpfs.migrate.loopnode import LoopNode
from tests.conftest import User, as_user

PY = "/usr/bin/python3"
WAITER = ("import subprocess, sys\n"
          "out = open(sys.argv[1], 'ab')\n"
          "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=out)\n"
          "print(p.pid, flush=True)\n"
          "sys.exit(p.wait())\n")

# Counts to N, one line "n sum-so-far" each `pause` seconds, its state in a dict and a list.
COUNTER = ("import os, signal, sys, time\n"
           "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', flush=True))\n"
           "state = {'n': 0, 'seen': []}\n"
           "n, pause = int(sys.argv[1]), float(sys.argv[2])\n"
           "while state['n'] < n:\n"
           "    state['n'] += 1\n"
           "    state['seen'].append(state['n'])\n"
           "    print(state['n'], sum(state['seen']), os.getuid(), flush=True)\n"
           "    time.sleep(pause)\n")


@dataclass
class Prog:
    pid: int
    out: str
    waiter: subprocess.Popen

    def lines(self) -> list[str]:
        with open(self.out) as f:
            return f.read().splitlines()

    def wait_lines(self, n: int, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < n:
            assert time.monotonic() < deadline, f"fewer than {n} lines: {self.lines()}"
            time.sleep(0.01)
        return self.lines()

    def end(self, timeout: float = 10) -> int:
        """The program's exit code, once it ended by itself."""
        return self.waiter.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.waiter.poll() is None


@contextlib.contextmanager
def started(argv: Sequence[str], out: str, user: User | None = None,
            cwd: str | None = None) -> Iterator[Prog]:
    waiter = subprocess.Popen(as_user([PY, "-S", "-c", WAITER, out, *argv], user),
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd)
    pid = 0
    try:
        pid = int(waiter.stdout.readline())
        yield Prog(pid, out, waiter)
    finally:
        if pid:
            running.discard(pid)   # killed (its exit status ours too if we trace it) ...
        try:
            waiter.wait(timeout=10)  # ... and reaped by the waiter, which ends with it
        finally:
            waiter.kill()
            waiter.wait()
            waiter.stdout.close()


def counter(n: int, pause: float) -> list[str]:
    return [PY, "-S", "-c", COUNTER, str(n), str(pause)]


def dump_stopped(pid: int, links: frozenset[int] = frozenset({0, 1, 2})) -> image.Image:
    running.seize_running(pid)
    running.stop(pid)
    return running.dump_running(pid, links)


def restore(node: LoopNode, img: image.Image, out: str, user: User | None = None,
            wait: bool = True) -> dict:
    """The image restored on `node` (pid as dumped), fd 0 /dev/null, 1 and 2 appending to
    `out`; with `wait`, its wait status is in the reply."""
    fin = os.open("/dev/null", os.O_RDONLY)
    fout = os.open(out, os.O_WRONLY | os.O_APPEND)
    try:
        ids = dict(uid=user.uid, gid=user.gid, groups=user.groups) if user else {}
        return node.restore(image.dumps(img), pid=img.pid, fds=(fin, fout, fout), wait=wait,
                            **ids)
    finally:
        os.close(fin)
        os.close(fout)


def counted(lines: list[str], n: int, uid: int = 0) -> bool:
    """Whether `lines` are the counter's 1..n, each once and in order, its sums right."""
    want = [f"{i} {i * (i + 1) // 2} {uid}" for i in range(1, n + 1)]
    return [line for line in lines if line != "usr1"] == want


__all__ = ["Prog", "started", "counter", "dump_stopped", "restore", "counted", "PY"]

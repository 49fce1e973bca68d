"""A rig for the ghost and tracer tests: real processes, real ptrace and real signals.

`Bpsh` plays bpsh: a separate Python process (the ghosts' real parent, as in production; a
parent in the tracer's own process would have its child reaped by the tracer) that forks a
child per request, lets it execve only after the test has seized it (a pipe handshake), and
reports every wait status it reaps. The test process plays the master: it runs the `Tracer`.
Every process is killed and reaped in `finally` (the `rig` fixture, in conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from bpfs.migrate.tracer import Tracer

ROOT = Path(__file__).resolve().parents[2]
SLEEP, TRUE, FALSE = "/bin/sleep", "/bin/true", "/bin/false"

BPSH = r'''
import json, os, resource, select, signal, sys
gates, live = {}, set()

def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\n").encode())

def child(gate, req):
    try:
        os.read(gate, 1)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):   # what bpsh resets before execve
            signal.signal(sig, signal.SIG_DFL)
        for sig in req.get("ignore", []):
            signal.signal(sig, signal.SIG_IGN)
        if req.get("core"):
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
        if "uid" in req:                               # a user's process, not root's
            os.setgroups([])
            os.setgid(req["gid"])
            os.setuid(req["uid"])
        os.chdir(req.get("cwd", "/"))
        os.execve(req["argv"][0], req["argv"], req.get("env") or os.environ)
    finally:
        os._exit(127)

def spawn(req):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        child(r, req)
    os.close(r)
    gates[pid] = w
    live.add(pid)
    say("pid", pid)

def reap(flags):  # every child: also the copies of a ghost (Tracer.clone), never spawned here
    while True:
        try:
            pid, status = os.waitpid(-1, flags)
        except ChildProcessError:
            return
        if pid == 0:
            return
        live.discard(pid)
        say("exit", pid, status)

buf = b""
while True:
    if select.select([0], [], [], 0.002)[0]:
        data = os.read(0, 4096)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd, _, arg = line.decode().partition(" ")
            if cmd == "spawn":
                spawn(json.loads(arg))
            elif cmd == "go":
                os.write(gates.pop(int(arg)), b"x")
    reap(os.WNOHANG)
for pid in live:
    os.kill(pid, signal.SIGKILL)
reap(0)
'''


class Bpsh:
    """The ghosts' parent, in its own process; `status(pid)` is what its waitpid saw."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BPSH], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self._cond = threading.Condition()
        self._pids: list[int] = []
        self.exits: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            words = line.split()
            with self._cond:
                if words[0] == b"pid":
                    self._pids.append(int(words[1]))
                else:
                    self.exits[int(words[1])] = int(words[2])
                self._cond.notify_all()

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def spawn(self, argv: Sequence[str], **req) -> int:
        with self._cond:
            self._send("spawn " + json.dumps(dict(req, argv=list(argv))))
            assert self._cond.wait_for(lambda: self._pids, 10)
            return self._pids.pop(0)

    def go(self, pid: int) -> None:
        self._send(f"go {pid}")

    def status(self, pid: int, timeout: float = 10) -> int:
        with self._cond:
            assert self._cond.wait_for(lambda: pid in self.exits, timeout), f"{pid} not reaped"
            return self.exits[pid]

    def running(self, pid: int) -> bool:
        with self._cond:
            return pid not in self.exits

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)


class Recorder:
    """The Tracer's callbacks, recorded."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.signals: list[tuple[int, int]] = []
        self.exits: dict[int, int] = {}
        self.threads: set[str] = set()

    def on_signal(self, pid: int, sig: int) -> None:
        with self.cond:
            self.signals.append((pid, sig))
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def on_exit(self, pid: int, status: int) -> None:
        with self.cond:
            self.exits[pid] = status
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float = 5) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout)


class Rig:
    def __init__(self) -> None:
        self.rec = Recorder()
        self.tracer = Tracer(self.rec.on_signal, self.rec.on_exit)
        self.bpsh = Bpsh()

    def ghost(self, argv: Sequence[str], **req):
        """bpsh's child seized, exec'd, captured and parked: (pid, image)."""
        pid = self.bpsh.spawn(argv, **req)
        self.tracer.seize(pid).result(5)
        self.bpsh.go(pid)
        return pid, self.tracer.capture(pid, 5).result(10)



def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def until(pred: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.001)
    return pred()


def asleep(pid: int) -> bool:
    """True once `pid` sleeps (S); a just-parked ghost may still be on its way into pause()."""
    return until(lambda: proc_state(pid) == "S", 2)


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")

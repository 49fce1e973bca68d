"""Ghosts with real processes, real ptrace and real signals.

`Bpsh` plays bpsh: a separate Python process (the ghosts' real parent, as in production; a
parent in the tracer's own process would have its child reaped by the tracer) that forks a
child per request, lets it execve only after the test has seized it (a pipe handshake), and
reports every wait status it reaps. The test process plays the master: it runs the `Tracer`.
Every process is killed and reaped in `finally`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from bpfs.migrate.errors import MigrateError
from bpfs.migrate.ghost import Tracer

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]

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
        os.chdir(req.get("cwd", "/"))
        os.execv(req["argv"][0], req["argv"])
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

def reap(flags):
    while live:
        pid, status = os.waitpid(-1, flags)
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


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        r.tracer.start()
        yield r
    finally:
        try:
            r.tracer.stop()
        finally:
            r.bpsh.close()


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


# ---- what a ghost looks like ----

def test_ghost_keeps_pid_name_and_command_line_in_little_memory(rig: Rig) -> None:
    pid, img = rig.ghost([SLEEP, "100", "--", "a b"])
    assert asleep(pid)
    assert (img.pid, img.argv, img.comm, img.exe_path) == (pid, [SLEEP, "100", "--", "a b"],
                                                           "sleep", os.path.realpath(SLEEP))
    ps = subprocess.run(["ps", "-o", "pid=,stat=,comm=,args=", "-p", str(pid)],
                        capture_output=True, text=True, check=True).stdout.split(None, 3)
    assert ps == [str(pid), "S", "sleep", f"{SLEEP} 100 -- a b\n"]
    with open(f"/proc/{pid}/environ", "rb") as f:
        assert b"PATH=" in f.read()
    before, after = rig.tracer.park_rss[pid]
    assert after == vm_rss_kb(pid)
    print(f"\nghost VmRSS: {before} kB after the dump, {after} kB parked")
    assert after <= 16 < before
    assert rig.tracer.ghosts() == [pid]
    rig.tracer.finish(pid, exit_code=0).result(5)
    assert rig.bpsh.status(pid) == 0
    assert rig.tracer.ghosts() == []


def test_every_catchable_signal_is_intercepted_and_reported(rig: Rig) -> None:
    pid, _ = rig.ghost([TRUE])  # /bin/true would exit 0 at once if it ran here
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGSTOP, signal.SIGCONT, signal.SIGUSR1,
            signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGSEGV, signal.SIGPIPE,
            signal.SIGTRAP, signal.SIGWINCH, signal.SIGRTMIN + 3]
    for sig in sigs:
        os.kill(pid, sig)
        rig.rec.wait(lambda: (pid, sig) in rig.rec.signals)
        assert asleep(pid) and rig.bpsh.running(pid)
    assert rig.rec.signals == [(pid, s) for s in sigs]
    assert rig.rec.threads == {"bpfs-tracer"}
    os.kill(pid, signal.SIGKILL)
    rig.rec.wait(lambda: pid in rig.rec.exits)
    status = rig.bpsh.status(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert rig.rec.exits[pid] == status
    assert gone(pid) and rig.tracer.ghosts() == []


# ---- ending like the real process ----

def test_finish_with_exit_codes(rig: Rig) -> None:
    cases = [(FALSE, 0), (TRUE, 1), (TRUE, 42), (TRUE, 255)]  # never the program's own code
    pids = [(rig.ghost([prog])[0], code) for prog, code in cases]
    futs = [rig.tracer.finish(pid, exit_code=code) for pid, code in pids]
    for (pid, code), fut in zip(pids, futs):
        assert fut.result(5) is None
        status = rig.bpsh.status(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == code
        assert rig.rec.exits[pid] == status
    time.sleep(0.05)
    assert all(gone(pid) for pid, _ in pids)  # reaped by bpsh: no zombie left


def test_finish_by_signal_without_core_dump(rig: Rig) -> None:
    with tempfile.TemporaryDirectory() as cwd:
        os.chmod(cwd, 0o777)
        segv, _ = rig.ghost([SLEEP, "100"], cwd=cwd, core=True)
        term, _ = rig.ghost([SLEEP, "100"], cwd=cwd, core=True, ignore=[signal.SIGTERM])
        rig.tracer.finish(segv, signal=signal.SIGSEGV).result(5)
        rig.tracer.finish(term, signal=signal.SIGTERM).result(5)
        for pid, sig in ((segv, signal.SIGSEGV), (term, signal.SIGTERM)):
            status = rig.bpsh.status(pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
            assert not os.WCOREDUMP(status)
        assert os.listdir(cwd) == []
    assert rig.rec.signals == []  # our own signal was not reported as one sent to the ghost


def test_finish_and_kill_are_refused_for_unknown_or_wrong_arguments(rig: Rig) -> None:
    def errno_of(fut) -> int:
        with pytest.raises(MigrateError) as exc:
            fut.result(5)
        return exc.value.errno

    assert errno_of(rig.tracer.seize(2**22 + 1)) == errno.ESRCH
    assert errno_of(rig.tracer.capture(2**22 + 1, 1)) == errno.ESRCH
    assert errno_of(rig.tracer.kill(2**22 + 1)) == errno.ESRCH
    pid, _ = rig.ghost([TRUE])
    assert errno_of(rig.tracer.capture(pid, 1)) == errno.EBUSY
    assert errno_of(rig.tracer.seize(pid)) == errno.EBUSY
    assert errno_of(rig.tracer.finish(pid)) == errno.EINVAL
    assert errno_of(rig.tracer.finish(pid, exit_code=1, signal=15)) == errno.EINVAL
    assert errno_of(rig.tracer.finish(pid, exit_code=256)) == errno.EINVAL
    assert errno_of(rig.tracer.finish(pid, signal=signal.SIGCHLD)) == errno.EINVAL
    assert rig.tracer.ghosts() == [pid]
    rig.tracer.finish(pid, signal=signal.SIGKILL).result(5)
    assert os.WTERMSIG(rig.bpsh.status(pid)) == signal.SIGKILL


def test_capture_times_out_and_the_seized_process_can_be_ended(rig: Rig) -> None:
    pids = [rig.bpsh.spawn([TRUE]) for _ in range(2)]  # never released: they never exec
    for pid in pids:
        rig.tracer.seize(pid).result(5)
    t0 = time.monotonic()
    for fut in [rig.tracer.capture(pid, 0.2) for pid in pids]:
        with pytest.raises(MigrateError) as exc:
            fut.result(5)
        assert exc.value.errno == errno.ETIMEDOUT
    assert 0.2 <= time.monotonic() - t0 < 1
    rig.tracer.kill(pids[0]).result(5)
    assert os.WTERMSIG(rig.bpsh.status(pids[0])) == signal.SIGKILL
    # the pre-exec child is Python, which catches SIGINT: finish resets that to the default
    rig.tracer.finish(pids[1], signal=signal.SIGINT).result(5)
    assert os.WTERMSIG(rig.bpsh.status(pids[1])) == signal.SIGINT


def test_exec_before_capture_is_kept_for_it(rig: Rig) -> None:
    pid = rig.bpsh.spawn([TRUE])
    rig.tracer.seize(pid).result(5)
    rig.bpsh.go(pid)
    assert until(lambda: proc_state(pid) == "t")  # its exec stop waits, unconsumed
    with open(f"/proc/{pid}/comm") as f:
        assert f.read() == "true\n"  # exec'd: stopped at its exec event
    assert rig.tracer.capture(pid, 5).result(5).argv == [TRUE]
    rig.tracer.finish(pid, exit_code=7).result(5)
    assert os.WEXITSTATUS(rig.bpsh.status(pid)) == 7


def test_a_child_that_ends_before_its_exec(rig: Rig) -> None:
    pid = rig.bpsh.spawn(["/nonexistent/program"])  # execv fails: the child exits 127
    rig.tracer.seize(pid).result(5)
    fut = rig.tracer.capture(pid, 5)
    rig.bpsh.go(pid)
    with pytest.raises(MigrateError) as exc:
        fut.result(5)
    assert exc.value.errno == errno.ESRCH
    status = rig.bpsh.status(pid)
    assert os.WEXITSTATUS(status) == 127 and rig.rec.exits[pid] == status


def test_setuid_program_is_refused_and_never_runs(rig: Rig) -> None:
    su = "/usr/bin/passwd" if os.path.exists("/usr/bin/passwd") else None
    if su is None or not os.stat(su).st_mode & 0o4000:
        pytest.skip("no set-user-ID program to try")
    pid = rig.bpsh.spawn([su, "--status"])
    rig.tracer.seize(pid).result(5)
    rig.bpsh.go(pid)
    with pytest.raises(MigrateError) as exc:
        rig.tracer.capture(pid, 5).result(5)
    assert exc.value.errno == errno.EPERM
    assert proc_state(pid) == "t" and rig.tracer.ghosts() == []
    rig.tracer.finish(pid, exit_code=255).result(5)
    assert os.WEXITSTATUS(rig.bpsh.status(pid)) == 255


# ---- many ghosts, and the tracer's end ----

def test_twenty_ghosts_then_stop_kills_the_rest(rig: Rig) -> None:
    pids = [rig.bpsh.spawn([SLEEP, str(100 + i)]) for i in range(20)]
    for fut in [rig.tracer.seize(pid) for pid in pids]:
        fut.result(5)
    for pid in pids:
        rig.bpsh.go(pid)
    images = [f.result(10) for f in [rig.tracer.capture(pid, 5) for pid in pids]]
    assert [img.argv[1] for img in images] == [str(100 + i) for i in range(20)]
    assert rig.tracer.ghosts() == sorted(pids)
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    rig.rec.wait(lambda: len(rig.rec.signals) == 20)
    assert sorted(rig.rec.signals) == sorted((pid, signal.SIGUSR1) for pid in pids)
    for fut in [rig.tracer.finish(pid, exit_code=i) for i, pid in enumerate(pids[:10])]:
        fut.result(5)
    rig.tracer.stop()
    for i, pid in enumerate(pids):
        status = rig.bpsh.status(pid)
        if i < 10:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == i
        else:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert rig.rec.exits[pid] == status
    time.sleep(0.05)
    assert all(gone(pid) for pid in pids)
    with pytest.raises(MigrateError) as exc:
        rig.tracer.submit(lambda: None).result(5)
    assert exc.value.errno == errno.ESHUTDOWN


TRACER_SCRIPT = '''
import sys
from bpfs.migrate.ghost import Tracer
t = Tracer(lambda p, s: None, lambda p, s: None)
t.start()
pid = int(sys.argv[1])
t.seize(pid).result(5)
print("seized", flush=True)
sys.stdin.readline()
t.capture(pid, 5).result(10)
print("parked", flush=True)
sys.stdin.readline()
'''


def test_ghosts_die_when_the_master_dies(rig: Rig) -> None:
    pid = rig.bpsh.spawn([TRUE])
    master = subprocess.Popen([sys.executable, "-c", TRACER_SCRIPT, str(pid)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert master.stdout.readline() == "seized\n"
        rig.bpsh.go(pid)
        master.stdin.write("\n")
        master.stdin.flush()
        assert master.stdout.readline() == "parked\n"
        assert asleep(pid)
        master.kill()
        status = rig.bpsh.status(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finally:
        master.kill()
        master.wait()


# ---- the thread: latency, idleness, other children ----

def test_latency_and_no_cpu_when_idle(rig: Rig) -> None:
    pid, _ = rig.ghost([SLEEP, "100"])
    sig_lat, sub_lat = [], []
    for i in range(50):
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGUSR2)
        rig.rec.wait(lambda: len(rig.rec.signals) == i + 1)
        sig_lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rig.tracer.submit(lambda: None).result(5)
        sub_lat.append(time.perf_counter() - t0)
    cpu0 = time.process_time()
    time.sleep(0.5)
    idle_cpu = time.process_time() - cpu0
    print(f"\nsignal -> on_signal median {statistics.median(sig_lat) * 1e3:.3f} ms, "
          f"max {max(sig_lat) * 1e3:.3f} ms; submit -> result median "
          f"{statistics.median(sub_lat) * 1e3:.3f} ms, max {max(sub_lat) * 1e3:.3f} ms; "
          f"CPU in 0.5 s idle {idle_cpu * 1e3:.2f} ms")
    assert statistics.median(sig_lat) < 0.005 and statistics.median(sub_lat) < 0.005
    assert idle_cpu < 0.02


def test_other_children_are_not_reaped(rig: Rig) -> None:
    pid, _ = rig.ghost([SLEEP, "100"])
    assert subprocess.run(["sh", "-c", "exit 3"]).returncode == 3  # a child of this thread
    child = rig.tracer.submit(subprocess.Popen, ["sh", "-c", "exit 4"]).result(5)
    try:
        assert child.wait(5) == 4  # a child of the tracer thread itself
    finally:
        child.kill()
        child.wait()
    os.kill(pid, signal.SIGINT)
    rig.rec.wait(lambda: (pid, signal.SIGINT) in rig.rec.signals)
    rig.tracer.kill(pid).result(5)
    assert os.WTERMSIG(rig.bpsh.status(pid)) == signal.SIGKILL


def test_a_killed_doorbell_is_replaced(rig: Rig) -> None:
    def doorbells() -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat") as f:
                    comm, rest = f.read().split("(", 1)[1].rsplit(")", 1)
            except (OSError, IndexError):
                continue
            if comm == "bpfs-doorbell" and int(rest.split()[1]) == os.getpid():
                out.append(int(d))
        return out

    pid, _ = rig.ghost([SLEEP, "100"])
    [bell] = doorbells()
    assert vm_rss_kb(bell) <= 16
    os.kill(bell, signal.SIGKILL)
    assert rig.tracer.submit(lambda: 42).result(5) == 42
    assert until(lambda: len(doorbells()) == 1 and doorbells() != [bell])
    assert gone(bell)  # reaped, no zombie
    os.kill(pid, signal.SIGHUP)
    rig.rec.wait(lambda: (pid, signal.SIGHUP) in rig.rec.signals)
    rig.tracer.finish(pid, exit_code=3).result(5)
    assert os.WEXITSTATUS(rig.bpsh.status(pid)) == 3

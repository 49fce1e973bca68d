"""The node's PID counter (bpfs/node/pidcounter.py, bpfs/node/ownpids.py), in a PID
namespace of its own (unshare, the script as its PID 1, as a node daemon is).

A directed fork: the counter is pointed just below a PID and a caller is let go; until the
kernel has numbered its child, a thread or a process the daemon makes would take that
PID instead. Seen in CI on a loaded machine: a fork on a node was refused because its
parent, forked just before, had no ghost (the 50 ms the node waited for the number had
passed, and a daemon thread was made meanwhile). The caller here runs on the CPU a while
before it forks, as a caller that has not yet had the CPU to get into the kernel's fork.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.engine.support import NS

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root")]

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARK = 1 << 20
TARGET = 5000

SCRIPT = r"""
import json, os, signal, subprocess, sys, threading, time
sys.path.insert(0, sys.argv[1])
from bpfs.migrate.seccomp import SYSCALLS as NR
from bpfs.node import ownpids, procread
from bpfs.node.pidcounter import Counter

mode, guarded, PARK, TARGET = sys.argv[2], sys.argv[3] == "guarded", int(sys.argv[4]), int(sys.argv[5])
asking = set()
counter = Counter(PARK, lambda tid: tid in asking)
if guarded:
    ownpids.install(counter)
r, w = os.pipe()
back_r, back_w = os.pipe()
caller = os.fork()
if caller == 0:
    word = os.read(r, 16)
    if word == b"fork":                 # runs 0.1 s (10 clock ticks), then forks
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:
            pass
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.write(back_w, b"%d" % child)
        os.waitpid(child, 0)
    elif word == b"spin":
        while True:
            pass
    else:
        os.read(r, 16)                  # blocked in another call: not forking
    os._exit(0)

def go():
    if mode == "stopped":
        os.write(w, b"spin")
        time.sleep(0.05)
        os.kill(caller, signal.SIGSTOP)
    elif mode == "asking":
        os.write(w, b"spin")
        asking.add(caller)
    elif mode == "gone":
        os.kill(caller, signal.SIGKILL)
    else:
        os.write(w, mode.encode())
    return True

t0 = time.perf_counter()
assert counter.direct(TARGET, caller, NR["clone"], go)
tids = []
t = threading.Thread(target=lambda: tids.append(threading.get_native_id()))
t.start()
t.join()
spawned = subprocess.Popen(["true"]).pid
waited = time.perf_counter() - t0
child = int(os.read(back_r, 16)) if mode == "fork" else None
if mode != "fork":
    os.kill(caller, signal.SIGKILL)
os.waitpid(caller, 0)
print(json.dumps({"child": child, "thread": tids[0], "spawned": spawned, "waited": waited,
                  "pending": counter.pending is not None, "last": procread.read_last()}))
"""


def run(mode: str, guarded: bool = True) -> dict:
    r = subprocess.run(NS + [sys.executable, "-c", SCRIPT, SRC, mode,
                             "guarded" if guarded else "bare", str(PARK), str(TARGET)],
                       capture_output=True, timeout=45)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout.decode().splitlines()[-1])


def test_a_thread_and_a_process_made_meanwhile_wait_for_the_directed_number() -> None:
    out = run("fork")
    assert out["child"] == TARGET, out
    assert out["thread"] > PARK and out["spawned"] > PARK, out
    assert not out["pending"] and out["last"] > PARK, out


def test_without_the_guard_a_new_thread_takes_the_childs_number() -> None:
    """What the guard is for (and that this test can see it)."""
    out = run("fork", guarded=False)
    assert out["thread"] == TARGET and out["child"] != TARGET, out


@pytest.mark.parametrize("mode", ["skip", "stopped", "asking", "gone"])
def test_a_caller_out_of_its_fork_settles_it_at_once(mode: str) -> None:
    """Blocked in another call, stopped, asking for a fork again (a signal restarted it),
    gone: the fork will not take the number; the counter is parked without waiting long."""
    out = run(mode)
    assert out["thread"] > PARK and out["spawned"] > PARK, out
    assert not out["pending"] and out["last"] > PARK, out
    assert out["waited"] < 2.0, out

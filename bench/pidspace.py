#!/usr/bin/env python3
"""The one PID space's costs: forks on a node against the master's, ghosts, kills.

    sudo /opt/bpfs/venv/bin/python bench/pidspace.py [--nodes 3] [--loops 1000] [--ghosts 200]

Brings up an embedded cluster of this checkout on a temporary mount and measures, in one
sitting, side by side:

  * a fork+exec+wait loop of /bin/true (`--loops` times, timed by the shell itself, so
    bpsh's start-up is not in it) on a node and on the master: per-iteration cost, and
    the ratio (goal: node at most 2x the master);
  * os.fork() as a program sees it, median, on a node and on the master (the ghost is made
    before the node's child exists: it is in `ps` on the master when fork returns);
  * the master's memory per extra ghost: `--ghosts` sleeping children forked on a node,
    the ghosts' proportional set size (Pss, /proc/PID/smaps_rollup) plus the growth of the
    master daemon's RSS, divided by their number (goal: at most 64 KB);
  * kill(2) from a process on node 1 to one on node 2: the time from the sender's kill to
    the receiver's handler (the machine's one clock), median over 100 (goal: 2 ms); and
    the same between two processes of one node, and from the master to a node.

Not a test: prints figures, exit status 0 unless something failed to run. Always brings
the cluster down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUNNER = ("import sys; from importlib import import_module as m; sys.argv[0] = {name!r}; "
          "sys.exit(m({module!r}).main())")
MODULES = {"bpfs": "bpfs.cli.bpfs_main", "bpsh": "bpfs.cli.bpsh"}

LOOP = ('s=$(date +%s%N); i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; '
        'e=$(date +%s%N); echo $(( (e - s) / {n} ))')
FORKS = """
import os, time
ts = []
for i in range(200):
    t = time.perf_counter(); p = os.fork()
    if p == 0: os._exit(0)
    ts.append(time.perf_counter() - t); os.waitpid(p, 0)
ts.sort(); print(ts[len(ts) // 2] * 1e6)
"""
RECEIVER = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(time.time()))
print(os.getpid(), flush=True)
n = int(sys.argv[1])
while len(got) < n:
    signal.pause()
print(" ".join("%.6f" % t for t in got), flush=True)
"""
SENDER = """
import os, signal, sys, time
target, n = int(sys.argv[1]), int(sys.argv[2])
out = []
for i in range(n):
    out.append(time.time()); os.kill(target, signal.SIGUSR1); time.sleep(0.01)
print(" ".join("%.6f" % t for t in out), flush=True)
"""


def cmd(name: str) -> list[str]:
    return [PY, "-c", RUNNER.format(name=name, module=MODULES[name])]


class Bench:
    def __init__(self, nodes: int) -> None:
        self.base = tempfile.mkdtemp(prefix="bpfs-bench-")
        self.mount = os.path.join(self.base, "mnt")
        self.state = os.path.join(self.base, "state")
        os.mkdir(self.mount)
        os.mkdir(self.state)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), BPROC_MOUNT=self.mount)
        self.nodes = nodes

    def up(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run(cmd("bpfs") + ["up", "--nodes", str(self.nodes), "--mount", self.mount,
                                      "--state-dir", self.state, "--port", str(port),
                                      "--detach"],
                       env=self.env, check=True, capture_output=True)

    def down(self) -> None:
        subprocess.run(cmd("bpfs") + ["down", "--mount", self.mount, "--state-dir",
                                      self.state], env=self.env, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def bpsh(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd("bpsh") + list(argv), env=self.env, capture_output=True,
                              check=True, cwd="/", **kw)

    def popen(self, *argv: str) -> subprocess.Popen:
        return subprocess.Popen(cmd("bpsh") + list(argv), env=self.env, cwd="/",
                                stdout=subprocess.PIPE, text=True)

    def master_pid(self) -> int:
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        args = f.read().split(b"\0")
                except OSError:
                    continue
                if b"master" in args and self.mount.encode() in args:
                    return int(p)
        raise RuntimeError("no master found")


def kb(pid: int, key: bytes, name: str = "status") -> int:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def kill_latency(b: Bench, src: str | None, dst: str, n: int = 100) -> float:
    """Median ms from kill() in `src` (a node, or None: the master) to the handler in `dst`."""
    recv = b.popen(dst, PY, "-c", RECEIVER, str(n))
    assert recv.stdout is not None
    target = int(recv.stdout.readline())
    argv = [PY, "-c", SENDER, str(target), str(n)]
    sent = (b.bpsh(src, *argv) if src is not None else
            subprocess.run(argv, capture_output=True, check=True)).stdout.split()
    got = recv.stdout.readline().split()
    recv.wait(timeout=30)
    return statistics.median(float(g) - float(s) for s, g in zip(sent, got)) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--loops", type=int, default=1000)
    ap.add_argument("--ghosts", type=int, default=200)
    args = ap.parse_args()
    b = Bench(args.nodes)
    try:
        b.up()
        loop = LOOP.format(n=args.loops)
        rows = []
        for _ in range(3):      # take turns: the machine's other work comes and goes
            node_ns = int(b.bpsh("1", "sh", "-c", loop).stdout)
            master_ns = int(subprocess.run(["sh", "-c", loop], capture_output=True,
                                           check=True).stdout)
            rows.append((node_ns, master_ns))
        node_ns = statistics.median(r[0] for r in rows)
        master_ns = statistics.median(r[1] for r in rows)
        print(f"fork+exec+wait of /bin/true, {args.loops} times: node {node_ns / 1e6:.2f} ms, "
              f"master {master_ns / 1e6:.2f} ms per iteration: {node_ns / master_ns:.2f}x "
              "(goal 2x)")
        node_fork = float(b.bpsh("1", PY, "-c", FORKS).stdout)
        master_fork = float(subprocess.run([PY, "-c", FORKS], capture_output=True,
                                           check=True).stdout)
        print(f"os.fork() median: node {node_fork / 1e3:.2f} ms, master "
              f"{master_fork / 1e3:.3f} ms (the ghost is in ps before fork returns)")

        master = b.master_pid()
        before = kb(master, b"VmRSS:")
        n = args.ghosts
        p = b.popen("1", "sh", "-c", f"i=0; while [ $i -lt {n} ]; do sleep 60 & "
                    "i=$((i+1)); done; echo $$; wait")
        assert p.stdout is not None
        sh = int(p.stdout.readline())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(f"/proc/{sh}/task/{sh}/children") as f:
                kids = [int(x) for x in f.read().split()]
            if len(kids) >= n:
                break
            time.sleep(0.1)
        pss = sum(kb(k, b"Pss:", "smaps_rollup") for k in kids)
        after = kb(master, b"VmRSS:")
        print(f"{len(kids)} ghosts: Pss {pss / len(kids):.0f} KB each, master RSS "
              f"+{(after - before) / len(kids):.1f} KB each: "
              f"{(pss + after - before) / len(kids):.0f} KB per ghost (goal 64 KB)")
        for k in kids:
            os.kill(k, 15)
        p.wait(timeout=60)

        print(f"kill, node 1 -> node 2: {kill_latency(b, '1', '2'):.2f} ms median (goal 2 ms)")
        print(f"kill, node 1 -> node 1: {kill_latency(b, '1', '1'):.2f} ms median")
        print(f"kill, master -> node 2: {kill_latency(b, None, '2'):.2f} ms median")
        return 0
    finally:
        b.down()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The one PID space's costs: forks on a node against the master's, ghosts, kills.

    sudo /opt/bpfs/venv/bin/python bench/pidspace.py [--nodes 3] [--loops 1000] [--ghosts 200]
                                                      [--rounds 3] [--forks-only]
                                                      [--kills-only N]
                                                      [--checkout DIR] [--threads]

Brings up an embedded cluster of this checkout on a temporary mount and measures, in one
sitting, side by side:

  * a fork+exec+wait loop of /bin/true (`--loops` times, timed by the shell itself, so
    bpsh's start-up is not in it) on a node and on the master, taking turns `--rounds`
    times: per-iteration cost, each round's ratio and their median (goal: node at most 2x
    the master), the load average, and the CPU time and context switches the master and
    node daemons spent per fork (/proc/PID/task/*/stat and status: their threads; with
    `--threads`, thread by thread);
  * os.fork() as a program sees it, median, on a node and on the master (the ghost is made
    before the node's child exists: it is in `ps` on the master when fork returns);
  * the master's memory per extra ghost: `--ghosts` sleeping children forked on a node,
    the ghosts' proportional set size (Pss, /proc/PID/smaps_rollup) plus the growth of the
    master daemon's RSS, divided by their number (goal: at most 64 KB);
  * kill(2) from a process on node 1 to one on node 2: the time from the sender's kill to
    the receiver's handler (the machine's one clock), median over 100 (goal: 2 ms); and
    the same between two processes of one node, and from the master to a node.

`--checkout DIR` measures another checkout's cluster with this script (say, main's, to
compare in one sitting). Not a test: prints figures, exit status 0 unless something failed to run. Always brings
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
from typing import Callable

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
    def __init__(self, nodes: int, root: Path = ROOT) -> None:
        self.base = tempfile.mkdtemp(prefix="bpfs-bench-")
        self.mount = os.path.join(self.base, "mnt")
        self.state = os.path.join(self.base, "state")
        os.mkdir(self.mount)
        os.mkdir(self.state)
        self.env = dict(os.environ, PYTHONPATH=str(root), BPROC_MOUNT=self.mount)
        self.nodes = nodes

    def up(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run(cmd("bpfs") + ["up", "--nodes", str(self.nodes), "--mount", self.mount,
                                      "--state-dir", self.state, "--port", str(port),
                                      "--detach"],
                       env=self.env, check=True, capture_output=True, cwd="/")

    def down(self) -> None:
        subprocess.run(cmd("bpfs") + ["down", "--mount", self.mount, "--state-dir",
                                      self.state], env=self.env, capture_output=True, cwd="/")
        shutil.rmtree(self.base, ignore_errors=True)

    def bpsh(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd("bpsh") + list(argv), env=self.env, capture_output=True,
                              check=True, cwd="/", **kw)

    def popen(self, *argv: str) -> subprocess.Popen:
        return subprocess.Popen(cmd("bpsh") + list(argv), env=self.env, cwd="/",
                                stdout=subprocess.PIPE, text=True)

    def _daemon(self, what: str, mine: Callable[[list[bytes]], bool]) -> int:
        """The PID of this cluster's daemon whose command line `mine` says is it."""
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        args = f.read().split(b"\0")
                except OSError:
                    continue
                if self.mount.encode() in args and mine(args):
                    return int(p)
        raise RuntimeError(f"no {what} found")

    def master_pid(self) -> int:
        return self._daemon("master", lambda args: b"master" in args)

    def node_pid(self, n: int) -> int:
        """Node n's daemon (its command line is bpslave's)."""
        return self._daemon(f"node {n}", lambda args: args[0] == b"bpslave" and
                            args[args.index(b"--node") + 1] == str(n).encode())


def spare_lines(b: Bench) -> list[str]:
    """The master's log lines that count a forking process's spares (bpfs/master/spares.py:
    "pid G forked N times on spares, M times asking ..."), what follows "pid"."""
    try:
        text = Path(b.state, "logs", "master.log").read_text(errors="replace")
    except OSError:
        return []
    return [line[line.index("pid "):].split(";")[0] for line in text.splitlines()
            if "times on spares" in line]


def cpu_ms(pid: int) -> float:
    """User + system CPU time of `pid` so far (its threads, ended ones too), in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, tuple[float, int]]:
    """Each live thread of `pid` by name and id: (CPU ms, context switches, voluntary and
    not) so far."""
    out: dict[str, tuple[float, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if "ctxt_switches:" in line)
        out[f"{name} {tid}" + (" (main)" if tid == str(pid) else "")] = (cpu, switches)
    return out


def switches(pid: int) -> int:
    return sum(s for _, s in threads(pid).values())


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
    ap.add_argument("--rounds", type=int, default=3, help="turns of the fork loop")
    ap.add_argument("--forks-only", action="store_true",
                    help="only the fork+exec+wait loop and os.fork()")
    ap.add_argument("--kills-only", type=int, default=0, metavar="N",
                    help="only the kill latencies, N rounds of each")
    ap.add_argument("--checkout", type=Path, default=ROOT,
                    help="the checkout whose cluster is measured (default: this one)")
    ap.add_argument("--threads", action="store_true",
                    help="the daemons' CPU and context switches per fork, thread by thread")
    args = ap.parse_args()
    b = Bench(args.nodes, args.checkout.resolve())
    try:
        b.up()
        if args.kills_only:
            return kills(b, args.kills_only)
        loop = LOOP.format(n=args.loops)
        rows = []
        daemons = (b.master_pid(), b.node_pid(1))
        for _ in range(args.rounds):    # take turns: the machine's other work comes and goes
            load = os.getloadavg()[0]
            cpu = [cpu_ms(p) for p in daemons]
            per = [threads(p) for p in daemons]
            # the job's threads end with it: counted while its shell sleeps a moment
            job = b.popen("1", "sh", "-c", loop + "; sleep 0.5")
            assert job.stdout is not None
            node_ns = int(job.stdout.readline())
            cpu = [(cpu_ms(p) - c) / args.loops for p, c in zip(daemons, cpu)]
            after = [threads(p) for p in daemons]
            job.wait(timeout=60)
            cs = [sum(s for _, s in a.values()) - sum(s for _, s in p.values())
                  for a, p in zip(after, per)]
            master_ns = int(subprocess.run(["sh", "-c", loop], capture_output=True,
                                           check=True).stdout)
            rows.append((node_ns, master_ns))
            print(f"  node {node_ns / 1e6:.2f} ms, master {master_ns / 1e6:.2f} ms: "
                  f"{node_ns / master_ns:.2f}x (load {load:.1f}; CPU per fork: master "
                  f"daemon {cpu[0]:.2f} ms, node daemon {cpu[1]:.2f} ms; context switches per "
                  f"fork: {cs[0] / args.loops:.1f}, {cs[1] / args.loops:.1f})")
            if args.threads:
                for which, a, p in zip(("master", "node"), after, per):
                    for name, (c, s) in sorted(a.items()):
                        c0, s0 = p.get(name, (0.0, 0))
                        if s - s0 > args.loops // 10:
                            print(f"    {which} {name}: {(c - c0) / args.loops:.3f} ms, "
                                  f"{(s - s0) / args.loops:.1f} switches per fork")
        for line in spare_lines(b):     # the master's count of each round's forks
            print(f"    master: {line}")
        node_ns = statistics.median(r[0] for r in rows)
        master_ns = statistics.median(r[1] for r in rows)
        ratio = statistics.median(r[0] / r[1] for r in rows)
        print(f"fork+exec+wait of /bin/true, {args.loops} times: node {node_ns / 1e6:.2f} ms, "
              f"master {master_ns / 1e6:.2f} ms per iteration (medians); median of the "
              f"rounds' ratios {ratio:.2f}x (goal 2x)")
        node_fork = float(b.bpsh("1", PY, "-c", FORKS).stdout)
        master_fork = float(subprocess.run([PY, "-c", FORKS], capture_output=True,
                                           check=True).stdout)
        print(f"os.fork() median: node {node_fork / 1e3:.2f} ms, master "
              f"{master_fork / 1e3:.3f} ms (the ghost is in ps before fork returns)")
        if args.forks_only:
            return 0

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

        return kills(b, 1)
    finally:
        b.down()


def kills(b: Bench, rounds: int) -> int:
    """kill(2)'s latencies, `rounds` times each (the load printed with each)."""
    for _ in range(rounds):
        load = os.getloadavg()[0]
        print(f"kill, node 1 -> node 2: {kill_latency(b, '1', '2'):.2f} ms median (goal 2 ms); "
              f"node 1 -> node 1: {kill_latency(b, '1', '1'):.2f} ms; "
              f"master -> node 2: {kill_latency(b, None, '2'):.2f} ms (load {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

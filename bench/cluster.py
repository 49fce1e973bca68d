#!/usr/bin/env python3
"""Benchmark an embedded cluster: start-up time, CLI latency, daemon memory.

    sudo /opt/bpfs/venv/bin/python bench/cluster.py [--nodes 64] [--runs 30]

Starts `bpfs up --nodes N --detach` on a temporary mount and state directory
(a free port), waits until every node is up, then measures:

  * the time `bpfs up --detach` takes to return, and until all nodes are up;
  * whole-command wall time of `bpstat` (and `bpstat -l`, which reads every
    node's info) as a user runs it, and of `cat $MOUNT/nodes/*/status` (median
    and 90th percentile over --runs runs);
  * the resident memory (VmRSS) of the master and of the node daemons.

The daemons are found without relying on pid files: every process that
appeared during `bpfs up` and is still alive belongs to the cluster; the one
holding /dev/fuse open is the master, the others are node daemons (each node is
a small launcher plus the daemon proper; the table shows the daemon proper, the
largest per node, and the launcher's size separately).

Always tears the cluster down (`bpfs down`, then a lazy unmount if needed).
Needs root, like `bpfs up`. Exit status 0 if every target is met, 1 otherwise.
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
RUNNER = ("import sys; from importlib import import_module as m; sys.argv[0] = {name!r}; "
          "sys.exit(m({module!r}).main())")
MODULES = {"bpfs": "bpfs.cli.bpfs_main", "bpstat": "bpfs.cli.bpstat"}
MB = 1_000_000

# targets: (what, limit, unit)
TARGETS = {"bpstat": 0.150, "cat": 0.020, "master_rss": 80 * MB, "node_rss": 40 * MB}


def command(name: str, python: str) -> list[str]:
    return [python, "-c", RUNNER.format(name=name, module=MODULES[name])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def rss(pid: int) -> int:
    """VmRSS in bytes, 0 if the process is gone or has none (a kernel thread)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def holds_fuse(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
        except OSError:
            continue
    return False


def ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def timed(argv: list[str], env: dict, runs: int) -> list[float]:
    """Wall times of `runs` runs of argv (output discarded); raises if one fails."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"{argv} failed ({r.returncode}): {r.stderr.decode()}")
    return times


def p90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def all_up(mount: str, nodes: int) -> bool:
    try:
        with open(os.path.join(mount, "status")) as f:
            states = [line.split()[1] for line in f if line.strip()]
    except OSError:
        return False
    return len(states) == nodes and all(s == "up" for s in states)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = tempfile.mkdtemp(prefix="bpfs-bench-")
        os.chmod(self.base, 0o755)
        self.mount = os.path.join(self.base, "mnt")
        self.state = os.path.join(self.base, "state")
        os.mkdir(self.mount)
        os.mkdir(self.state)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), BPROC_MOUNT=self.mount,
                        PYTHONDONTWRITEBYTECODE="1")
        self.rows: list[tuple[str, str, str, str]] = []
        self.ok = True

    def bpfs(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(command("bpfs", self.args.python) + list(args), env=self.env,
                              capture_output=True, timeout=timeout, text=True)

    def row(self, what: str, value: str, target: str = "-", met: bool | None = None) -> None:
        self.rows.append((what, value, target, "-" if met is None else "yes" if met else "NO"))
        if met is False:
            self.ok = False

    def up(self) -> set[int]:
        n = self.args.nodes
        before = pids()
        t0 = time.perf_counter()
        r = self.bpfs("up", "--nodes", str(n), "--mount", self.mount, "--state-dir", self.state,
                      "--port", str(free_port()), "--detach")
        t_up = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"bpfs up failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        deadline = time.monotonic() + self.args.timeout
        while not all_up(self.mount, n):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all {n} nodes up after {self.args.timeout}s")
            time.sleep(0.05)
        t_all = time.perf_counter() - t0
        self.row(f"bpfs up --nodes {n} --detach", f"{t_up:.2f} s")
        self.row(f"... until all {n} nodes are up", f"{t_all:.2f} s")
        return pids() - before

    def commands(self) -> None:
        runs, py = self.args.runs, self.args.python
        for label, argv, target in [
            ("bpstat", command("bpstat", py), TARGETS["bpstat"]),
            ("bpstat -l", command("bpstat", py) + ["-l"], None),
            ("cat $MOUNT/nodes/*/status", ["sh", "-c", f"cat {self.mount}/nodes/*/status"],
             TARGETS["cat"]),
        ]:
            times = timed(argv, self.env, runs)
            med = statistics.median(times)
            self.row(f"{label} (median, p90 {p90(times) * 1000:.1f} ms)", f"{med * 1000:.1f} ms",
                     f"{target * 1000:.0f} ms" if target else "-",
                     None if target is None else med <= target)

    def memory(self, new: set[int]) -> None:
        alive = {p for p in new if rss(p)}
        masters = [p for p in alive if holds_fuse(p)]
        if not masters:
            self.row("master RSS", "not found", f"{TARGETS['master_rss'] // MB} MB", False)
        else:
            m = max(masters, key=rss)
            self.row(f"master RSS (pid {m})", f"{rss(m) / MB:.1f} MB",
                     f"{TARGETS['master_rss'] // MB} MB", rss(m) <= TARGETS["master_rss"])
        # The node daemons' restore helpers and the master's tracer doorbell are tiny
        # processes of their own (comm "bpfs-helper", "bpfs-doorbell"): count them apart.
        helpers = {p for p in alive if comm(p).startswith("bpfs-")}
        nodes = alive - set(masters) - helpers
        children = {p for p in nodes if ppid(p) in nodes}          # daemons under launchers
        daemons = sorted(rss(p) for p in (children or nodes))
        launchers = sorted(rss(p) for p in nodes - children) if children else []
        if helpers:
            self.row(f"restore helpers, ghost doorbell (max of {len(helpers)})",
                     f"{max(rss(p) for p in helpers) / MB:.2f} MB")
        if not daemons:
            self.row("node daemon RSS", "not found", f"{TARGETS['node_rss'] // MB} MB", False)
            return
        self.row(f"node daemon RSS (median of {len(daemons)})",
                 f"{statistics.median(daemons) / MB:.1f} MB",
                 f"{TARGETS['node_rss'] // MB} MB",
                 statistics.median(daemons) <= TARGETS["node_rss"])
        self.row("node daemon RSS (max)", f"{daemons[-1] / MB:.1f} MB",
                 f"{TARGETS['node_rss'] // MB} MB", daemons[-1] <= TARGETS["node_rss"])
        if launchers:
            self.row(f"node launcher RSS (median of {len(launchers)})",
                     f"{statistics.median(launchers) / MB:.1f} MB")
        self.row("cluster processes, total RSS",
                 f"{len(alive)}, {sum(rss(p) for p in alive) / MB:.0f} MB")

    def down(self) -> None:
        t0 = time.perf_counter()
        try:
            r = self.bpfs("down", "--mount", self.mount, "--state-dir", self.state, timeout=120)
            if r.returncode == 0:
                self.row("bpfs down", f"{time.perf_counter() - t0:.2f} s")
            else:
                self.row("bpfs down", f"failed ({r.returncode})", "-", False)
                print(r.stderr, file=sys.stderr)
        except subprocess.TimeoutExpired:
            self.row("bpfs down", "timed out", "-", False)
        finally:
            if _mounted(self.mount):
                subprocess.run(["fusermount3", "-u", "-z", self.mount], check=False)
            shutil.rmtree(self.base, ignore_errors=True)

    def print_table(self) -> None:
        widths = [max(len(r[i]) for r in self.rows + [HEAD]) for i in range(4)]
        for r in [HEAD] + self.rows:
            print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")


HEAD = ("measure", "value", "target", "met")


def _mounted(path: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=64, help="simulated nodes (default 64)")
    ap.add_argument("--runs", type=int, default=30, help="runs per timing (default 30, >= 20)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for all up")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the commands")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cluster.py: bpfs up needs root", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        new = bench.up()
        bench.commands()
        bench.memory(new)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        bench.row("error", str(e).splitlines()[0][:60], "-", False)
        print(e, file=sys.stderr)
    finally:
        bench.down()
    bench.print_table()
    return 0 if bench.ok else 1


if __name__ == "__main__":
    sys.exit(main())

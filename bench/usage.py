#!/usr/bin/env python3
"""What remote usage costs: 1,000 processes held by one node, reported every 2 s.

    sudo /opt/bpfs/venv/bin/python bench/usage.py [--procs 1000] [--window 60]
                                                  [--usage-interval 2]

Starts `bpfs up --nodes 2 --detach` (usage interval 2 s, the default) on a temporary
mount, and measures, each over --window seconds and given per minute:

  * CPU seconds of the master and of each node daemon proper (the PID 1 of its
    namespace) with no process held (baseline: heartbeats and empty reports);
  * the same once node 0 holds --procs sleeping processes (`bpsh -N 0 sleep`, each of
    which becomes its own ghost), node 1 none: node 0 minus node 1 is what reading and
    sending the reports costs a node, the master's rise what taking them costs it;
  * the `usage` message for those processes: bytes, and the node's time to read /proc
    and build it (the same functions, run here on the processes' host PIDs);
  * the wall time of `bpstat -p` and `bptop -b -n 1` over them (each read of procs/P/
    status may ask the node for a fresh report; one report answers all).

With --usage-interval 1e6 nodes report once a session and never after: the same run
without the periodic reports, to tell their cost from that of holding the processes.

Always kills what it started and tears the cluster down. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bpfs.node import usage as node_usage  # noqa: E402
from bpfs.wire import messages  # noqa: E402

RUNNER = ("import sys; from importlib import import_module as m; sys.argv[0] = {name!r}; "
          "sys.exit(m({module!r}).main())")
MODULES = {"bpfs": "bpfs.cli.bpfs_main", "bpstat": "bpfs.cli.bpstat", "bptop": "bpfs.cli.bptop",
           "bpsh": "bpfs.cli.bpsh"}
HZ = os.sysconf("SC_CLK_TCK")


def command(name: str) -> list[str]:
    return [sys.executable, "-c", RUNNER.format(name=name, module=MODULES[name])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / HZ


def ns_init(outer: int) -> int:
    """The host PID of the PID 1 of `outer`'s PID namespace (the node daemon proper)."""
    ns = os.readlink(f"/proc/{outer}/ns/pid")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{d}/ns/pid") != ns:
                continue
            for line in open(f"/proc/{d}/status"):
                if line.startswith("NSpid:") and line.split()[-1] == "1":
                    return int(d)
        except OSError:
            continue
    raise RuntimeError(f"no init in the namespace of {outer}")


def daemons(state: str) -> dict[str, int]:
    pids = {p.stem: int(p.read_text().split()[0]) for p in Path(state, "pids").glob("*.pid")}
    out = {"master": pids["master"]}
    for name, pid in pids.items():
        if name.startswith("node-"):
            out[name] = ns_init(pid)
    return out


def per_minute(pids: dict[str, int], window: float) -> dict[str, float]:
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    time.sleep(window)
    return {k: (cpu_seconds(p) - before[k]) * 60 / window for k, p in pids.items()}


def wall(argv: list[str], env: dict, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def host_pids(node_daemon: int) -> list[int]:
    ns = os.readlink(f"/proc/{node_daemon}/ns/pid")
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/ns/pid") == ns \
                    and open(f"/proc/{d}/comm").read().strip() == "sleep":
                out.append(int(d))
        except OSError:
            continue
    return out


def report_cost(pids: list[int]) -> tuple[int, float]:
    """(bytes of one `usage` for `pids`, median seconds to read /proc and build it)."""
    times, size = [], 0
    for _ in range(20):
        t = time.perf_counter()
        at, samples = node_usage.read_samples([(p, 1) for p in pids])
        size = len(messages.encode(node_usage.message(at, samples)))
        times.append(time.perf_counter() - t)
    return size, statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=1000)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--usage-interval", type=float, default=2.0,
                    help="the master's --usage-interval (1e6: one report a session, none after)")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bpfs-bench-usage-")
    mount, state = os.path.join(base, "mnt"), os.path.join(base, "state")
    os.makedirs(mount)
    env = dict(os.environ, PYTHONPATH=str(ROOT), BPROC_MOUNT=mount)
    ghosts: list[subprocess.Popen] = []
    try:
        subprocess.run(command("bpfs") + ["up", "--nodes", "2", "--mount", mount, "--state-dir",
                                          state, "--port", str(free_port()), "--detach",
                                          "--usage-interval", str(args.usage_interval)],
                       env=env, check=True, timeout=120)
        pids = daemons(state)
        idle = per_minute(pids, args.window)
        t = time.perf_counter()
        for _ in range(args.procs):
            ghosts.append(subprocess.Popen(command("bpsh") + ["-N", "0", "sleep", "3600"],
                                           env=env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while len(os.listdir(os.path.join(mount, "procs"))) < args.procs:
            time.sleep(0.2)
        started = time.perf_counter() - t
        time.sleep(3)
        busy = per_minute(pids, args.window)
        size, build = report_cost(host_pids(pids["node-0"]))
        bpstat = wall(command("bpstat") + ["-p"], env)
        bptop = wall(command("bptop") + ["-b", "-n", "1"], env)
        n = args.procs
        print(f"# remote usage, {n} processes held by node 0 (started in {started:.1f} s), "
              f"reports every {args.usage_interval:g} s, {args.window:.0f} s windows\n")
        print("| CPU s per minute | idle | with the processes |\n|---|---:|---:|")
        for k in pids:
            print(f"| {k} | {idle[k]:.3f} | {busy[k]:.3f} |")
        print(f"\n- reporting {n} processes costs node 0 {busy['node-0'] - busy['node-1']:.3f} "
              f"CPU s a minute more than node 1 ({(busy['node-0'] - busy['node-1']) / 30 * 1e3:.1f} "
              f"ms a report); the master {busy['master'] - idle['master']:.3f} s a minute more")
        print(f"- one `usage` for {n} processes: {size} bytes ({size / n:.1f} a process); "
              f"reading /proc and building it: {build * 1e3:.1f} ms")
        print(f"- `bpstat -p` over {n} processes: {bpstat * 1e3:.0f} ms; "
              f"`bptop -b -n 1`: {bptop * 1e3:.0f} ms (medians of 5)")
    finally:
        for g in ghosts:
            try:
                g.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        for g in ghosts:
            g.wait()
        subprocess.run(command("bpfs") + ["down", "--mount", mount, "--state-dir", state],
                       env=env, timeout=120)
        if os.path.ismount(mount):
            subprocess.run(["fusermount3", "-u", "-z", mount])
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

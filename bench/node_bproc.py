#!/usr/bin/env python3
"""/bproc read from a node against the same read on the master.

    sudo /opt/bpfs/venv/bin/python bench/node_bproc.py [--nodes 2] [--runs 500]

Starts `bpfs up --nodes N --detach` on a temporary mount (a free port), then times, on
the master and on node 1 (the same program, run there with bpsh), in the same sitting:

  * `stat`: os.stat of $MOUNT/nodes/0/status (one getattr; attributes are never cached);
  * `read`: os.open, os.read to EOF and os.close of it (on a node: one round trip to the
    master, the open; the reads are answered from the rendering that came with it);
  * `pyread`: Python's open().read() (which also fstats twice: two more getattrs);
  * `cat`: a whole `cat $MOUNT/nodes/0/status` (fork, exec, fstat, read, exit).
Each --runs times in one process (`cat` --runs / 5 times).

On the master the kernel asks the master's FUSE daemon; on the node it asks the node
daemon's, which forwards each operation (lookup, open, read, release) over the node's
connection to the master (bpfs/fs/remote.py). Prints medians and 90th percentiles.
Always tears the cluster down. Needs root, like `bpfs up`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ("import sys; from importlib import import_module as m; sys.argv[0] = {name!r}; "
          "sys.exit(m({module!r}).main())")
MODULES = {"bpfs": "bpfs.cli.bpfs_main", "bpsh": "bpfs.cli.bpsh"}

# Runs where it is started (the master, or a node through bpsh): medians and p90 in ms.
PROBE = r"""
import json, os, statistics, subprocess, sys, time
path, runs = sys.argv[1], int(sys.argv[2])
def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append((time.perf_counter() - t) * 1e3)
    out.sort()
    return {"median": statistics.median(out), "p90": out[int(len(out) * 0.9)]}
def read():
    fd = os.open(path, os.O_RDONLY)
    while os.read(fd, 65536):
        pass
    os.close(fd)
def pyread():
    with open(path, "rb") as f:
        f.read()
def cat():
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
read(); cat()
print(json.dumps({"stat": timed(lambda: os.stat(path), runs), "read": timed(read, runs),
                  "pyread": timed(pyread, runs), "cat": timed(cat, max(10, runs // 5))}))
"""


def command(name: str) -> list[str]:
    return [sys.executable, "-c", RUNNER.format(name=name, module=MODULES[name])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--runs", type=int, default=500)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bpfs-bench-")
    os.chmod(base, 0o755)
    mount, state = os.path.join(base, "mnt"), os.path.join(base, "state")
    env = dict(os.environ, PYTHONPATH=str(ROOT), BPROC_MOUNT=mount)
    up = command("bpfs") + ["up", "--nodes", str(args.nodes), "--mount", mount, "--state-dir",
                            state, "--port", str(free_port()), "--detach"]
    try:
        subprocess.run(up, env=env, check=True, cwd="/", timeout=120)
        target = os.path.join(mount, "nodes", "0", "status")
        probe = [sys.executable, "-c", PROBE, target, str(args.runs)]
        results = {}
        for where, argv in (("master", probe), ("node 1", command("bpsh") + ["1", *probe])):
            out = subprocess.run(argv, env=env, check=True, cwd="/", capture_output=True,
                                 timeout=600).stdout
            results[where] = json.loads(out)
        print(f"{'what':<34} {'master':>16} {'node 1':>16}   (ms: median / p90)")
        for what, label in (("stat", "stat nodes/0/status"),
                            ("read", "open+read+close nodes/0/status"),
                            ("pyread", "open().read() (2 fstats more)"),
                            ("cat", "cat nodes/0/status (fork+exec)")):
            cells = [f"{r[what]['median']:.3f} / {r[what]['p90']:.3f}" for r in results.values()]
            print(f"{label:<34} {cells[0]:>16} {cells[1]:>16}")
        return 0
    finally:
        subprocess.run(command("bpfs") + ["down", "--mount", mount, "--state-dir", state],
                       env=env, cwd="/", timeout=120, capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", mount], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

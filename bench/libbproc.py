#!/usr/bin/env python3
"""Benchmark libbproc against bpsh: what a program pays for BProc's calls.

    sudo /opt/bpfs/venv/bin/python bench/libbproc.py [--nodes 4] [--runs 30]

Starts an embedded cluster on a temporary mount, builds libbproc from this checkout
(libbproc/build, as bootstrap does) and a small C program against it, then measures
(medians over --runs runs, whole commands as a shell would run them):

  * `prog execmove 1 /bin/true` (the program becomes the ghost of `true` on node 1)
    against `bpsh 1 true`, with stdout on /dev/null (no forwarder) and on a pipe the
    benchmark reads (the forwarder carries it);
  * `prog vexecmove 0..N-1 /bin/true` (waits for every rank) against `bpsh 0-(N-1) true`;
  * the cost of one bproc_currnode, bproc_numnodes and bproc_nodestatus call, in the
    program (10,000 calls each).

Always tears the cluster down. Needs root, like `bpfs up`. Prints a table; no targets.
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
PROG = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <sys/bproc.h>
extern char **environ;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    char *targv[] = {"true", NULL}, st[16];
    if (!strcmp(argv[1], "execmove")) { bproc_execmove(atoi(argv[2]), "/bin/true", targv, environ); return 1; }
    if (!strcmp(argv[1], "vexecmove")) {
        int n = atoi(argv[2]), nodes[256], pids[256];
        for (int i = 0; i < n; i++) nodes[i] = i;
        if (bproc_vexecmove(n, nodes, pids, "/bin/true", targv, environ) != n) return 1;
        for (int i = 0; i < n; i++) if (pids[i] > 0) waitpid(pids[i], NULL, 0);
        return 0;
    }
    double t = now();
    for (int i = 0; i < 10000; i++) bproc_currnode();
    double a = now(); for (int i = 0; i < 10000; i++) bproc_numnodes();
    double b = now(); for (int i = 0; i < 10000; i++) bproc_nodestatus(1, st, sizeof st);
    double c = now();
    printf("%.2f %.2f %.2f\n", (a - t) * 1e2, (b - a) * 1e2, (c - b) * 1e2);  /* us per call */
    return 0;
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv: list[str], env: dict, runs: int, pipe: bool) -> float:
    samples = []
    for _ in range(runs + 3):
        t = time.perf_counter()
        r = subprocess.run(argv, env=env, stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
        samples.append(time.perf_counter() - t)
        if r.returncode:
            raise SystemExit(f"{argv} failed: {r.returncode}")
    return statistics.median(samples[3:]) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--runs", type=int, default=30)
    opts = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bpfs-bench-libbproc-"))
    os.chmod(base, 0o755)
    mount, state = base / "mnt", base / "state"
    mount.mkdir()
    state.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), BPROC_MOUNT=str(mount))
    bpfs = [sys.executable, "-m", "bpfs.cli.bpfs_main"]
    try:
        subprocess.run(bpfs + ["up", "--nodes", str(opts.nodes), "--mount", str(mount),
                               "--state-dir", str(state), "--port", str(free_port()), "--detach"],
                       env=env, check=True, timeout=120, capture_output=True)
        subprocess.run([str(ROOT / "libbproc" / "build"), str(base / "lib"), str(base / "inc")],
                       check=True, timeout=60)
        (base / "prog.c").write_text(PROG)
        prog = str(base / "prog")
        subprocess.run(["gcc", "-O2", f"-I{base / 'inc'}", str(base / "prog.c"), "-o", prog,
                        f"-L{base / 'lib'}", "-lbproc", f"-Wl,-rpath,{base / 'lib'}"], check=True)
        bpsh = [str(ROOT / "bin" / "bpsh")]
        last = opts.nodes - 1
        rows = [
            ("execmove 1 true, stdout /dev/null", [prog, "execmove", "1"], bpsh + ["1", "true"], False),
            ("execmove 1 true, stdout a pipe", [prog, "execmove", "1"], bpsh + ["1", "true"], True),
            (f"vexecmove 0-{last} true, stdout /dev/null", [prog, "vexecmove", str(opts.nodes)],
             bpsh + [f"0-{last}", "true"], False),
            (f"vexecmove 0-{last} true, stdout a pipe", [prog, "vexecmove", str(opts.nodes)],
             bpsh + [f"0-{last}", "true"], True),
        ]
        print(f"| what ({opts.runs} runs, medians) | libbproc (C) | bpsh |\n|---|---:|---:|")
        for what, ours, theirs, pipe in rows:
            print(f"| {what} | {timed(ours, env, opts.runs, pipe):.1f} ms | "
                  f"{timed(theirs, env, opts.runs, pipe):.1f} ms |")
        calls = subprocess.run([prog, "calls"], env=env, capture_output=True, text=True,
                               check=True).stdout.split()
        print(f"| one bproc_currnode / numnodes / nodestatus call | {calls[0]} / {calls[1]} / "
              f"{calls[2]} us | - |")
    finally:
        subprocess.run(bpfs + ["down", "--mount", str(mount), "--state-dir", str(state)],
                       env=env, timeout=60, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

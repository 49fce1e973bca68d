"""Moving a running process: dump_running + restore of a program holding 1 MB, 100 MB and 1 GB
of touched anonymous memory (no zero page in it), on a loop node. Prints a table of medians.
The holder is a small C program (built with gcc here), so the figures are the engine's, not
an interpreter's own megabytes; `--python` holds the memory in python3 instead.

Columns (milliseconds unless said):
  stop      seize_running + stop (PTRACE_SEIZE, PTRACE_INTERRUPT, the stop's wait)
  dump      dump_running: checks, registers, maps, pagemap, pages -> Image
  dumps     the image's header to msgpack (dumps_parts: the runs follow as they are)
  send      the image to the loop node and its answer back (socket, msgpack framing)
  loads     the node's loads (msgpack + checks)
  restore   the node's Restorer.restore
  total     stop + dump + dumps + send + loads + restore: from running here to running there
  MB/s      touched MB / total;  best: the smallest total (the machine is shared)
Goals: 1 MB <= 10 ms, 100 MB <= 150 ms, 1 GB <= 1.5 s (total).

Run as root:  /opt/bpfs/venv/bin/python bench/move_engine.py [--runs 3] [--sizes 1,100,1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bpfs.migrate import image, running  # noqa: E402
from bpfs.migrate.loopnode import LoopNode  # noqa: E402

C_HOLDER = r"""
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t n = strtoull(argv[1], 0, 10);
    char *mem = malloc(n);
    for (size_t i = 0; i < n; i++) mem[i] = (char)((0x5a ^ (i >> 12)) | 1);
    puts("ready");
    fflush(stdout);
    while (access(argv[2], F_OK) != 0) usleep(2000);
    return mem[n / 2] == 0;
}
"""
PY_HOLDER = ("import os, sys, time\n"
             "mem = bytearray(b'\\x5a\\xa5' * 2048) * (int(sys.argv[1]) // 4096)\n"
             "print('ready', flush=True)\n"
             "while not os.path.exists(sys.argv[2]):\n"
             "    time.sleep(0.002)\n")


def one(node: LoopNode, holder_argv: list[str], size: int, flag: str) -> dict[str, float]:
    holder = subprocess.Popen([*holder_argv, str(size), flag],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout.readline() == b"ready\n"
        t0 = time.perf_counter()
        running.seize_running(holder.pid)
        running.stop(holder.pid)
        t1 = time.perf_counter()
        img = running.dump_running(holder.pid, {0, 1, 2})
        t2 = time.perf_counter()
        data = image.dumps_parts(img)   # sent part by part: the runs are not joined
        t3 = time.perf_counter()
        rep = node.restore(data, pid=img.pid, wait=False)
        t4 = time.perf_counter()
        del data, img
    finally:
        running.discard(holder.pid)
        holder.wait()
        holder.stdout.close()
    open(flag, "w").close()
    node.wait(rep["pid"])
    os.unlink(flag)
    return {"stop": t1 - t0, "dump": t2 - t1, "dumps": t3 - t2,
            "send": t4 - t3 - rep["t_restore"], "loads": rep["t_loads"],
            "restore": rep["t_restore"] - rep["t_loads"], "total": t4 - t0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="1,100,1024", help="MB, comma-separated")
    ap.add_argument("--python", action="store_true", help="hold the memory in python3")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bpfs-move-bench-")
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp)


def run(args: argparse.Namespace, tmp: str) -> int:
    flag = os.path.join(tmp, "go")
    holder = ["/usr/bin/python3", "-S", "-c", PY_HOLDER]
    if not args.python:
        with open(os.path.join(tmp, "holder.c"), "w") as f:
            f.write(C_HOLDER)
        holder = [os.path.join(tmp, "holder")]
        subprocess.run(["gcc", "-O2", "-o", holder[0], os.path.join(tmp, "holder.c")],
                       check=True)
    cols = ["stop", "dump", "dumps", "send", "loads", "restore", "total"]
    print(f"{'MB':>6} " + " ".join(f"{c:>8}" for c in cols) + f" {'MB/s':>8} {'best':>8}")
    with LoopNode() as node:
        for mb in (int(s) for s in args.sizes.split(",")):
            one(node, holder, mb << 20, flag)   # warm-up: the first big buffers cost compaction
            runs = [one(node, holder, mb << 20, flag) for _ in range(args.runs)]
            med = {c: statistics.median(r[c] for r in runs) for c in cols}
            best = min(r["total"] for r in runs)
            print(f"{mb:>6} " + " ".join(f"{med[c] * 1000:>8.1f}" for c in cols)
                  + f" {mb / med['total']:>8.0f} {best * 1000:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

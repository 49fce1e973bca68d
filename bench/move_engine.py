"""Moving a running process: dump_running + restore of a program holding 1 MB, 100 MB and 1 GB
of touched anonymous memory (no zero page in it), on a loop node. Prints a table of medians.

Columns (milliseconds unless said):
  stop      seize_running + stop (PTRACE_SEIZE, PTRACE_INTERRUPT, the stop's wait)
  dump      dump_running: checks, registers, maps, pagemap, pages -> Image
  dumps     the image's header to msgpack (dumps_parts: the runs follow as they are)
  send      the image to the loop node and its answer back (socket, msgpack framing)
  loads     the node's loads (msgpack + checks)
  restore   the node's Restorer.restore
  total     stop + dump + dumps + send + loads + restore: from running here to running there
  MB/s      touched MB / total
Goals: 1 MB <= 10 ms, 100 MB <= 150 ms, 1 GB <= 1.5 s (total).

Run as root:  /opt/bpfs/venv/bin/python bench/move_engine.py [--runs 3] [--sizes 1,100,1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bpfs.migrate import image, running  # noqa: E402
from bpfs.migrate.loopnode import LoopNode  # noqa: E402

HOLDER = ("import os, sys, time\n"
          "mem = bytearray(b'\\x5a\\xa5' * 2048) * (int(sys.argv[1]) // 4096)\n"
          "print('ready', flush=True)\n"
          "while not os.path.exists(sys.argv[2]):\n"
          "    time.sleep(0.002)\n")


def one(node: LoopNode, size: int, flag: str) -> dict[str, float]:
    holder = subprocess.Popen(["/usr/bin/python3", "-S", "-c", HOLDER, str(size), flag],
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
    args = ap.parse_args()
    flag = os.path.join(tempfile.mkdtemp(prefix="bpfs-move-bench-"), "go")
    cols = ["stop", "dump", "dumps", "send", "loads", "restore", "total"]
    print(f"{'MB':>6} " + " ".join(f"{c:>8}" for c in cols) + f" {'MB/s':>8}")
    with LoopNode() as node:
        for mb in (int(s) for s in args.sizes.split(",")):
            one(node, mb << 20, flag)   # warm-up: the first big buffers cost page compaction
            runs = [one(node, mb << 20, flag) for _ in range(args.runs)]
            med = {c: statistics.median(r[c] for r in runs) for c in cols}
            print(f"{mb:>6} " + " ".join(f"{med[c] * 1000:>8.1f}" for c in cols)
                  + f" {mb / med['total']:>8.0f}", flush=True)
    os.rmdir(os.path.dirname(flag))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""One move, two checkouts, in pairs: a fair before/after on a machine others load.

    sudo /opt/bpfs/venv/bin/python bench/move_ab.py --old DIR [--sizes 100,1024]
                                                    [--runs 10] [--kind n->n]

Brings up two embedded clusters of 3 nodes at once, one of the checkout at DIR (`old`)
and one of this checkout (`new`), and for each size makes `--runs` pairs of the same move
(bench/move.py's holder, its moves up to `--kind`), old then new, new then old, turn about:
both sides of a pair see about the same load. Prints for each side the median and best
`runs` time (the process's own stamp of its arrival, as bench/move.py), and the median of
the pairs' new/old ratios; and the CPU time the cluster's daemons (master and nodes, every
thread) spent from the write to the arrival, a figure the machine's other load changes
less. Each holder's memory is checked at the end, as bench/move.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from move import KINDS, Bench, Holder, host_of, ms  # noqa: E402


def cpu(b: Bench) -> float:
    """CPU seconds (user + system, every thread) of the daemons of `b`'s cluster: the
    processes whose command line names its mount."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if b.mount.encode() not in f.read():
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def one(b: Bench, mb: int, kind: str) -> tuple[float, float]:
    """A new holder, moved up to `kind`: (seconds until it ran on that move's target, CPU
    seconds of the daemons meanwhile)."""
    last = [k for k, _ in KINDS].index(kind)
    h = Holder(subprocess.Popen([b.holder, str(mb)], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True), mb)
    try:
        for k, target in KINDS[:last + 1]:
            c0 = cpu(b)
            _, t_ns = b.move(h.pid, target)
            took = (h.arrived(host_of(target)) - t_ns) / 1e9
            used = cpu(b) - c0
        h.finish()
    finally:
        h.kill()
    return took, used


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the other checkout (its top directory)")
    ap.add_argument("--sizes", default="100,1024", help="MB, comma-separated")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--kind", default="n->n", choices=[k for k, _ in KINDS])
    args = ap.parse_args()
    old, new = Bench(3), Bench(3)
    old.env["PYTHONPATH"] = os.path.abspath(args.old)
    try:
        old.up()
        new.up()
        print(f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
              f"{os.cpu_count()} cores; {args.kind}, `runs` in ms")
        for mb in (int(s) for s in args.sizes.split(",") if s):
            one(old, mb, args.kind)             # warm-up
            one(new, mb, args.kind)
            got: dict[str, list[float]] = {"old": [], "new": []}
            used: dict[str, list[float]] = {"old": [], "new": []}
            for k in range(args.runs):
                order = (("old", old), ("new", new)) if k % 2 == 0 else \
                    (("new", new), ("old", old))
                for name, b in order:
                    took, spent = one(b, mb, args.kind)
                    got[name].append(took)
                    used[name].append(spent)
            ratio = statistics.median(n / o for o, n in zip(got["old"], got["new"]))
            for name in ("old", "new"):
                t = got[name]
                print(f"{mb:>5} MB {name}: median {ms(statistics.median(t))}, best "
                      f"{ms(min(t))}, daemons' CPU {ms(statistics.median(used[name]))}; all "
                      f"{' '.join(ms(x) for x in t)}", flush=True)
            print(f"{mb:>5} MB new/old, median of {args.runs} pairs: {ratio:.2f}", flush=True)
        print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    finally:
        old.down()
        new.down()


if __name__ == "__main__":
    sys.exit(main())

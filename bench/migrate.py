"""Benchmark of migration by ptrace: master and node as two local processes, the node (a
`LoopNode`) in its own PID + mount namespaces. Prints a table of medians over --runs runs.

Columns (milliseconds unless said):
  local     fork+exec+wait of the program here (posix_spawn, the baseline)
  launch    fork+exec traced until stopped at AT_ENTRY
  dump      registers, xstate, maps, pagemap, pages, hashes -> Image
  ref KB    image bytes with libraries by reference; content KB: with every file inline
  xfer      sending the image to the node and getting the answer, minus the node's restore time
  restore   node: check, clone3 from the helper, batches, writes, detach
  e2e       launch start -> process running on the node;  e2e/local = e2e / local
  done      launch start -> the node reports the process's exit (compare with `local`)

Run as root:  /opt/bpfs/venv/bin/python bench/migrate.py [--runs 20] [--only true]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bpfs.migrate import dump, image  # noqa: E402
from bpfs.migrate.loopnode import LoopNode  # noqa: E402

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C", "HOME": "/"}
PROGRAMS = {
    "true": ["/bin/true"],
    "echo": ["/bin/echo", "hello"],
    "date": ["/bin/date", "-u", "-d", "@0"],
    "ls": ["/bin/ls", "/"],
    "df -h": ["/bin/df", "-h"],
    "sh -c": ["/bin/sh", "-c", "echo $$"],
    "bash -c": ["/bin/bash", "-c", "for i in 1 2 3; do :; done"],
    "perl -e": ["/usr/bin/perl", "-e", "1"],
    "python3 -c": ["/usr/bin/python3", "-c", "pass"],
    "venv python": ["/opt/bpfs/venv/bin/python", "-c", "pass"],
}


def local_run(argv: list[str], devnull: int) -> float:
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, ENV, file_actions=[
        (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
        (os.POSIX_SPAWN_DUP2, devnull, 2)])
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def one(node: LoopNode, argv: list[str], devnull: int) -> dict[str, float]:
    t0 = time.perf_counter()
    pid = dump.launch(argv, ENV, "/")
    try:
        t1 = time.perf_counter()
        img = dump.dump(pid)
        data = image.dumps(img)
        t2 = time.perf_counter()
    finally:
        dump.kill(pid)
    t2b = time.perf_counter()
    rep = node.restore(data, pid=img.pid, fds=(devnull, devnull, devnull), wait=False)
    t3 = time.perf_counter()
    node.wait(rep["pid"])
    t4 = time.perf_counter()
    kill_cost = t2b - t2
    return {"launch": t1 - t0, "dump": t2 - t1, "xfer": t3 - t2b - rep["t_restore"],
            "restore": rep["t_restore"], "e2e": t3 - t0 - kill_cost,
            "done": t4 - t0 - kill_cost, "ref": len(data), "content": _content_size(img)}


def _content_size(img: image.Image) -> int:
    full = dump.read_contents(img, [f.hash for f in img.files])
    return len(image.dumps(image.Image(**{**img.__dict__, "contents": full})))


def main() -> int:
    ap = argparse.ArgumentParser(description="migration benchmark")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    devnull = os.open("/dev/null", os.O_RDWR)
    cols = ["local", "launch", "dump", "ref KB", "content KB", "xfer", "restore", "e2e",
            "e2e/local", "done"]
    print(f"{'program':<12}" + "".join(f"{c:>11}" for c in cols))
    with tempfile.TemporaryDirectory(prefix="bpfs-bench-") as cache, LoopNode(cache) as node:
        for name, argv in PROGRAMS.items():
            if args.only and name not in args.only:
                continue
            one(node, argv, devnull)  # warm: hashes, node cache
            local_run(argv, devnull)
            locs = [local_run(argv, devnull) for _ in range(args.runs)]
            runs = [one(node, argv, devnull) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            loc = statistics.median(locs)
            row = [loc * 1e3, med["launch"] * 1e3, med["dump"] * 1e3, med["ref"] / 1024,
                   med["content"] / 1024, med["xfer"] * 1e3, med["restore"] * 1e3,
                   med["e2e"] * 1e3, med["e2e"] / loc, med["done"] * 1e3]
            print(f"{name:<12}" + "".join(f"{v:>11.2f}" for v in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

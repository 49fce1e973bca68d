#!/usr/bin/env python3
"""`bpsh -a true` on K nodes for several git revisions, side by side in one sitting.

    sudo /opt/bpfs/venv/bin/python bench/bpsh_ab.py [--nodes 32] [--runs 10] [--rounds 4]
                                                    [--output null|pipe] REV...

What a change to the run's hot path is worth, measured where it matters (a whole
multi-node run, 32 simulated nodes on this machine) and robustly enough on a
machine where other work comes and goes: every revision gets its own embedded
cluster (a clean `git archive` export on PYTHONPATH, its own mount and port, bpsh
through an `-ISOO` launcher as bootstrap installs it), and the revisions take turns,
--runs each per round, the order reversed every other round. Prints, per revision,
the median and first quartile of the wall time and the median CPU per run of the
whole cluster (master and node daemons, with their children) plus bpsh and its
children (the ghosts). Not a test: no target, no exit status but for errors.

Root, loopback only; every cluster is brought down in `finally`.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def export(rev: str, dest: str) -> None:
    os.makedirs(dest)
    subprocess.run(f"git -C {ROOT} archive {rev} | tar -x -C {dest}", shell=True, check=True)
    for opt in ([], ["-OO"]):       # the daemons' bytecode, and the bpsh launcher's
        subprocess.run([PY, *opt, "-m", "compileall", "-q", f"{dest}/bpfs"], check=True)


def launcher(src: str) -> str:
    path = os.path.join(src, "bpsh-fast")
    site = next(p for p in sys.path if p.endswith("site-packages"))
    with open(path, "w") as f:
        f.write(f"#!{PY} -ISOO\nimport sys\nsys.path.insert(0, {src!r})\n"
                f"sys.path.append({site!r})\nfrom bpfs.cli.bpsh import console\nconsole()\n")
    os.chmod(path, 0o755)
    return path


def cluster_pids(mount: str) -> list[int]:
    """The master and the node daemons of the cluster on `mount` (by command line)."""
    needle = mount.encode() + b"\0"
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if needle in open(f"/proc/{p}/cmdline", "rb").read():
                    pids.append(int(p))
            except OSError:
                continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime of `pids`."""
    total = 0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(map(int, fields[11:15]))
    return total / TICK


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="+", metavar="REV")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--runs", type=int, default=10, help="runs per revision per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--port", type=int, default=2400, help="first master port")
    ap.add_argument("--output", choices=("null", "pipe"), default="null",
                    help="bpsh's stdout: /dev/null (hyperfine's default, as bpsh_peers.py "
                         "runs every peer) or a pipe that is read; stdin and stderr are "
                         "/dev/null either way, as under hyperfine")
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bpfs-ab-")
    variants: list[dict] = []
    try:
        for i, rev in enumerate(a.revs):
            src, mount, state = f"{base}/src{i}", f"{base}/m{i}", f"{base}/state{i}"
            export(rev, src)
            os.makedirs(mount)
            env = dict(os.environ, PYTHONPATH=src, BPROC_MOUNT=mount)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            v = dict(rev=rev, mount=mount, state=state, env=env, bpsh=launcher(src), wall=[],
                     cpu=[])
            variants.append(v)
            subprocess.run([PY, "-m", "bpfs.cli.bpfs_main", "up", "--nodes", str(a.nodes),
                            "--mount", mount, "--state-dir", state, "--port", str(a.port + i),
                            "--detach"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            v["pids"] = cluster_pids(mount)
        for rnd in range(a.rounds):
            for v in variants if rnd % 2 == 0 else variants[::-1]:
                cpu0, kids0 = cpu_seconds(v["pids"]), os.times()
                for _ in range(a.runs):
                    t = time.perf_counter()
                    subprocess.run([v["bpsh"], "-a", "true"], env=v["env"], check=True,
                                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL if a.output == "null"
                                   else subprocess.PIPE)
                    v["wall"].append(time.perf_counter() - t)
                kids1 = os.times()
                bpsh = (kids1.children_user + kids1.children_system
                        - kids0.children_user - kids0.children_system)
                v["cpu"].append((cpu_seconds(v["pids"]) - cpu0 + bpsh) / a.runs)
        for v in variants:
            print(f"{v['rev']:>12}: wall median {statistics.median(v['wall']) * 1e3:6.1f} ms"
                  f"  p25 {statistics.quantiles(v['wall'], n=4)[0] * 1e3:6.1f} ms"
                  f"  CPU per run {statistics.median(v['cpu']) * 1e3:6.1f} ms")
    finally:
        for v in variants:
            subprocess.run([PY, "-m", "bpfs.cli.bpfs_main", "down", "--mount", v["mount"],
                            "--state-dir", v["state"]],
                           env=v["env"], stdout=subprocess.DEVNULL, check=False)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

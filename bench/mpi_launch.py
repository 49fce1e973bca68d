#!/usr/bin/env python3
"""Open MPI's hello world launched through bprsh, through ssh and under Slurm, in one sitting.

    sudo /opt/bpfs/venv/bin/python bench/mpi_launch.py [--runs 5] [--sizes 4,16,32]

Issue #16's bench: the wall time of `mpirun.openmpi ... tests/cluster/mpi_hello.c` (compiled
with mpicc.openmpi into a temp dir), from mpirun's start to its exit, with K ranks, for K in
--sizes. In one run:
  1. peers-up (/work/shared/peers, a private instance: own PEERS_DIR, netns, sshd port) and
     an embedded bpfs cluster of --nodes (32) on a temporary mount (`bpfs up --detach`, the
     checkout's code through PYTHONPATH), as bench/bpsh_peers.py starts them;
  2. for each K, three launches of the same program by the same mpirun:
       bpfs   mpirun --mca plm_rsh_agent BPRSH --host n0,..,nK-1 -np K   (1 rank a node;
              BPRSH is bprsh as bootstrap installs it, pointing at the checkout; the
              names from the cluster's hosts file through libnss_bproc, BPFS_HOSTS)
       ssh    mpirun --mca plm_rsh_agent SSHWRAP --host n0,..,nK-1 -np K (1 rank a node;
              SSHWRAP is `$PEERS_SSH HOST` plus, on the remote side, TMPDIR=/tmp/.../HOST
              and BPFS_HOSTS; see SSH_NOTES)
       slurm  $PEERS_SRUN salloc -N min(K,8) --ntasks-per-node=1 mpirun --map-by
              ppr:R:node --oversubscribe -np K (Open MPI's plm slurm starts its daemons
              with srun; the peers' Slurm has 8 nodes, so R = K/8 ranks a node above 8);
     every run with `--mca btl self,tcp` (see SLURM_NOTES) and `--bind-to none` (every
     "node" is this machine's 2 cores: Open MPI would bind each node's ranks to the same
     cores), stdout a pipe this script
     reads and checks (K lines, the right size and sum); the order of the three rotated
     every round, after one untimed warm-up round;
  3. prints the medians, the ratios bpfs/ssh and bpfs/srun, and writes them with the
     date, the machine's load and the exact commands to --results (bench/results-mpi.md).
A launcher that cannot run here is reported with its reason and the others go on.
Tears down what it started, in `finally`: `bpfs down` and `peers-down` (by their PIDs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
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
PEERS = Path("/work/shared/peers")
PY = "/opt/bpfs/venv/bin/python"
HELLO = ROOT / "tests" / "cluster" / "mpi_hello.c"
SLURM_NODES = 8                       # peers-up starts slurmd n[0-7]
TOOLS = ("bpfs", "ssh", "slurm")
COMMON = ["--allow-run-as-root", "--mca", "btl", "self,tcp", "--bind-to", "none"]

SSH_NOTES = (
    "Every ssh node nN is the one sshd of the peers on 127.0.0.1 (their ssh_config), so all "
    "K Open MPI daemons run on this machine as user peerbench. Two things make that work, "
    "both in the agent wrapper (one `sh` exec): the names n0..n63 resolve, for mpirun and "
    "for the daemons, to distinct loopback addresses 127.2.0.N+1 (a hosts file read by "
    "libnss_bproc through BPFS_HOSTS; unresolved, each lookup waits ~5 s for DNS, and "
    "127.0.0.1 would make mpirun take every node for itself), and each daemon gets "
    "TMPDIR=/tmp/.../nN (the daemons share the machine's host name, so their session "
    "directories collide: `mkdir ... File exists`, orte_init failed)."
)
SLURM_NOTES = (
    "`srun --mpi=pmix -N K ./hello` (direct launch) cannot run here: every slurmd of the "
    "peers is on this machine and the pmix plugin of each step creates the same "
    "/tmp/spmix_appdir_<uid>_<job>.<step> (`File exists`, `pmixp_libpmix_init() failed`, "
    "task launch failed). So the Slurm row is mpirun under salloc, Open MPI's plm slurm "
    "starting one orted a node with srun. The peers' Slurm has 8 nodes: above 8 ranks it "
    "runs K/8 ranks a node (fewer daemons to start than the others' K). Two ranks of one "
    "Slurm node on this machine crashed in the shared-memory BTL (vader, SIGSEGV in "
    "MPI_Allreduce: the daemons share a session directory), so every run, of every "
    "launcher, uses `--mca btl self,tcp` (between nodes, bpfs's and ssh's ranks use tcp "
    "anyway). And `--bind-to none` for all: each \"node\" would bind its ranks to this "
    "machine's first cores."
)


def log(msg: str) -> None:
    print(f"mpi_launch: {msg}", file=sys.stderr, flush=True)


def free_port(avoid: tuple[int, ...] = ()) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def mounted(path: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = tempfile.mkdtemp(prefix="bpfs-mpi-launch-")
        os.chmod(self.base, 0o755)      # the peers' user runs the program from here
        self.mount = os.path.join(self.base, "mnt")
        self.state = os.path.join(self.base, "state")
        self.tmp = os.path.join(self.base, "tmp")
        for d in (self.mount, self.state, self.tmp, os.path.join(self.base, "pyc")):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.tmp, 0o1777)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OMPI_"))}
        self.env = dict(env, PYTHONPATH=str(ROOT), BPROC_MOUNT=self.mount,
                        PYTHONPYCACHEPREFIX=os.path.join(self.base, "pyc"))
        self.hello = os.path.join(self.base, "hello")
        self.program = "/bin/true" if args.launch_only else self.hello
        self.bprsh = os.path.join(self.base, "bprsh")
        self.sshwrap = os.path.join(self.base, "sshwrap")
        self.sshhosts = os.path.join(self.base, "ssh-hosts")
        self.peers_env: dict[str, str] = {}
        self.peers_started = self.cluster_started = False
        self.skip: dict[str, str] = {}                 # tool -> why it cannot run
        self.times: dict[tuple[str, int], list[float]] = {}
        self.fails: dict[tuple[str, int], list[str]] = {}
        self.argvs: dict[tuple[str, int], list[str]] = {}
        self.load_start = loadavg()

    # ---- set-up and tear-down ---------------------------------------------------------

    def peers_up(self) -> None:
        a = self.args
        port = a.peers_port or free_port()
        penv = dict(os.environ, PEERS_DIR=a.peers_dir, PEERS_NETNS=a.peers_netns,
                    PEERS_SSH_PORT=str(port))
        log(f"peers-up (PEERS_DIR={a.peers_dir}, netns {a.peers_netns}, sshd :{port}) ...")
        self.peers_started = True
        r = subprocess.run([str(PEERS / "peers-up")], env=penv, capture_output=True,
                           text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"peers-up failed ({r.returncode}):\n{r.stderr[-3000:]}")
        envfile = os.path.join(a.peers_dir, "env")
        out = subprocess.run(["bash", "-c", f"set -a; source {shlex.quote(envfile)}; env -0"],
                             env={"PATH": os.environ["PATH"]}, stdout=subprocess.PIPE,
                             check=True).stdout.decode()
        self.peers_env = {k: v for k, _, v in (e.partition("=") for e in out.split("\0") if e)
                          if k.startswith("PEERS_")}
        log("peers up")

    def peers_down(self) -> None:
        if not self.peers_started:
            return
        r = subprocess.run([str(PEERS / "peers-down")], capture_output=True, text=True,
                           env=dict(os.environ, PEERS_DIR=self.args.peers_dir), timeout=300)
        log("peers down" if r.returncode == 0 else
            f"peers-down failed ({r.returncode}): {r.stderr[-2000:]}")

    def bpfs(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        argv = [PY, "-c", "import sys; from bpfs.cli.bpfs_main import main; sys.exit(main())"]
        return subprocess.run(argv + list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def cluster_up(self) -> None:
        n = self.args.nodes
        log(f"bpfs up --nodes {n} on {self.mount} ...")
        self.cluster_started = True
        avoid = (self.args.peers_port,) if self.args.peers_port else ()
        r = self.bpfs("up", "--nodes", str(n), "--mount", self.mount, "--state-dir",
                      self.state, "--port", str(free_port(avoid)), "--detach")
        if r.returncode != 0:
            raise RuntimeError(f"bpfs up failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        with open(os.path.join(self.mount, "status")) as f:
            states = [line.split()[1] for line in f if line.strip()]
        if len(states) != n or any(s != "up" for s in states):
            raise RuntimeError(f"not all {n} nodes up: {states}")
        log("cluster up")

    def cluster_down(self) -> None:
        try:
            if self.cluster_started:
                r = self.bpfs("down", "--mount", self.mount, "--state-dir", self.state,
                              timeout=120)
                log("cluster down" if r.returncode == 0 else
                    f"bpfs down failed ({r.returncode}): {r.stderr}")
        except subprocess.TimeoutExpired:
            log("bpfs down timed out")
        finally:
            if mounted(self.mount):
                subprocess.run(["fusermount3", "-u", "-z", self.mount], check=False)

    def prepare(self) -> None:
        """The program, bprsh as bootstrap installs it, the ssh agent and its names."""
        for prog in ("mpicc.openmpi", "mpirun.openmpi"):
            if shutil.which(prog) is None:
                raise RuntimeError(f"{prog} missing (./bootstrap test installs openmpi-bin "
                                   "libopenmpi-dev)")
        subprocess.run(["mpicc.openmpi", "-o", self.hello, str(HELLO)], check=True,
                       capture_output=True, timeout=120)
        os.chmod(self.hello, 0o755)
        with open(self.bprsh, "w") as f:
            f.write(f"#!{PY} -ISOO\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                    "from bpfs.cli.bpsh.rsh import console\nconsole()\n")
        os.chmod(self.bprsh, 0o755)
        if not os.path.exists("/lib/x86_64-linux-gnu/libnss_bproc.so.2"):
            log("libnss_bproc.so.2 is not installed (./bootstrap install): names may not "
                "resolve")
        with open(self.sshhosts, "w") as f:
            f.writelines(f"127.2.0.{i + 1} n{i}\n" for i in range(64))
        os.chmod(self.sshhosts, 0o644)
        ssh = self.peers_env.get("PEERS_SSH")
        if not ssh:
            self.skip["ssh"] = "peers-up gave no PEERS_SSH"
        else:
            remote = f"TMPDIR={self.tmp}/$h BPFS_HOSTS={self.sshhosts}"
            with open(self.sshwrap, "w") as f:
                f.write("#!/bin/sh\n# Open MPI's agent: HOST, then the command line\n"
                        'h=$1; shift\n'
                        f'exec {ssh} "$h" "{remote}" "$@"\n')
            os.chmod(self.sshwrap, 0o755)
        if not self.peers_env.get("PEERS_SRUN"):
            self.skip["slurm"] = "peers-up gave no PEERS_SRUN"

    # ---- the runs ---------------------------------------------------------------------

    def command(self, tool: str, k: int) -> tuple[list[str], dict[str, str]]:
        hosts = ",".join(f"n{i}" for i in range(k))
        mpirun = ["mpirun.openmpi", *COMMON]
        if tool == "bpfs":
            env = dict(self.env, BPFS_HOSTS=os.path.join(self.state, "hosts"))
            return mpirun + ["--mca", "plm_rsh_agent", self.bprsh, "--host", hosts,
                             "-np", str(k), self.program], env
        base = {k_: v for k_, v in os.environ.items() if not k_.startswith("OMPI_")}
        if tool == "ssh":
            env = dict(base, BPFS_HOSTS=self.sshhosts)
            return mpirun + ["--mca", "plm_rsh_agent", self.sshwrap, "--host", hosts,
                             "-np", str(k), self.program], env
        nodes = min(k, SLURM_NODES)
        per = -(-k // nodes)
        return (self.peers_env["PEERS_SRUN"].split() +
                ["salloc", "-N", str(nodes), "--ntasks-per-node=1"] + mpirun +
                ["--map-by", f"ppr:{per}:node", "--oversubscribe", "-np", str(k),
                 self.program]), dict(base)

    def run_one(self, tool: str, k: int, timed: bool) -> None:
        argv, env = self.command(tool, k)
        self.argvs[tool, k] = argv
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=self.base, text=True,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)      # our own session: mpirun and its agents
            try:
                out, err = p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
            why = f"timed out after {self.args.timeout:.0f} s"
        else:
            why = f"exit {p.returncode}" if p.returncode else \
                "" if self.args.launch_only else check(out, k)
        dt = time.monotonic() - t0
        if why:
            detail = " / ".join(line.strip() for line in err.splitlines()
                                if line.strip() and "PMIX ERROR" not in line)[:300]
            self.fails.setdefault((tool, k), []).append(f"{why}: {detail}")
            log(f"{tool} K={k}: FAILED ({why}) {detail[:200]}")
            return
        if timed:
            self.times.setdefault((tool, k), []).append(dt)
        log(f"{tool:5} K={k:<3} {dt:6.2f} s{'' if timed else ' (warm-up)'}")

    def measure(self) -> None:
        tools = [t for t in TOOLS if t not in self.skip]
        for rnd in range(self.args.runs + 1):           # round 0: warm-up, not timed
            for k in self.args.sizes:
                shift = rnd % len(tools)
                for tool in tools[shift:] + tools[:shift]:
                    self.run_one(tool, k, timed=rnd > 0)

    # ---- results ----------------------------------------------------------------------

    def med(self, tool: str, k: int) -> float | None:
        xs = self.times.get((tool, k))
        return statistics.median(xs) if xs else None

    def table(self) -> list[str]:
        lines = ["| ranks (nodes) | bpfs (bprsh) s | ssh s | Slurm (salloc + mpirun) s | "
                 "bpfs/ssh | bpfs/srun |", "|---|---:|---:|---:|---:|---:|"]

        def cell(tool: str, k: int) -> str:
            if tool in self.skip:
                return "not run"
            xs = self.times.get((tool, k), [])
            nf = len(self.fails.get((tool, k), []))
            if not xs:
                return f"failed ({nf})"
            s = f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"
            return s + (f", {nf} failed" if nf else "")

        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}" if a and b else "–"

        for k in self.args.sizes:
            sn = min(k, SLURM_NODES)
            where = f"{k} ({k}; Slurm {sn} × {-(-k // sn)})" if k > sn else f"{k} ({k})"
            b = self.med("bpfs", k)
            lines.append(f"| {where} | {cell('bpfs', k)} | {cell('ssh', k)} | "
                         f"{cell('slurm', k)} | {ratio(b, self.med('ssh', k))} | "
                         f"{ratio(b, self.med('slurm', k))} |")
        return lines

    def report(self) -> None:
        a = self.args
        lines = self.table()
        print("\n".join(lines))
        for tool, why in self.skip.items():
            print(f"{tool}: not run: {why}")
        for (tool, k), fs in sorted(self.fails.items()):
            for f in fs:
                print(f"{tool} K={k}: {f}")
        if not a.results:
            return
        sh = lambda argv: subprocess.run(argv, capture_output=True, text=True).stdout.strip()  # noqa: E731
        mem = next(line.split()[1] for line in open("/proc/meminfo")
                   if line.startswith("MemTotal"))
        rev = sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = " (with uncommitted changes)" if sh(["git", "-C", str(ROOT), "status",
                                                      "--porcelain", "--", "bpfs"]) else ""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out = [
            "# Open MPI's hello world through bprsh, ssh and Slurm", "",
            f"Measured {now} by `bench/mpi_launch.py` on commit {rev}{dirty}.", "",
            f"- machine: Linux {sh(['uname', '-r'])}, {os.cpu_count()} cores, "
            f"{int(mem) / 1024 / 1024:.1f} GiB; load average at the start {self.load_start}, "
            f"at the end {loadavg()} (shared with other work)",
            f"- {sh(['mpirun.openmpi', '--version']).splitlines()[0]}; the program: " +
            ("/bin/true (`--launch-only`: the daemons' launch and teardown, no MPI "
             "wire-up); every run's exit status checked" if a.launch_only else
             "tests/cluster/mpi_hello.c (MPI_Init, rank, size, gethostname, MPI_Allreduce, "
             "printf, MPI_Finalize) built by mpicc.openmpi; every run's output checked "
             "(K lines, size K, sum K(K-1)/2)"),
            f"- time: the whole command, from its start to its exit (stdout a pipe read by "
            f"the script); median (min–max) of {a.runs} runs after one untimed warm-up, "
            "the order of the three launchers rotated every round",
            f"- bpfs: embedded cluster of {a.nodes} nodes (`bpfs up --nodes {a.nodes} "
            "--detach`, this checkout), mpirun with `--mca plm_rsh_agent BPRSH`, BPRSH "
            "being bprsh as bootstrap installs it (`-ISOO` launcher); names by "
            "libnss_bproc from the cluster's hosts file (BPFS_HOSTS); 1 rank a node",
            "- peers: `/work/shared/peers/peers-up`, a private instance; everything on "
            "this one machine",
            f"- ssh: 1 rank a node. {SSH_NOTES}",
            f"- Slurm: {SLURM_NOTES}",
            "", "## Results", "", *lines, "",
        ]
        if self.skip or self.fails:
            out += ["## Not run or failed", ""]
            out += [f"- {t}: not run: {w}" for t, w in self.skip.items()]
            out += [f"- {t} K={k}: {f}" for (t, k), fs in sorted(self.fails.items())
                    for f in fs]
            out.append("")
        out += ["## Commands", "",
                f"Rerun: `sudo {PY} bench/mpi_launch.py` (this run: "
                f"`{' '.join(shlex.quote(x) for x in sys.argv)}`). Paths of this run:", "",
                "```"]
        for (tool, k), argv in sorted(self.argvs.items(), key=lambda x: (x[0][1], x[0][0])):
            out.append(f"{tool} K={k}: {shlex.join(argv)}")
        out += ["```", "", "The ssh agent (SSHWRAP):", "", "```sh"]
        if os.path.exists(self.sshwrap):
            out += Path(self.sshwrap).read_text().splitlines()
        out += ["```", ""]
        Path(a.results).write_text("\n".join(out))
        log(f"wrote {a.results}")


def check(out: str, k: int) -> str:
    """'' if the output is the hello world of K ranks, else what is wrong."""
    got = {}
    for line in out.splitlines():
        w = line.split()
        if len(w) == 8 and w[0] == "rank" and w[2] == "of" and w[6] == "sum":
            got[int(w[1])] = (int(w[3]), int(w[7]))
    want = {r: (k, k * (k - 1) // 2) for r in range(k)}
    return "" if got == want else f"wrong output ({len(got)} of {k} ranks right)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=32, help="bpfs nodes (default 32)")
    ap.add_argument("--sizes", default="4,16,32", help="ranks, 1 a node (default 4,16,32)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds a run may take")
    ap.add_argument("--launch-only", action="store_true",
                    help="run /bin/true, not the hello world: the daemons' launch and "
                         "teardown without MPI_Init's wire-up")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results-mpi.md"),
                    help="markdown file to write ('' for none)")
    ap.add_argument("--peers-dir", default="/tmp/bpfs-peers-mpi")
    ap.add_argument("--peers-netns", default="bpfs-peers-mpi")
    ap.add_argument("--peers-port", type=int, default=0, help="sshd port (default: a free one)")
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    if os.geteuid() != 0:
        print("bench/mpi_launch.py: needs root (bpfs up, peers-up)", file=sys.stderr)
        return 2
    if max(args.sizes) > min(args.nodes, 64):
        print("bench/mpi_launch.py: a size exceeds --nodes (or the peers' 64 ssh names)",
              file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    bench = Bench(args)
    try:
        try:
            try:
                bench.peers_up()
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                bench.skip["ssh"] = bench.skip["slurm"] = f"peers-up: {str(e)[:300]}"
                log(f"peers-up failed, bpfs alone: {e}")
            bench.cluster_up()
            bench.prepare()
            bench.measure()
        finally:
            bench.cluster_down()
            bench.peers_down()
        bench.report()
    finally:
        shutil.rmtree(bench.base, ignore_errors=True)
    return 0 if bench.times else 1


if __name__ == "__main__":
    sys.exit(main())

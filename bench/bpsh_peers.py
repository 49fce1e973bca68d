#!/usr/bin/env python3
"""bpsh next to Slurm, ssh, pdsh and clush: one command, one node, 8, 32; stdio throughput.

    sudo /opt/bpfs/venv/bin/python bench/bpsh_peers.py [--runs 20] [--rounds 3]

In one run:
  1. starts the reference peers with /work/shared/peers/peers-up (a private instance:
     its own PEERS_DIR, netns and sshd port, so another engineer's peers are never
     touched) and sources the env file it writes;
  2. starts an embedded bpfs cluster of --nodes (32) nodes on a temporary mount
     (`bpfs up --detach`, the checkout's code through PYTHONPATH);
  3. times, with hyperfine (-N, --warmup, --runs per round, --export-json), in --rounds
     rounds (command order reversed every other round, groups interleaved), and pools
     the rounds' raw times before taking medians:
       1 node   bpsh 1 true | srun -N1 true | ssh n0 true (fresh, fresh+TCP_NODELAY,
                warm ControlMaster) | /bin/true
       8 nodes  bpsh 0-7 true | srun -N8 true | pdsh -w n[0-7] true | clush -w n[0-7] true
       32 nodes bpsh -a true | pdsh -w n[0-31] true | clush -w n[0-31] true
       stdio    bpsh 1 cat FILE | ssh n0 cat FILE (fresh, warm) | cat FILE, FILE 100 MiB,
                stdout a pipe hyperfine reads (--output=pipe)
     stdin, stdout and stderr are /dev/null (hyperfine's default) but for the stdio group
     and one more bpsh row in each of the others, "stdout a pipe": bpsh gives a node the
     node's /dev/null for an fd that is /dev/null here, so those rows show what one link
     per rank costs;
     srun is timed twice: through $PEERS_SRUN (nsenter + env: two more execs) next to the
     others, and by a hyperfine run inside the Slurm netns (as the peers' baselines did),
     which is the figure the targets use;
  4. prints the tables (medians, interquartile range, bpsh/peer ratios, the targets) and
     writes them with the date, the machine and the exact commands to --results
     (bench/results-bpsh-peers.md);
  5. if a target is missed (or with --profile), profiles where bpsh's time goes:
     interpreter start vs imports vs the client vs the migration (hyperfine), the
     slowest imports (-X importtime), an instrumented run's timeline (bpsh's own
     functions wrapped in the process: status read, fork, ctl write, first connection
     from the node, reap, exit), and bench/migrate.py's dump/restore figures for `true`.

Always tears down what it started, in `finally`: `bpfs down` (then a lazy unmount) and
`peers-down`. Root, loopback only. Exit status 0 if every target is met, 1 otherwise.

Notes: every ssh "node" nN is the same sshd on 127.0.0.1 (peers' ssh_config), and the 8
Slurm nodes are 8 slurmd on this machine; the bpfs nodes are 32 bpslave daemons here too.
Other people's tests may run on the machine meanwhile: medians over interleaved rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path("/work/shared/peers")
PY = "/opt/bpfs/venv/bin/python"
MIB = 1 << 20
FILE_MIB = 100

# targets
T1_RATIO = 0.75         # bpsh 1 true / srun -N1 true
T2_RATIO = 1.0          # bpsh 0-7 true / srun -N8 true (strictly below)
T3_SPEEDUP = 10.0       # pdsh n[0-31] / bpsh -a (32 nodes)
T4_MIBS = 800.0         # bpsh 1 cat 100 MiB | (hyperfine's pipe)


def log(msg: str) -> None:
    print(f"bpsh_peers: {msg}", file=sys.stderr, flush=True)


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


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Cmd:
    key: str                # short label, unique
    group: str
    argv: str               # the command as hyperfine gets it
    netns: bool = False     # run by a hyperfine inside the Slurm netns
    output: str = "null"    # hyperfine --output: stdout on /dev/null, or a pipe it reads
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = tempfile.mkdtemp(prefix="bpfs-bpsh-peers-")
        os.chmod(self.base, 0o755)              # the peers' user reads FILE
        self.mount = os.path.join(self.base, "mnt")
        self.state = os.path.join(self.base, "state")
        self.jsondir = args.json_dir or os.path.join(self.base, "json")
        for d in (self.mount, self.state, self.jsondir, os.path.join(self.base, "pyc")):
            os.makedirs(d, exist_ok=True)
        self.file = os.path.join(self.base, f"file-{FILE_MIB}MiB")
        self.src = ROOT
        if args.git_rev:
            self.src = Path(self.base, "src")
            self.src.mkdir()
            try:
                arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.git_rev,
                                       "bpfs", "bench"], stdout=subprocess.PIPE,
                                      check=True).stdout
                subprocess.run(["tar", "-x", "-C", str(self.src)], input=arch, check=True)
            except (subprocess.CalledProcessError, OSError):
                shutil.rmtree(self.base, ignore_errors=True)
                raise
            for dirpath, _, files in os.walk(self.src):
                os.chmod(dirpath, 0o755)
                for f in files:
                    os.chmod(os.path.join(dirpath, f), 0o644)
        # A user's environment: bytecode cached (in our temp dir, so nothing is written
        # into the tree), output buffered; the checkout's bpfs through PYTHONPATH.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.env = dict(env, PYTHONPATH=str(self.src), BPROC_MOUNT=self.mount,
                        PYTHONPYCACHEPREFIX=os.path.join(self.base, "pyc"))
        self.peers_env: dict[str, str] = {}
        self.peers_dir = args.peers_dir
        self.peers_started = False
        self.cluster_started = False
        self.cmds: dict[str, Cmd] = {}
        self.failures: list[str] = []
        # bpsh as bootstrap installs it (/usr/local/bin/bpsh: an `-ISOO` launcher), here
        # pointing at the checkout under test.
        launcher = os.path.join(self.base, "bpsh")
        with open(launcher, "w") as f:
            f.write(f"#!{PY} -ISOO\nimport sys\nsys.path.insert(0, {str(self.src)!r})\n"
                    "from bpfs.cli.bpsh import console\nconsole()\n")
        os.chmod(launcher, 0o755)
        os.chmod(self.base, 0o755)
        self.bpsh = launcher
        self.profile_lines: list[str] = []
        self.hf_version = ""

    # ---- set-up and tear-down ---------------------------------------------------------

    def peers_up(self) -> None:
        port = self.args.peers_port or free_port()
        penv = dict(os.environ, PEERS_DIR=self.peers_dir, PEERS_NETNS=self.args.peers_netns,
                    PEERS_SSH_PORT=str(port))
        log(f"peers-up (PEERS_DIR={self.peers_dir}, netns {self.args.peers_netns}, "
            f"sshd 127.0.0.1:{port}) ...")
        self.peers_started = True
        r = subprocess.run([str(PEERS / "peers-up")], env=penv, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"peers-up failed ({r.returncode}):\n{r.stderr[-3000:]}")
        envfile = os.path.join(self.peers_dir, "env")
        out = subprocess.run(["bash", "-c", f"set -a; source {shlex.quote(envfile)}; env -0"],
                             env={"PATH": os.environ["PATH"]}, stdout=subprocess.PIPE,
                             check=True).stdout.decode()
        self.peers_env = {k: v for k, _, v in (e.partition("=") for e in out.split("\0") if e)
                          if k.startswith("PEERS_")}
        need = ("PEERS_SSH", "PEERS_SSH_FAST", "PEERS_SSH_MUX", "PEERS_PDSH", "PEERS_CLUSH",
                "PEERS_SRUN", "PEERS_NSENTER", "PEERS_SLURM_CONF")
        missing = [k for k in need if k not in self.peers_env]
        if missing:
            raise RuntimeError(f"{envfile} lacks {missing}")
        log("peers up")

    def peers_down(self) -> None:
        if not self.peers_started:
            return
        r = subprocess.run([str(PEERS / "peers-down")], env=dict(os.environ,
                           PEERS_DIR=self.peers_dir), capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            log(f"peers-down failed ({r.returncode}): {r.stderr[-2000:]}")
        else:
            log("peers down")

    def bpfs(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        argv = [PY, "-c", "import sys; from bpfs.cli.bpfs_main import main; sys.exit(main())"]
        return subprocess.run(argv + list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def cluster_up(self) -> None:
        n = self.args.nodes
        log(f"bpfs up --nodes {n} on {self.mount} ...")
        self.cluster_started = True
        avoid = (int(self.args.peers_port),) if self.args.peers_port else ()
        t0 = time.monotonic()
        r = self.bpfs("up", "--nodes", str(n), "--mount", self.mount, "--state-dir", self.state,
                      "--port", str(free_port(avoid)), "--detach")
        if r.returncode != 0:
            raise RuntimeError(f"bpfs up failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        with open(os.path.join(self.mount, "status")) as f:
            states = [line.split()[1] for line in f if line.strip()]
        if len(states) != n or any(s != "up" for s in states):
            raise RuntimeError(f"not all {n} nodes up: {states}")
        log(f"cluster up in {time.monotonic() - t0:.1f} s")

    def cluster_down(self) -> None:
        try:
            if self.cluster_started:
                r = self.bpfs("down", "--mount", self.mount, "--state-dir", self.state,
                              timeout=120)
                if r.returncode != 0:
                    log(f"bpfs down failed ({r.returncode}): {r.stderr}")
                else:
                    log("cluster down")
        except subprocess.TimeoutExpired:
            log("bpfs down timed out")
        finally:
            if mounted(self.mount):
                subprocess.run(["fusermount3", "-u", "-z", self.mount], check=False)

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def make_file(self) -> None:
        chunk = os.urandom(MIB)
        with open(self.file, "wb") as f:
            for _ in range(FILE_MIB):
                f.write(chunk)
        os.chmod(self.file, 0o644)
        with open(self.file, "rb") as f:           # in the page cache
            while f.read(8 * MIB):
                pass

    # ---- the commands -----------------------------------------------------------------

    def define(self) -> None:
        p, b, n = self.peers_env, self.bpsh, self.args.nodes
        f = self.file
        last = n - 1
        pipe = "pipe"
        rows = [
            Cmd("bpsh 1 true", "1", f"{b} 1 true"),
            Cmd("bpsh 1 true (stdout a pipe)", "1", f"{b} 1 true", output=pipe),
            Cmd("srun -N1 true ($PEERS_SRUN)", "1", f"{p['PEERS_SRUN']} srun -N1 true"),
            Cmd("srun -N1 true (in netns)", "1", "srun -N1 true", netns=True),
            Cmd("ssh n0 true", "1", f"{p['PEERS_SSH']} n0 true"),
            Cmd("ssh n0 true (TCP_NODELAY both ends)", "1", f"{p['PEERS_SSH_FAST']} n0 true"),
            Cmd("ssh n0 true (warm mux)", "1", f"{p['PEERS_SSH_MUX']} n0 true"),
            Cmd("/bin/true", "1", "/bin/true"),
            Cmd("bpsh 0-7 true", "8", f"{b} 0-7 true"),
            Cmd("bpsh 0-7 true (stdout a pipe)", "8", f"{b} 0-7 true", output=pipe),
            Cmd("srun -N8 true ($PEERS_SRUN)", "8", f"{p['PEERS_SRUN']} srun -N8 true"),
            Cmd("srun -N8 true (in netns)", "8", "srun -N8 true", netns=True),
            Cmd("pdsh -w n[0-7] true", "8", f"{p['PEERS_PDSH']} -w 'n[0-7]' true"),
            Cmd("clush -w n[0-7] true", "8", f"{p['PEERS_CLUSH']} -w 'n[0-7]' true"),
            Cmd(f"bpsh -a true ({n} nodes)", "32", f"{b} -a true"),
            Cmd(f"bpsh -a true ({n} nodes, stdout a pipe)", "32", f"{b} -a true", output=pipe),
            Cmd(f"pdsh -w n[0-{last}] true", "32", f"{p['PEERS_PDSH']} -w 'n[0-{last}]' true"),
            Cmd(f"clush -w n[0-{last}] true", "32",
                f"{p['PEERS_CLUSH']} -w 'n[0-{last}]' true"),
            # through a pipe: bpsh's stdout on /dev/null would be the node's /dev/null
            Cmd("bpsh 1 cat FILE", "stdio", f"{b} 1 cat {f}", output=pipe),
            Cmd("ssh n0 cat FILE", "stdio", f"{p['PEERS_SSH']} n0 cat {f}", output=pipe),
            Cmd("ssh n0 cat FILE (warm mux)", "stdio", f"{p['PEERS_SSH_MUX']} n0 cat {f}",
                output=pipe),
            Cmd("cat FILE (local)", "stdio", f"cat {f}", output=pipe),
        ]
        self.cmds = {c.key: c for c in rows}

    def hyperfine(self, cmds: list[Cmd], tag: str, runs: int, warmup: int) -> None:
        """One hyperfine run of `cmds` (same netns and output) adding to their times."""
        out = os.path.join(self.jsondir, f"{tag}.json")
        hf = ["hyperfine", "-N", "--warmup", str(warmup), "--runs", str(runs),
              f"--output={cmds[0].output}", "--style", "none", "--export-json", out]
        env = self.env
        if cmds[0].netns:
            hf = self.peers_env["PEERS_NSENTER"].split() + [
                "env", f"SLURM_CONF={self.peers_env['PEERS_SLURM_CONF']}"] + hf
        r = subprocess.run(hf + [c.argv for c in cmds], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=3600)
        if r.returncode != 0:
            msg = f"hyperfine {tag} failed ({r.returncode}): {r.stderr.strip()[-1500:]}"
            self.failures.append(msg)
            log(msg)
            return
        with open(out) as fh:
            results = json.load(fh)["results"]
        for c, res in zip(cmds, results):
            c.times.extend(res["times"])

    def measure(self) -> None:
        a = self.args
        self.hf_version = subprocess.run(["hyperfine", "--version"], capture_output=True,
                                         text=True).stdout.strip()
        groups = ["1", "8", "32", "stdio"]
        for rnd in range(a.rounds):
            order = groups if rnd % 2 == 0 else groups[::-1]
            for g in order:
                cmds = [c for c in self.cmds.values() if c.group == g]
                batches: dict[tuple[bool, str], list[Cmd]] = {}
                for c in cmds:                  # one hyperfine per netns and output
                    batches.setdefault((c.netns, c.output), []).append(c)
                keys = list(batches) if rnd % 2 == 0 else list(batches)[::-1]
                runs = a.runs_big if g == "32" else a.runs
                log(f"round {rnd + 1}/{a.rounds}: group {g} ({len(cmds)} commands, "
                    f"{runs} runs each)")
                for netns, output in keys:
                    batch = batches[netns, output]
                    tag = f"r{rnd}-{g}" + ("-netns" if netns else "") + \
                        ("" if output == "null" else f"-{output}")
                    self.hyperfine(batch[::-1] if rnd % 2 else batch, tag, runs, a.warmup)

    # ---- results ----------------------------------------------------------------------

    def med(self, key: str) -> float | None:
        c = self.cmds.get(key)
        return c.median if c and c.times else None

    def tables(self) -> tuple[list[str], list[tuple[str, bool | None]]]:
        n = self.args.nodes
        bpsh_of = {"1": "bpsh 1 true", "8": "bpsh 0-7 true", "32": f"bpsh -a true ({n} nodes)",
                   "stdio": "bpsh 1 cat FILE"}
        titles = {"1": "one node", "8": "8 nodes", "32": f"{n} nodes",
                  "stdio": f"stdio, {FILE_MIB} MiB through a pipe"}
        lines = ["| group | command | median ms | p25–p75 ms | runs | MiB/s | bpsh ÷ this |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for g in ("1", "8", "32", "stdio"):
            bm = self.med(bpsh_of[g])
            for c in self.cmds.values():
                if c.group != g:
                    continue
                if not c.times:
                    lines.append(f"| {titles[g]} | `{c.key}` | failed | | 0 | | |")
                    continue
                m = c.median
                iqr = f"{pct(c.times, .25) * 1e3:.1f}–{pct(c.times, .75) * 1e3:.1f}"
                mibs = f"{FILE_MIB / m:.0f}" if g == "stdio" else ""
                ratio = "" if c.key == bpsh_of[g] or bm is None else f"{bm / m:.2f}"
                lines.append(f"| {titles[g]} | `{c.key}` | {m * 1e3:.1f} | {iqr} | "
                             f"{len(c.times)} | {mibs} | {ratio} |")
        # targets
        verdicts: list[tuple[str, bool | None]] = []
        tl = ["| target | bpsh | peer | measured | needed | met |", "|---|---:|---:|---:|---:|---|"]

        def ms(x: float | None) -> str:
            return "–" if x is None else f"{x * 1e3:.1f} ms"

        def add(name: str, bv: float | None, pv: float | None, value: str, need: str,
                ok: bool | None) -> None:
            verdicts.append((name, ok))
            tl.append(f"| {name} | {ms(bv)} | {ms(pv)} | {value} | {need} | "
                      f"{'–' if ok is None else 'yes' if ok else '**NO**'} |")

        b1, s1 = self.med("bpsh 1 true"), self.med("srun -N1 true (in netns)")
        s1p = self.med("srun -N1 true ($PEERS_SRUN)")
        r = b1 / s1 if b1 and s1 else None
        add("bpsh 1 true vs srun -N1 true", b1, s1, "–" if r is None else f"ratio {r:.2f}",
            f"≤ {T1_RATIO}", None if r is None else r <= T1_RATIO)
        b8, s8 = self.med("bpsh 0-7 true"), self.med("srun -N8 true (in netns)")
        r8 = b8 / s8 if b8 and s8 else None
        add("bpsh 0-7 true vs srun -N8 true", b8, s8, "–" if r8 is None else f"ratio {r8:.2f}",
            f"< {T2_RATIO}", None if r8 is None else r8 < T2_RATIO)
        ba, pa = self.med(f"bpsh -a true ({n} nodes)"), self.med(f"pdsh -w n[0-{n - 1}] true")
        sp = pa / ba if ba and pa else None
        add(f"bpsh -a true ({n} nodes) vs pdsh -w n[0-{n - 1}] true", ba, pa,
            "–" if sp is None else f"{sp:.1f}× faster", f"≥ {T3_SPEEDUP:.0f}×",
            None if sp is None else sp >= T3_SPEEDUP)
        bc, sc = self.med("bpsh 1 cat FILE"), self.med("ssh n0 cat FILE")
        mibs = FILE_MIB / bc if bc else None
        add(f"bpsh 1 cat {FILE_MIB} MiB through a pipe", bc, sc,
            "–" if mibs is None else f"{mibs:.0f} MiB/s", f"≥ {T4_MIBS:.0f} MiB/s",
            None if mibs is None else mibs >= T4_MIBS)
        notes = []
        if b1 and s1p:
            notes.append(f"- Against `$PEERS_SRUN srun -N1 true` ({s1p * 1e3:.1f} ms, with "
                         f"nsenter + env) the ratio is {b1 / s1p:.2f}.")
        b8p = self.med("srun -N8 true ($PEERS_SRUN)")
        if b8 and b8p:
            notes.append(f"- Against `$PEERS_SRUN srun -N8 true` ({b8p * 1e3:.1f} ms) the "
                         f"ratio is {b8 / b8p:.2f}.")
        for g, key in (("1", "bpsh 1 true"), ("8", "bpsh 0-7 true"),
                       ("32", f"bpsh -a true ({n} nodes)")):
            bn, bp = self.med(key), self.med(key[:-1] + ", stdout a pipe)" if key.endswith(")")
                                             else key + " (stdout a pipe)")
            if bn and bp:
                peer = {"1": s1, "8": s8, "32": pa}[g]
                vs = "" if not peer else (f"; {peer / bp:.1f}× faster than pdsh" if g == "32"
                                          else f"; ratio to srun {bp / peer:.2f}")
                notes.append(f"- `{key}` with its stdout a pipe (hyperfine --output=pipe: one "
                             f"link per rank; on /dev/null none): {bp * 1e3:.1f} ms{vs}.")
        ca = self.med(f"clush -w n[0-{n - 1}] true")
        if ba and ca:
            notes.append(f"- Against clush on {n} nodes ({ca * 1e3:.0f} ms) bpsh -a is "
                         f"{ca / ba:.1f}× faster.")
        if bc and b1:
            net = bc - b1
            if net > 0:
                notes.append(f"- Net of the start-up (`bpsh 1 cat` − `bpsh 1 true`, "
                             f"{net * 1e3:.1f} ms) the stdio stream runs at "
                             f"{FILE_MIB / net:.0f} MiB/s.")
        sm = self.med("ssh n0 cat FILE (warm mux)")
        if sm:
            notes.append(f"- ssh through the warm ControlMaster: {FILE_MIB / sm:.0f} MiB/s; "
                         f"fresh ssh: {FILE_MIB / sc:.0f} MiB/s." if sc else "")
        return lines + [""] + tl + [""] + [x for x in notes if x], verdicts

    # ---- profile ----------------------------------------------------------------------

    def profile(self) -> None:
        log("profiling bpsh ...")
        P = self.profile_lines
        b = self.bpsh
        runs = self.args.runs
        # 1. start-up layers
        cmds = [Cmd("python -S -c pass", "p", f"{PY} -S -c pass"),
                Cmd("python -c pass", "p", f"{PY} -c pass"),
                Cmd("python -c 'import socket, signal, selectors'", "p",
                    f"{PY} -c 'import socket, signal, selectors'"),
                Cmd("python -c 'import dataclasses'", "p", f"{PY} -c 'import dataclasses'"),
                Cmd("python -c 'import bpfs.cli.bpsh'", "p", f"{PY} -c 'import bpfs.cli.bpsh'"),
                Cmd("python -c 'import bpfs.cli.bpsh, os; os._exit(0)'", "p",
                    f"{PY} -c 'import bpfs.cli.bpsh, os; os._exit(0)'"),
                Cmd("bpsh -h (imports + parse)", "p", f"{b} -h"),
                Cmd("bpsh -1 true (client, no migration)", "p", f"{b} -1 true"),
                Cmd("bpsh -N 1 true (no stdio server)", "p", f"{b} -N 1 true"),
                Cmd("bpsh 1 true", "p", f"{b} 1 true")]
        self.hyperfine(cmds, "profile-layers", runs, self.args.warmup)
        self.hyperfine(cmds[::-1], "profile-layers-2", runs, self.args.warmup)
        P += ["### Layers of `bpsh 1 true` (hyperfine, medians)", "",
              "| command | median ms | Δ to `python -c pass` | Δ to the row above |",
              "|---|---:|---:|---:|"]
        prev = None
        base = cmds[1].median if cmds[1].times else None
        for c in cmds:
            if not c.times:
                P.append(f"| `{c.key}` | failed | | |")
                continue
            d = "" if prev is None else f"{(c.median - prev) * 1e3:+.1f}"
            d0 = "" if base is None else f"{(c.median - base) * 1e3:+.1f}"
            P.append(f"| `{c.key}` | {c.median * 1e3:.1f} | {d0} | {d} |")
            prev = c.median
        # 2. imports
        P += ["", "### Slowest imports of `bpfs.cli.bpsh` (-X importtime, median of 7 runs, "
              "µs)", ""] + self.importtime()
        # 3. instrumented timeline
        n = self.args.nodes
        P += ["", "### Timeline of one bpsh run (bpsh's functions wrapped in-process; median "
              "of the runs, ms since the harness spawned bpsh)", ""]
        P += self.timeline([("1 true", ["1", "true"]), ("0-7 true", ["0-7", "true"]),
                            (f"-a true ({n})", ["-a", "true"])])
        # 4. CPU time by process
        P += ["", "### CPU time per run, by process (utime+stime from /proc, "
              f"{max(10, runs)} sequential runs each; ms per run)", ""] + self.cpu_accounting()
        # 5. migrate.py
        P += ["", "### bench/migrate.py --only true (master dump + node restore in one "
              "process, no FUSE/network; ms)", ""]
        r = subprocess.run([PY, str(self.src / "bench" / "migrate.py"), "--only", "true",
                            "--runs", str(max(10, runs))], env=self.env, capture_output=True,
                           text=True, timeout=600)
        P += ["```"] + (r.stdout.strip().splitlines() or [f"failed: {r.stderr[-500:]}"]) + ["```"]

    def cluster_cpu(self) -> dict[str, float]:
        """CPU seconds so far (own + reaped children) of the master and of the nodes."""
        tick = os.sysconf("SC_CLK_TCK")
        stat: dict[int, tuple[int, float]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    f_ = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stat[int(d)] = (int(f_[1]), sum(int(x) for x in f_[11:15]) / tick)
        kids: dict[int, list[int]] = {}
        for pid, (ppid, _) in stat.items():
            kids.setdefault(ppid, []).append(pid)

        def tree(pid: int) -> float:
            return stat.get(pid, (0, 0.0))[1] + sum(tree(k) for k in kids.get(pid, []))
        out = {"master": 0.0, "nodes": 0.0}
        for p in Path(self.state, "pids").glob("*.pid"):
            try:
                pid = int(p.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            out["master" if p.stem == "master" else "nodes"] += tree(pid)
        return out

    def cpu_accounting(self) -> list[str]:
        import resource
        n = self.args.nodes
        runs = max(10, self.args.runs)
        out = ["| command | wall median | bpsh (+ its children) | master | node daemons | "
               f"all CPU | all CPU ÷ {os.cpu_count()} cores |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, argv in [("bpsh 1 true", ["1", "true"]), ("bpsh 0-7 true", ["0-7", "true"]),
                           (f"bpsh -a true ({n})", ["-a", "true"])]:
            cmd = shlex.split(self.bpsh) + argv
            subprocess.run(cmd, env=self.env, stdout=subprocess.DEVNULL)   # warm
            c0, r0 = self.cluster_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
            walls = []
            for _ in range(runs):
                t0 = time.monotonic()
                subprocess.run(cmd, env=self.env, stdout=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
                walls.append(time.monotonic() - t0)
            c1, r1 = self.cluster_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
            own = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / runs
            m, nd = (c1["master"] - c0["master"]) / runs, (c1["nodes"] - c0["nodes"]) / runs
            tot = own + m + nd
            out.append(f"| `{name}` | {statistics.median(walls) * 1e3:.1f} | {own * 1e3:.1f} | "
                       f"{m * 1e3:.1f} | {nd * 1e3:.1f} | {tot * 1e3:.1f} | "
                       f"{tot / (os.cpu_count() or 1) * 1e3:.1f} |")
        out += ["", "(The master and node figures include their idle heartbeats over the "
                "same time; clock ticks are 10 ms, hence the many runs.)"]
        return out

    def importtime(self) -> list[str]:
        per: dict[str, list[tuple[int, int]]] = {}
        for _ in range(7):
            r = subprocess.run([PY, "-X", "importtime", "-c", "import bpfs.cli.bpsh"],
                               env=self.env, capture_output=True, text=True)
            for line in r.stderr.splitlines():
                if not line.startswith("import time:") or "self [us]" in line:
                    continue
                parts = line[len("import time:"):].split("|")
                name = parts[2].rstrip()
                per.setdefault(name.strip(), []).append((int(parts[0]), int(parts[1])))
        rows = [(k, statistics.median(s for s, _ in v), statistics.median(c for _, c in v))
                for k, v in per.items()]
        total = next((c for k, s, c in rows if k == "bpfs.cli.bpsh"), 0)
        out = [f"Cumulative `import bpfs.cli.bpsh`: {total / 1e3:.1f} ms (importtime's own "
               "overhead included).", "", "| module | self µs | cumulative µs |",
               "|---|---:|---:|"]
        for k, s, c in sorted(rows, key=lambda r: -r[1])[:12]:
            out.append(f"| {k} | {s:.0f} | {c:.0f} |")
        return out

    def timeline(self, cases: list[tuple[str, list[str]]]) -> list[str]:
        phases = ["python", "imported", "resolved", "run_job", "forked", "ctl_start",
                  "ctl_end", "attach", "eof", "reaped", "returned", "exited"]
        label = {"python": "interpreter up (driver's first line)",
                 "imported": "bpsh imported", "resolved": "nodes resolved ($MOUNT/status)",
                 "run_job": "run_job starts (listener, pipes)",
                 "forked": "children forked (all)",
                 "ctl_start": "child: ctl write starts", "ctl_end": "child: ctl write returns "
                 "(master has seized it)", "attach": "node's stdio link attached",
                 "eof": "stdout/stderr EOF", "reaped": "ghost reaped (exit status)",
                 "returned": "main() returns", "exited": "harness sees the exit"}
        results: dict[str, dict[str, tuple[float, float]]] = {}
        n_runs = max(10, self.args.runs // 2)
        for name, argv in cases:
            samples: list[dict[str, tuple[float, float]]] = []
            for i in range(n_runs + 2):
                s = self._instrumented(argv)
                if s and i >= 2:
                    samples.append(s)
            if not samples:
                continue
            results[name] = {}
            for ph in phases:
                vals = [s[ph] for s in samples if ph in s]
                if vals:
                    results[name][ph] = (statistics.median(v[0] for v in vals),
                                         statistics.median(v[1] for v in vals))
        names = list(results)
        out = ["Each cell: first / last occurrence (one process: one figure).", "",
               "| phase | " + " | ".join(f"bpsh {k}" for k in names) + " |",
               "|---|" + "---:|" * len(names)]
        for ph in phases:
            cells = []
            for k in names:
                v = results[k].get(ph)
                if v is None:
                    cells.append("")
                elif abs(v[1] - v[0]) < 0.05e-3:
                    cells.append(f"{v[0] * 1e3:.1f}")
                else:
                    cells.append(f"{v[0] * 1e3:.1f} / {v[1] * 1e3:.1f}")
            out.append(f"| {label[ph]} | " + " | ".join(cells) + " |")
        return out

    def _instrumented(self, argv: list[str]) -> dict[str, tuple[float, float]] | None:
        evfile = os.path.join(self.base, "events")
        for f in (evfile, evfile + ".child"):
            if os.path.exists(f):
                os.unlink(f)
        env = dict(self.env, BPSH_PROF=evfile)
        t0 = time.monotonic()
        r = subprocess.run([PY, "-c", DRIVER, *argv], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        t_end = time.monotonic()
        if r.returncode != 0:
            log(f"instrumented bpsh {argv} failed: {r.stderr[-500:]}")
            return None
        ev: dict[str, list[float]] = {}
        for f in (evfile, evfile + ".child"):
            try:
                with open(f) as fh:
                    for line in fh:
                        k, v = line.split()
                        ev.setdefault(k, []).append(float(v) - t0)
            except FileNotFoundError:
                pass
        ev["exited"] = [t_end - t0]
        return {k: (min(v), max(v)) for k, v in ev.items()}

    # ---- report -----------------------------------------------------------------------

    def report(self) -> bool:
        lines, verdicts = self.tables()
        ok = all(v is True for _, v in verdicts) and not self.failures
        return self._emit(lines, verdicts, ok)

    def _emit(self, lines: list[str], verdicts: list[tuple[str, bool | None]], ok: bool) -> bool:
        print("\n".join(lines))
        if self.profile_lines:
            print("\n## Where bpsh's time goes\n")
            print("\n".join(self.profile_lines))
        if self.failures:
            print("\nFailures:\n" + "\n".join(f"- {f}" for f in self.failures))
        if self.args.results:
            self.write_results(lines, verdicts)
        return ok

    def write_results(self, lines: list[str], verdicts: list[tuple[str, bool | None]]) -> None:
        a = self.args

        def sh(cmd: list[str]) -> str:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        mem = next((ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal")),
                   "0")
        rev = a.git_rev or "HEAD"
        head = sh(["git", "-C", str(ROOT), "rev-parse", "--short", rev])
        dirty = "" if a.git_rev else sh(["git", "-C", str(ROOT), "status", "--porcelain",
                                         "--untracked-files=no", "--", "bpfs"])
        changed = ", ".join(ln[3:] for ln in dirty.splitlines())
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                      if ln.startswith("model name")), "?")
        load = " ".join(open("/proc/loadavg").read().split()[:3])
        n = a.nodes
        out = [
            "# bpsh next to srun, ssh, pdsh and clush",
            "",
            f"Measured {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} by "
            f"`bench/bpsh_peers.py` on "
            + (f"commit {head} (`--git-rev {a.git_rev}`, a clean export)." if a.git_rev else
               f"the working tree at {head}"
               + (f" with uncommitted changes to {changed}." if dirty else ".")),
            "",
            f"- machine: Linux {sh(['uname', '-r'])}, {os.cpu_count()} cores ({model}), "
            f"{int(mem) / 1024 / 1024:.1f} GiB memory; load average at the end {load} "
            "(the benchmark's own and whatever else ran: medians of interleaved rounds)",
            f"- {self.hf_version}, `-N --warmup {a.warmup} --runs {a.runs}` "
            f"({a.runs_big} for the {n}-node group) per round, {a.rounds} rounds, command order "
            "reversed every other round; stdin, stdout and stderr /dev/null (rows marked "
            "\"stdout a pipe\" and the stdio group: stdout a pipe hyperfine reads, "
            "`--output=pipe`); the rounds' raw times pooled before the medians",
            f"- bpfs: embedded cluster of {n} nodes (`bpfs up --nodes {n} --detach`), the "
            f"code from {self.src} (`PYTHONPATH`), bytecode cached (`PYTHONPYCACHEPREFIX`), "
            f"interpreter {PY}",
            "- peers: `/work/shared/peers/peers-up`, a private instance (own PEERS_DIR, netns, "
            "sshd port). **Every ssh node nN is the same sshd on 127.0.0.1** (pdsh and clush "
            "to n[0-31] are 32 connections to one sshd); Slurm is slurmctld + 8 slurmd n[0-7] "
            "in the peers' netns, all on this machine, as the 32 bpfs nodes are",
            "- `srun (in netns)` is hyperfine run inside the Slurm netns, as the peers' "
            "baselines were; `srun ($PEERS_SRUN)` adds nsenter + env (two execs, about "
            "+0.4 ms). The targets use the in-netns figure",
            f"- FILE is {FILE_MIB} MiB of random bytes under /tmp (page cache); MiB/s = "
            f"{FILE_MIB} MiB / the whole command's median time, start-up included",
            "",
            "## Results",
            "",
        ] + lines + [""]
        if self.profile_lines:
            out += ["## Where bpsh's time goes", ""] + self.profile_lines + [""]
        if self.failures:
            out += ["## Failures", ""] + [f"- {f}" for f in self.failures] + [""]
        out += ["## Commands", "",
                "Rerun: `sudo /opt/bpfs/venv/bin/python bench/bpsh_peers.py` "
                f"(this run: `{' '.join(shlex.quote(x) for x in sys.argv)}`).", "",
                "Exactly as given to hyperfine (paths of this run; `bpsh` is "
                f"`{self.bpsh}` with PYTHONPATH={self.src} and BPROC_MOUNT set):", "", "```"]
        for c in self.cmds.values():
            pre = (f"{self.peers_env.get('PEERS_NSENTER', '')} env SLURM_CONF="
                   f"{self.peers_env.get('PEERS_SLURM_CONF', '')} hyperfine ... "
                   if c.netns else "")
            out.append(f"{c.key:<36} {pre}{c.argv}")
        out += ["```", ""]
        Path(a.results).write_text("\n".join(out))
        log(f"wrote {a.results}")


# The instrumented bpsh: wraps bpsh's own functions (nothing in bpfs is changed) and
# writes "phase monotonic-time" lines; the children (forked) append to FILE.child.
DRIVER = r"""
import os, sys, time
_t = time.monotonic()
_F = os.environ["BPSH_PROF"]
_ev = [("python", _t)]
def _mark(k): _ev.append((k, time.monotonic()))
def _child_mark(k):
    fd = os.open(_F + ".child", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"{k} {time.monotonic()!r}\n".encode()); os.close(fd)
from bpfs.cli.bpsh import children as C, run as B, stdio as S
_mark("imported")
def _wrap(obj, name, before=None, after=None):
    f = getattr(obj, name)
    def w(*a, **k):
        if before: _mark(before)
        r = f(*a, **k)
        if after: _mark(after)
        return r
    setattr(obj, name, w)
_wrap(B, "resolve_nodes", after="resolved")
_wrap(B, "run_job", before="run_job")
_wrap(C, "_fork", after="forked")
_wr = C.write_request
def _write_request(*a, **k):
    _child_mark("ctl_start"); r = _wr(*a, **k); _child_mark("ctl_end"); return r
C.write_request = _write_request
_wrap(S.StdioServer, "_attach", after="attach")
_wrap(S.StdioServer, "_close_output", after="eof")
_reap = S.StdioServer._reap
def _reap_w(self):
    before = sum(p.status is not None for p in self.procs)
    _reap(self)
    for _ in range(sum(p.status is not None for p in self.procs) - before): _mark("reaped")
S.StdioServer._reap = _reap_w
try:
    rc = B.main()
finally:
    _mark("returned")
    with open(_F, "w") as fh:
        fh.writelines(f"{k} {v!r}\n" for k, v in _ev)
sys.exit(rc)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=32, help="bpfs nodes (default 32)")
    ap.add_argument("--runs", type=int, default=20, help="hyperfine runs per round (>= 20)")
    ap.add_argument("--runs-big", type=int, default=20,
                    help="runs per round for the 32-node group (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="untimed runs of each command before its timed ones (default 10: "
                         "the first command timed after a group switch ran slow for its "
                         "first half second or so, and with 3 that was bpsh's alone)")
    ap.add_argument("--profile", action="store_true",
                    help="profile bpsh even if every target is met")
    ap.add_argument("--no-profile", action="store_true", help="never profile")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results-bpsh-peers.md"),
                    help="markdown file to write ('' for none)")
    ap.add_argument("--json-dir", default=None, help="keep hyperfine's JSON files here")
    ap.add_argument("--git-rev", default=None, metavar="REV",
                    help="measure this commit (git archive of bpfs/ and bench/ into the temp "
                         "dir) instead of the working tree, e.g. HEAD when others have "
                         "uncommitted edits in it")
    ap.add_argument("--peers-dir", default="/tmp/bpfs-peers-bpsh",
                    help="PEERS_DIR of our own peers instance")
    ap.add_argument("--peers-netns", default="bpfs-peers-bpsh")
    ap.add_argument("--peers-port", type=int, default=0, help="sshd port (default: a free one)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/bpsh_peers.py: needs root (bpfs up, peers-up)", file=sys.stderr)
        return 2
    if args.nodes < 8:
        print("bench/bpsh_peers.py: --nodes must be at least 8", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    bench = Bench(args)
    ok = False
    try:
        try:
            bench.peers_up()
            bench.cluster_up()
            bench.make_file()
            bench.define()
            bench.measure()
            _, verdicts = bench.tables()
            missed = any(v is not True for _, v in verdicts)
            if args.profile or (missed and not args.no_profile):
                bench.profile()
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            bench.failures.append(str(e).strip().splitlines()[0][:300])
            log(f"error: {e}")
        finally:
            bench.cluster_down()
            bench.peers_down()
        if bench.cmds:
            ok = bench.report()
    finally:
        bench.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""MPI through bprsh: Debian's Open MPI and MPICH launch their daemons with bprsh as their
remote shell, unpatched, on a 4-node embedded cluster; what a user sees, and what is left
on the nodes once mpirun is interrupted.

The packages come from `./bootstrap test` (openmpi-bin libopenmpi-dev mpich libmpich-dev);
each MPI's tests skip, saying so, only when its programs are missing. The hello world
(mpi_hello.c, beside this file) is compiled with each MPI's own mpicc. The embedded
cluster's names resolve (the NSS module installed as bootstrap does, BPFS_HOSTS naming
this cluster's hosts file), as the launchers look the hosts up. The embedded
nodes share one kernel, so the settings README.md's MPI section gives are used here:
MPICH's UCX over TCP (UCX_TLS=tcp,self). UCX 1.13's TCP transport sometimes never
finishes MPI_Finalize (openucx/ucx#8738; on this machine without bpfs too, about one
`mpiexec -n 4` in five): an MPICH run that printed every rank right and then hung there
is reported as an expected failure naming that bug, after the clean-up is checked.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster.nss_support import hosts_env, install_nss
from tests.conftest import Cluster, _new_cluster, _teardown, as_user, command, is_root

pytestmark = pytest.mark.timeout(240)

HERE = Path(__file__).resolve().parent
NODES = 4
MPICH_ENV = {"UCX_TLS": "tcp,self"}
FINALIZE_HANG = "UCX 1.13's TCP transport hung in MPI_Finalize (openucx/ucx#8738)"
LINE = re.compile(r"rank (\d+) of (\d+) on (\S+) sum (\d+)")


class MPI:
    """One MPI implementation: its programs and how its launcher is told to use bprsh."""

    def __init__(self, name: str, mpicc: str, launcher: str) -> None:
        self.name, self.mpicc, self.launcher = name, mpicc, launcher

    def argv(self, agent: str, hosts: list[str], np: int, prog: str, *args: str,
             root: bool = True) -> list[str]:
        if self.name == "openmpi":
            extra = ["--allow-run-as-root"] if root else []
            return [self.launcher, *extra, "--mca", "plm_rsh_agent", agent,
                    "--host", ",".join(hosts), "-np", str(np), prog, *args]
        return [self.launcher, "-launcher", "ssh", "-launcher-exec", agent,
                "-hosts", ",".join(hosts), "-n", str(np), prog, *args]


MPIS = [MPI("openmpi", "mpicc.openmpi", "mpirun.openmpi"),
        MPI("mpich", "mpicc.mpich", "mpiexec.hydra")]


@pytest.fixture(scope="module")
def mpi_cluster(src_dir: str) -> Iterator[Cluster]:
    """A 4-node cluster for the module (the MPI runs want n0..n3), its names resolving
    as after `./bootstrap install` (the launchers look the hosts up)."""
    if not is_root():
        pytest.skip("the embedded cluster needs root (FUSE mount, namespaces)")
    install_nss()
    c = _new_cluster(src_dir, NODES)
    c.env = hosts_env(c.env, c.state_dir)
    try:
        c.up()
        yield c
    finally:
        _teardown(c)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """A directory every test user can read: the agent and the compiled programs."""
    d = Path(tempfile.mkdtemp(prefix="bpfs-mpi-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(work: Path) -> str:
    """`bprsh` from the code under test, as one executable path (what the launchers take)."""
    path = work / "bprsh"
    path.write_text(f"#!/bin/sh\nexec {shlex.join(command('bprsh'))} \"$@\"\n")
    os.chmod(path, 0o755)
    return str(path)


@pytest.fixture(scope="module", params=MPIS, ids=lambda m: m.name)
def mpi(request, work: Path) -> tuple[MPI, str]:
    """Each MPI with the hello world compiled by its own mpicc."""
    m: MPI = request.param
    missing = [p for p in (m.mpicc, m.launcher) if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{' '.join(missing)} not installed (./bootstrap test installs "
                    f"openmpi-bin libopenmpi-dev mpich libmpich-dev)")
    prog = work / f"hello-{m.name}"
    subprocess.run([m.mpicc, "-o", str(prog), str(HERE / "mpi_hello.c")], check=True,
                   timeout=120, capture_output=True)
    return m, str(prog)


def env_for(c: Cluster, m: MPI) -> dict:
    return dict(c.env, **(MPICH_ENV if m.name == "mpich" else {}))


def node_processes(c: Cluster) -> dict[int, set[int]]:
    """Host PIDs of every process in each node's PID namespace."""
    spaces = {}
    for n in range(c.nodes):
        pid = int(open(os.path.join(c.state_dir, "pids", f"node-{n}.pid")).read().split()[0])
        spaces[os.readlink(f"/proc/{pid}/ns/pid")] = n
    out: dict[int, set[int]] = {n: set() for n in range(c.nodes)}
    for d in os.listdir("/proc"):
        try:
            n = spaces.get(os.readlink(f"/proc/{d}/ns/pid")) if d.isdigit() else None
        except OSError:
            continue
        if n is not None:
            out[n].add(int(d))
    return out


def comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return "?"


SPARE = "bpfs-helper"   # the node daemon's spare restorer (bpfs.migrate.restore), not the job's


def wait_clean(c: Cluster, before: dict[int, set[int]], timeout: float = 20) -> None:
    """Until each node runs only what it ran before the job (but the node daemon's spare
    restorers, made as it restores), and no ghost is left on the master."""
    deadline = time.monotonic() + timeout
    while True:
        extra = {n: [(p, comm(p)) for p in sorted(pids - before[n])] for n, pids in
                 node_processes(c).items()}
        extra = {n: [pc for pc in ps if pc[1] != SPARE] for n, ps in extra.items()}
        extra = {n: ps for n, ps in extra.items() if ps}
        ghosts = os.listdir(os.path.join(c.mount, "procs"))
        if not extra and not ghosts:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left on the nodes: {extra}; ghosts: {ghosts}")
        time.sleep(0.1)


def check_hello(out: str, np: int, per_node: int) -> None:
    """Every rank once, the right size and sum, rank r on node n(r // per_node)."""
    got = {int(m[1]): (int(m[2]), m[3], int(m[4])) for m in LINE.finditer(out)}
    assert sorted(got) == list(range(np)), out
    want_sum = np * (np - 1) // 2
    assert got == {r: (np, f"n{r // per_node}", want_sum) for r in range(np)}, out


def run_hello(c: Cluster, mpi: tuple[MPI, str], agent: str, per_node: int,
              user=None) -> None:
    m, prog = mpi
    hosts = [f"n{n}" + (f":{per_node}" if per_node > 1 else "") for n in range(NODES)]
    np = NODES * per_node
    before = node_processes(c)
    argv = m.argv(agent, hosts, np, prog, root=user is None)
    p = subprocess.Popen(as_user(argv, user), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env_for(c, m), cwd="/", text=True)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        check_hello(out, np, per_node)
        wait_clean(c, before)
        if m.name == "mpich":
            pytest.xfail(FINALIZE_HANG)
        raise AssertionError(f"{m.name} did not finish:\n{out}\n{err}")
    assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err}"
    check_hello(out, np, per_node)
    wait_clean(c, before)


@pytest.mark.parametrize("per_node", [1, 2])
def test_hello_on_four_nodes(mpi_cluster, mpi, agent, per_node) -> None:
    """mpirun --mca plm_rsh_agent bprsh / mpiexec -launcher-exec bprsh: rank r on its node,
    the sum of the ranks right everywhere, nothing left on any node afterwards."""
    run_hello(mpi_cluster, mpi, agent, per_node)


def test_hello_as_a_user(mpi_cluster, mpi, agent, users) -> None:
    """A user the nodes' ACL lets run (mode ---x--x--x) launches the same job."""
    run_hello(mpi_cluster, mpi, agent, 1, user=users["alice"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_interrupting_the_launcher_leaves_nothing_on_the_nodes(mpi_cluster, mpi, agent,
                                                               sig) -> None:
    """A job whose ranks sleep: once every rank has printed, `kill -INT`/`-TERM` to
    mpirun on the master; mpirun exits and no node keeps a daemon, a rank or a shell."""
    c, (m, prog) = mpi_cluster, mpi
    before = node_processes(c)
    argv = m.argv(agent, [f"n{n}" for n in range(NODES)], NODES, prog, "120")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env_for(c, m), cwd="/", text=True)
    try:
        lines = [p.stdout.readline() for _ in range(NODES)]
        check_hello("".join(lines), NODES, 1)
        p.send_signal(sig)
        p.wait(timeout=30)           # (hydra's mpiexec exits 0 on SIGTERM: not checked)
        wait_clean(c, before)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


# ---- the job in the process space (#16 part 2: forks on nodes are cluster processes) -----

def ghost_chain(pid: int) -> list[int]:
    """`pid` and its ancestors on the master, up to init."""
    out = [pid]
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        out.append(pid)
    return out


def job_procs(c: Cluster) -> dict[int, tuple[int, str]]:
    """/bproc/procs: pid -> (node, cmd)."""
    out = {}
    for p in os.listdir(os.path.join(c.mount, "procs")):
        try:
            status = c.read(f"procs/{p}/status")
        except OSError:
            continue
        fields = dict(line.split(": ", 1) for line in status.splitlines() if ": " in line)
        out[int(p)] = (int(fields["node"]), fields.get("cmd", ""))
    return out


def test_the_job_is_in_the_process_space_with_tree_spawn(mpi_cluster, mpi, agent) -> None:
    """Open MPI with a chain of daemons (routed radix 1: each daemon on a node starts the
    next through bprsh, from that node): every daemon and rank is a ghost under mpirun on
    the master, on its node in /bproc/procs; `kill` of a rank's PID on the master ends
    the job, and nothing is left anywhere."""
    c, (m, prog) = mpi_cluster, mpi
    if m.name != "openmpi":
        pytest.skip("the tree spawn is Open MPI's (hydra starts its proxies from mpiexec)")
    before = node_processes(c)
    argv = [m.launcher, "--allow-run-as-root", "--mca", "plm_rsh_agent", agent,
            "--mca", "routed", "radix", "--mca", "routed_radix", "1",
            "--host", ",".join(f"n{n}" for n in range(NODES)), "-np", str(NODES), prog, "60"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env_for(c, m), cwd="/", text=True)
    try:
        lines = [p.stdout.readline() for _ in range(NODES)]
        check_hello("".join(lines), NODES, 1)
        def named(prefix: str) -> dict[int, int]:
            return {pid: node for pid, (node, cmd) in job_procs(c).items()
                    if cmd.startswith(prefix)}
        # a rank's ghost takes its name once its node has seen the exec (a moment)
        c.wait_for(lambda: len(named(prog)) == NODES and len(named("orted")) == NODES,
                   timeout=15, what="every rank and daemon named in /bproc/procs")
        procs = job_procs(c)
        ranks, daemons = named(prog), named("orted")
        assert sorted(ranks.values()) == list(range(NODES)), procs
        assert sorted(daemons.values()) == list(range(NODES)), procs
        for pid in (*ranks, *daemons):
            assert p.pid in ghost_chain(pid), (pid, ghost_chain(pid))
        # tree spawn: the daemons on nodes 1.. were started from a node, under a daemon
        for pid, node in daemons.items():
            above = [d for d in ghost_chain(pid)[1:] if d in daemons]
            assert node == 0 or above, (pid, node, ghost_chain(pid))
        victim = next(pid for pid, node in ranks.items() if node == NODES - 1)
        os.kill(victim, signal.SIGTERM)          # on the master: reaches n3's rank
        p.wait(timeout=60)
        assert p.returncode != 0
        wait_clean(c, before)
        c.wait_for(lambda: not job_procs(c), timeout=15, what="/bproc/procs to empty")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()

"""The cluster's names: `n1`, `.1` and `master` resolve on the master and on the nodes, to
the address each node registered, through the NSS module (nss/libnss_bproc.c) and the
hosts file the master writes (bpfs/master/names.py), in getent, Python and hostname -f.

The module is this checkout's, built and installed by bootstrap's own install_nss
(tests/cluster/nss_support.py). The clusters here are on temporary mounts, so their
names are in STATE_DIR/hosts and BPFS_HOSTS names it (the /bproc cluster's are in
/run/bpfs/hosts, where the module looks by default); bpsh passes it on to the nodes.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from bpfs import formats
from tests.cluster.nss_support import hosts_env, install_nss
from tests.conftest import Cluster, command

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def nss() -> None:
    install_nss()


@pytest.fixture(scope="module")
def named(cluster: Cluster) -> Cluster:
    """The module's 3-node cluster, with BPFS_HOSTS set for everything run in it."""
    cluster.env = hosts_env(cluster.env, cluster.state_dir)
    cluster.wait_for(lambda: all(address(cluster, n) for n in range(cluster.nodes)),
                     what="every node's address")
    return cluster


def address(c: Cluster, n: int) -> str:
    return formats.parse_info(c.read(f"nodes/{n}/info")).address


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    return r.stdout.decode()


def getent(c: Cluster, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run(["getent", "hosts", *names], capture_output=True, env=c.env,
                          timeout=10)


def test_each_node_has_an_address_of_its_own(named: Cluster) -> None:
    """The embedded nodes connect from 127.1.0.N+1: a launcher that checks whether a
    host is this machine (Open MPI's mpirun) must not take every node for it."""
    addresses = [address(named, n) for n in range(named.nodes)]
    assert len(set(addresses)) == named.nodes and "127.0.0.1" not in addresses


def test_the_hosts_file_names_master_and_every_node(named: Cluster) -> None:
    text = Path(named.state_dir, "hosts").read_text()
    lines = [line.split() for line in text.splitlines() if not line.startswith("#")]
    assert lines == [["127.0.0.1", "master"]] + [[address(named, n), f"n{n}", f".{n}"]
                                                 for n in range(named.nodes)]


@pytest.mark.parametrize("name, n", [("n1", 1), (".1", 1), ("N2", 2), ("master", None)])
def test_getent_on_the_master(named: Cluster, name: str, n: int | None) -> None:
    want = "127.0.0.1" if n is None else address(named, n)
    fields = ok(getent(named, name)).split()
    assert fields[0] == want and (n is None or fields[1:] == [f"n{n}", f".{n}"])


def test_any_user_resolves_them(named: Cluster, users) -> None:
    r = named.sh("getent hosts n1 master", user=users["carol"])
    assert [line.split()[0] for line in ok(r).splitlines()] == [address(named, 1), "127.0.0.1"]


def test_reverse_lookup_gives_the_node_name(named: Cluster) -> None:
    assert ok(getent(named, address(named, 2))).split()[1:] == ["n2", ".2"]


def test_unknown_names_are_not_found(named: Cluster) -> None:
    r = getent(named, "n99", ".99", "n1x")
    assert r.returncode == 2 and r.stdout == b""


PY_LOOKUPS = """
import socket
print(socket.gethostbyname("n1"))
print(socket.gethostbyname_ex("n1"))
print(socket.gethostbyaddr(socket.gethostbyname("n2"))[0])
print(socket.getaddrinfo("master", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
print(socket.getaddrinfo(b".0", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
"""


def test_python_lookups_on_the_master(named: Cluster) -> None:
    out = subprocess.run(["python3", "-c", PY_LOOKUPS], capture_output=True, text=True,
                         env=named.env, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == address(named, 1)
    assert lines[1] == repr(("n1", [".1"], [address(named, 1)]))
    assert lines[2:] == ["n2", "127.0.0.1", address(named, 0)]


def test_names_resolve_on_a_node(named: Cluster) -> None:
    """On node 1 (its own mount namespace, the master's files): getent, hostname -f and
    Python resolve the other nodes and the master."""
    assert ok(named.run("bpsh", "1", "getent", "hosts", "n2")).split() == \
        [address(named, 2), "n2", ".2"]
    assert ok(named.run("bpsh", "1", "hostname", "-f")) == "n1\n"
    out = ok(named.run("bpsh", "2", "python3", "-c", PY_LOOKUPS)).splitlines()
    assert out[0] == address(named, 1) and out[2:] == ["n2", "127.0.0.1", address(named, 0)]


def test_the_master_removes_its_names_when_it_stops(make_cluster) -> None:
    c = make_cluster(nodes=1)
    hosts = Path(c.state_dir, "hosts")
    assert f"{address(c, 0)} n0 .0" in hosts.read_text()
    assert oct(hosts.stat().st_mode & 0o777) == "0o644"
    ok(c.down())
    assert not hosts.exists()


# ---- the module on its own: a hosts file written by hand ------------------------------

ODD = """\
# comments, blank lines, IPv6 and long alias lists are what /etc/hosts has too

10.9.8.7   far  far.example  # trailing comment
fd00::17   six
not-an-address  bogus
10.9.8.8 """ + " ".join(f"alias{i}" for i in range(20)) + "\n"


@pytest.fixture
def odd_hosts(tmp_path: Path) -> dict:
    path = tmp_path / "hosts"
    path.write_text(ODD)
    return dict(os.environ, BPFS_HOSTS=str(path))


def test_module_parses_a_hosts_file_as_etc_hosts_does(odd_hosts: dict) -> None:
    def get(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["getent", *args], capture_output=True, text=True,
                              env=odd_hosts, timeout=10)
    assert get("hosts", "far.example").stdout.split() == ["10.9.8.7", "far", "far.example"]
    assert get("ahostsv6", "six").stdout.split()[0] == "fd00::17"
    assert get("hosts", "10.9.8.7").stdout.split()[1] == "far"
    assert get("hosts", "bogus").returncode == 2
    assert get("hosts", "alias7").stdout.split()[:2] == ["10.9.8.8", "alias0"]
    assert get("hosts", "alias19").returncode == 2             # past the 16 names kept


def test_a_missing_hosts_file_is_not_found(tmp_path: Path) -> None:
    r = subprocess.run(["getent", "hosts", "n1"], capture_output=True, timeout=10,
                       env=dict(os.environ, BPFS_HOSTS=str(tmp_path / "none")))
    assert r.returncode == 2


def test_socket_in_this_process_sees_the_module(named: Cluster, monkeypatch) -> None:
    monkeypatch.setenv("BPFS_HOSTS", named.env["BPFS_HOSTS"])
    assert socket.gethostbyname("n0") == address(named, 0)


def test_a_node_on_a_machine_of_its_own_writes_the_names_it_is_sent(make_cluster,
                                                                     tmp_path: Path) -> None:
    """A node that does not share the master's files (bpslave --hosts-file, the default
    /run/bpfs/hosts off the master's machine) gets the names in a `names` message after
    `welcome`, and again when they change, and writes them for its own libnss_bproc."""
    c = make_cluster(nodes=2)
    slaves = []

    def replace(n: int, hosts: Path) -> None:
        """Node n's embedded daemon goes; a bpslave (from 127.0.0.1) takes its number."""
        os.kill(int(Path(c.state_dir, "pids", f"node-{n}.pid").read_text().split()[0]), 9)
        c.wait_for(lambda: c.read(f"nodes/{n}/status").strip() == "down", what="node down")
        slaves.append(subprocess.Popen(
            command("bpslave") + ["--master", f"127.0.0.1:{c.port}", "--node", str(n),
                                  "--key", os.path.join(c.state_dir, "cluster.key"),
                                  "--no-namespace", "--hosts-file", str(hosts)],
            env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    theirs = tmp_path / "hosts"
    try:
        replace(1, theirs)
        c.wait_for(lambda: theirs.exists() and "127.0.0.1 n1 .1\n" in theirs.read_text(),
                   timeout=15, what="the node's hosts file")
        assert theirs.read_text() == Path(c.state_dir, "hosts").read_text()
        assert oct(theirs.stat().st_mode & 0o777) == "0o644"
        replace(0, tmp_path / "hosts0")                 # n0's address changes: sent again
        c.wait_for(lambda: "127.0.0.1 n0 .0\n" in theirs.read_text(), timeout=15,
                   what="the changed names at node 1")
        assert theirs.read_text() == Path(c.state_dir, "hosts").read_text()
    finally:
        for p in slaves:
            p.kill()
            p.wait()

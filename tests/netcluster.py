"""A cluster whose node daemons run in network namespaces of their own (another "machine").

The master (`bpfs master`) listens on the host end of a veth pair this module makes; each
node daemon (`bpslave`) runs inside `ip netns exec` and reaches the master only over that
link, as on a real cluster: nothing it does may rely on sharing the master's network, and
the stdio links of bpsh come back over it too. Everything is removed at the end: the
daemons by PID, the mount, the namespaces and links by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from tests.conftest import Cluster, command, free_port, mounted


@dataclass
class NetCluster(Cluster):
    procs: list[subprocess.Popen] = field(default_factory=list)
    netns: str = ""
    links: list[str] = field(default_factory=list)
    spaces: list[str] = field(default_factory=list)     # every namespace made, by node


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make(src: str, nodes: int = 2, apart: bool = False) -> Iterator[NetCluster]:
    """A master on a veth address and `nodes` node daemons in one new network namespace;
    `apart`: each node in a namespace of its own, on a link of its own, which reaches the
    master's address and nothing else (the nodes cannot reach each other)."""
    base = tempfile.mkdtemp(prefix="bpfs-net-")
    os.chmod(base, 0o755)
    mount, state = os.path.join(base, "mnt"), os.path.join(base, "state")
    os.mkdir(mount)
    os.mkdir(state)
    tag = secrets.token_hex(3)
    net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    master_ip = f"{net}.1"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=src, BPROC_MOUNT=mount, PYTHONDONTWRITEBYTECODE="1")
    c = NetCluster(mount, state, port, nodes, src, env, netns=f"bpfs-{tag}")
    key = os.path.join(state, "cluster.key")
    try:
        for k in range(nodes if apart else 1):      # namespace k: NET.4k+1 <-> NET.4k+2
            ns, host_if, ns_if = f"bpfs-{tag}" + (str(k) if k else ""), f"bpv{tag}{k}a", \
                f"bpv{tag}{k}b"
            _ip("netns", "add", ns)
            c.spaces.append(ns)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            c.links.append(host_if)
            _ip("link", "set", ns_if, "netns", ns)
            _ip("addr", "add", f"{net}.{4 * k + 1}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"{net}.{4 * k + 2}/30", "dev", ns_if)
            _ip("-n", ns, "link", "set", ns_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if k:
                _ip("-n", ns, "route", "add", f"{master_ip}/32", "via", f"{net}.{4 * k + 1}")
        subprocess.run(command("bpfs") + ["keygen", "--key", key], env=env, check=True,
                       capture_output=True)
        log = open(os.path.join(state, "master.log"), "wb")
        c.procs.append(subprocess.Popen(
            command("bpfs") + ["master", "--mount", mount, "--listen", master_ip, "--port",
                               str(port), "--key", key, "--state-file",
                               os.path.join(state, "state"), "--nodes", str(nodes),
                               "--ping-timeout", "3"],
            env=env, stdout=log, stderr=log, start_new_session=True))
        _wait(lambda: mounted(mount), "the master's mount")
        for n in range(nodes):
            nlog = open(os.path.join(state, f"node{n}.log"), "wb")
            c.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", c.spaces[n % len(c.spaces)]] + command("bpslave") +
                ["--master", f"{master_ip}:{port}", "--node", str(n), "--key", key,
                 "--hostname", f"n{n}", "--unmount", mount],   # as on a machine of its own
                env=env, stdout=nlog, stderr=nlog, start_new_session=True))
        _wait(lambda: all(c.read(f"nodes/{n}/status").strip() == "up" for n in range(nodes)),
              "the nodes up", 30)
        yield c
    finally:
        for p in reversed(c.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(c.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if mounted(mount):
            subprocess.run(["fusermount3", "-u", "-z", mount], check=False)
        for link in c.links:
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        for ns in c.spaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _wait(pred, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

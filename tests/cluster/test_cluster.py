"""The embedded cluster as a user meets it: real mount, real node daemons, real users.

Each test states what a user does and what they must see. The module shares one
3-node cluster; tests that change it put it back in `finally`.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time

import pytest

from bpfs import formats, usage
from tests.conftest import Cluster, command, mounted

pytestmark = pytest.mark.timeout(120)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    return r.stdout.decode()


def test_every_node_is_up_and_cat_of_status_shows_it(cluster: Cluster) -> None:
    out = ok(cluster.sh(f"cat {cluster.mount}/nodes/*/status"))
    assert out == "up\n" * 3


def test_bpstat_prints_the_compact_table(cluster: Cluster) -> None:
    out = ok(cluster.run("bpstat"))
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["Node(s)", "Status", "Mode", "User", "Group"]
    assert lines[1].split() == ["0-2", "up", "---x--x--x", "root", "root"]


def test_bpctl_state_change_shows_in_bpstat_and_status(cluster: Cluster) -> None:
    try:
        ok(cluster.run("bpctl", "-S", "2", "-s", "unavailable"))
        assert cluster.read("nodes/2/status") == "unavailable\n"
        rows = ok(cluster.run("bpstat")).splitlines()[1:]
        assert ["0-1", "up", "---x--x--x", "root", "root"] in [r.split() for r in rows]
        assert ["2", "unavailable", "---x--x--x", "root", "root"] in [r.split() for r in rows]
    finally:
        ok(cluster.run("bpctl", "-S", "2", "-s", "up"))
    assert cluster.read("nodes/2/status") == "up\n"


def test_chmod_chown_is_the_acl_shown_by_ls_and_bpstat(cluster: Cluster, users) -> None:
    alice = users["alice"]
    node = f"{cluster.mount}/nodes/1"
    try:
        ok(cluster.sh(f"chmod 0110 {node} && chown {alice.uid}:100 {node}"))
        st = os.stat(node)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o110, alice.uid, 100)
        listing = ok(cluster.sh(f"ls -ln {cluster.mount}/nodes"))
        line = next(l for l in listing.splitlines() if l.endswith(" 1"))
        assert line.split()[0] == "d--x--x---" and line.split()[2:4] == [str(alice.uid), "100"]
        long = ok(cluster.run("bpstat", "-l", "1")).splitlines()
        assert any("---x--x---" in l and alice.name in l for l in long[1:])
    finally:
        ok(cluster.sh(f"chown 0:0 {node} && chmod 0111 {node}"))


def _errno_of(r: subprocess.CompletedProcess) -> str:
    return r.stderr.decode()


def test_acl_rules_for_users_who_are_not_root(cluster: Cluster, users) -> None:
    alice, bob = users["alice"], users["bob"]
    node = f"{cluster.mount}/nodes/1"
    try:
        ok(cluster.sh(f"chown {alice.uid}:{alice.gid} {node}"))
        # the owner may chmod
        ok(cluster.sh(f"chmod 0100 {node}", user=alice))
        assert stat.S_IMODE(os.stat(node).st_mode) == 0o100
        # another user may not
        r = cluster.sh(f"chmod 0111 {node}", user=bob)
        assert r.returncode != 0 and "Operation not permitted" in _errno_of(r)
        # nobody but root may chown
        r = cluster.sh(f"chown {bob.uid} {node}", user=alice)
        assert r.returncode != 0 and "Operation not permitted" in _errno_of(r)
        # the owner may chgrp to a group she belongs to, not to a foreign one
        team = [g for g in alice.groups if g != alice.gid][0]
        ok(cluster.sh(f"chgrp {team} {node}", user=alice))
        assert os.stat(node).st_gid == team
        foreign = users["carol"].groups[-1]
        assert foreign not in alice.groups
        r = cluster.sh(f"chgrp {foreign} {node}", user=alice)
        assert r.returncode != 0 and "Operation not permitted" in _errno_of(r)
        # status and info stay readable by everyone even when the node is closed to them
        assert ok(cluster.sh(f"cat {node}/status {node}/info", user=bob)).startswith("up\n")
    finally:
        ok(cluster.sh(f"chown 0:0 {node} && chmod 0111 {node}"))


def test_state_change_by_a_user_is_refused(cluster: Cluster, users) -> None:
    bob = users["bob"]
    r = cluster.run("bpctl", "-S", "0", "-s", "unavailable", user=bob)
    assert r.returncode == 1
    assert "0: Operation not permitted" in r.stderr.decode()
    # dash's builtin echo reports any write error as EIO: use coreutils' echo
    r = cluster.sh(f"/bin/echo 'state unavailable' > {cluster.mount}/nodes/0/ctl", user=bob)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr.decode()
    assert cluster.read("nodes/0/status") == "up\n"


@pytest.mark.parametrize("payload, needle", [
    (b"frobnicate\n", "frobnicate"),
    (b"state\n", "state"),
    (b"state up up\n", "state"),
    (b"\n", ""),
    (b"\x00\xff\xfe binary\x01", ""),
    (b"state " + b"x" * 100_000 + b"\n", ""),
])
def test_bad_ctl_writes_are_einval_with_a_readable_message(cluster: Cluster, payload: bytes,
                                                           needle: str) -> None:
    ctl = os.path.join(cluster.mount, "nodes/0/ctl")
    fd = os.open(ctl, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, payload)
        assert exc.value.errno == errno.EINVAL
        message = os.pread(fd, 4096, 0).decode()
        assert message.strip() and message != "ok\n"
        assert needle in message
    finally:
        os.close(fd)
    # the master keeps working
    assert cluster.read("nodes/0/status") == "up\n"
    assert ok(cluster.sh(f"cat {cluster.mount}/status")).count("\n") == 3


def test_ctl_on_a_node_that_does_not_exist_is_enoent(cluster: Cluster) -> None:
    assert not os.path.exists(os.path.join(cluster.mount, "nodes/99"))


def test_procs_is_empty_and_bpstat_p_lists_no_process(cluster: Cluster) -> None:
    assert os.listdir(os.path.join(cluster.mount, "procs")) == []
    out = ok(cluster.run("bpstat", "-p"))
    assert len(out.splitlines()) <= 1


def test_contract_every_file_parses_with_the_cli_parsers(cluster: Cluster) -> None:
    """Walk the whole tree, a migrated process and an `exec`'d one running; every readable
    file must parse with the functions the CLIs use."""
    m = cluster.mount
    sleeper = subprocess.Popen(command("bpsh") + ["1", "sleep", "60"], env=cluster.env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    fd = os.open(f"{m}/nodes/2/ctl", os.O_RDWR)
    try:
        os.write(fd, b"exec sleep 60\n")
        exec_pid = int(os.pread(fd, 100, 0).decode().split()[1])
        cluster.wait_for(lambda: len(os.listdir(f"{m}/procs")) == 2, 10, "two procs")
        _walk_and_parse(cluster)
        assert sorted(formats.parse_pids(cluster.read("nodes/2/procs"))) == [exec_pid]
    finally:
        os.close(fd)
        for pid in [int(p) for p in os.listdir(f"{m}/procs")]:
            os.kill(pid, 9)
        sleeper.wait(20)


def _walk_and_parse(cluster: Cluster) -> None:
    m = cluster.mount
    rows = formats.parse_status(cluster.read("status"))
    assert [r.number for r in rows] == list(range(cluster.nodes))
    for row in rows:
        assert row.state in formats.NODE_STATES and row.address
    seen = set()
    for dirpath, dirnames, filenames in os.walk(m):
        for f in filenames:
            rel = os.path.relpath(os.path.join(dirpath, f), m)
            seen.add(rel)
            if rel in ("events",) or f == "ctl" or f == "signal":
                continue
            if f in ("stdout", "stderr"):      # pipes: readable without blocking, then skip
                fd = os.open(os.path.join(m, rel), os.O_RDONLY | os.O_NONBLOCK)
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    pass
                finally:
                    os.close(fd)
                continue
            text = cluster.read(rel)
            assert text.endswith("\n") or text == "", rel
            assert os.stat(os.path.join(m, rel)).st_size in (0, len(text.encode())), rel
            if f == "status" and rel.startswith("nodes/"):
                formats.parse_node_state(text)
            elif f == "info":
                info = formats.parse_info(text)
                f = info.facts
                assert f.cpus >= 1 and f.mem_total > f.mem_available > 0
                assert f.hostname == f"n{rel.split('/')[1]}"
            elif f == "procs":
                formats.parse_pids(text)
            elif rel.startswith("procs/") and f == "status":
                formats.parse_proc_status(text)
            elif rel.startswith("procs/") and f == "stat":
                comm, rest = usage.parse_stat(text)
                assert len(rest) == usage.STAT_FIELDS - 2 and comm == "sleep"
            elif rel.startswith("procs/") and f == "node":
                int(formats.parse_word(text))
    for n in range(cluster.nodes):
        for f in ("status", "ctl", "info", "procs"):
            assert f"nodes/{n}/{f}" in seen
    assert {"status", "events"} <= seen
    procs = [f for f in seen if f.startswith("procs/")]
    for f in ("status", "stat", "node", "signal", "ctl"):
        assert len([p for p in procs if p.endswith("/" + f)]) == 2, (f, procs)


def test_events_block_until_a_change_then_report_it(cluster: Cluster) -> None:
    proc = subprocess.Popen(["head", "-c", "1", f"{cluster.mount}/events"],
                            stdout=subprocess.PIPE, env=cluster.env)
    try:
        time.sleep(0.5)
        assert proc.poll() is None, "a read of events returned with nothing new"
    finally:
        proc.kill()
        proc.wait(10)
    fd = os.open(os.path.join(cluster.mount, "events"), os.O_RDONLY)
    try:
        ok(cluster.run("bpctl", "-S", "1", "-s", "error"))
        events = formats.parse_events(os.read(fd, 65536).decode())
        assert any(e.kind == "node" and e.id == 1 and "error" in (e.what + " " + e.detail)
                   for e in events), events
    finally:
        os.close(fd)
        ok(cluster.run("bpctl", "-S", "1", "-s", "up"))


def test_bpfs_down_leaves_no_mount_and_no_process(make_cluster) -> None:
    c = make_cluster(nodes=2)
    pids = _recorded_pids(c)
    assert pids, "bpfs up recorded no PIDs"
    ok(c.down())
    assert not mounted(c.mount)
    for pid in pids:
        assert not _alive(pid), f"process {pid} left running"
    assert "up" not in ok(c.sh(f"cat /proc/mounts"))[:0]  # nothing to parse: just reachable


def _recorded_pids(c: Cluster) -> list[int]:
    pids = []
    for root, _, files in os.walk(c.state_dir):
        for f in files:
            if f.endswith(".pid"):
                text = open(os.path.join(root, f)).read().split()
                if text and text[0].isdigit():
                    pids.append(int(text[0]))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_master_restart_keeps_acls_and_states(make_cluster, users) -> None:
    alice = users["alice"]
    c = make_cluster(nodes=3)
    ok(c.sh(f"chmod 0110 {c.mount}/nodes/2 && chown {alice.uid}:{alice.gid} {c.mount}/nodes/2"))
    ok(c.run("bpctl", "-S", "1", "-s", "unavailable"))
    ok(c.down())
    c.up()
    st = os.stat(f"{c.mount}/nodes/2")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o110, alice.uid, alice.gid)
    assert c.read("nodes/1/status") == "unavailable\n"
    assert c.read("nodes/0/status") == "up\n"


def test_a_node_killed_with_sigkill_goes_down_and_events_say_so(make_cluster) -> None:
    c = make_cluster(nodes=2)
    pid = int(open(os.path.join(c.state_dir, "pids", "node-1.pid")).read().split()[0])
    fd = os.open(os.path.join(c.mount, "events"), os.O_RDONLY)
    try:
        killed = time.monotonic()
        os.kill(pid, 9)
        c.wait_for(lambda: c.read("nodes/1/status") == "down\n", timeout=2 + 3,
                   what="node 1 to be marked down within the ping timeout (2 s)")
        took = time.monotonic() - killed
        events = formats.parse_events(os.read(fd, 65536).decode())
        assert any(e.kind == "node" and e.id == 1 and "down" in f"{e.what} {e.detail}"
                   for e in events), events
    finally:
        os.close(fd)
    assert took < 2 + 1.5
    assert c.read("nodes/0/status") == "up\n"
    rows = ok(c.run("bpstat")).splitlines()[1:]
    assert ["1", "down"] in [r.split()[:2] for r in rows]


def test_a_node_with_the_wrong_key_is_refused_and_logged(cluster: Cluster, tmp_path) -> None:
    key = tmp_path / "wrong.key"
    key.write_text("f" * 64 + "\n")
    key.chmod(0o600)
    r = cluster.run("bpslave", "--master", f"127.0.0.1:{cluster.port}", "--key", str(key),
                    "--node", "7", timeout=30)
    assert r.returncode != 0
    assert "key" in r.stderr.decode().lower()
    assert not os.path.exists(os.path.join(cluster.mount, "nodes/7"))
    log = open(os.path.join(cluster.state_dir, "logs", "master.log")).read()
    assert "127.0.0.1" in log and "key" in log.lower()

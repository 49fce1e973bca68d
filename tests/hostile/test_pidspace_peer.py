"""A node (it holds the key) that abuses the one PID space's messages.

A node may ask for a ghost only under a process it runs, and the master's kill for it is a
kill by the uids it names, never of the whole machine (-1), of init, or of the master: a
node cannot make the master fork, rename or signal beyond that. Unknown `execed` and
`unforked` are ignored, and the connection goes on.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time

import pytest
import trio

from tests.cluster.test_master import Master, fake_node, master, wait_for  # noqa: F401

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting with allow_other needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="no FUSE"),
]


def answers(node, tag: str) -> list[dict]:
    return [m for m in node.received if m["t"] == tag]


def test_a_node_gets_no_ghost_under_a_process_it_does_not_run(master: Master) -> None:
    before = set(os.listdir("/proc"))

    async def go() -> None:
        async with fake_node(master) as node:
            for seq, parent in enumerate((1, master.proc.pid, os.getpid(), 4_000_000), 1):
                await node.fs.send({"t": "fork", "seq": seq, "parent": parent})
            await wait_for(lambda: len(answers(node, "forked")) == 4)
            for a in answers(node, "forked"):
                assert a["errno"] == errno.EAGAIN and a["pid"] is None, a
            await node.fs.send({"t": "execed", "pid": os.getpid(), "id": 1,
                                "cmdline": b"evil\0"})
            await node.fs.send({"t": "unforked", "pid": os.getpid(), "id": 1})
            await node.fs.send({"t": "fork", "seq": 9, "parent": 1})
            await wait_for(lambda: len(answers(node, "forked")) == 5)
            assert not node.closed.is_set()
    trio.run(go)
    with open(f"/proc/{os.getpid()}/comm") as f:
        assert f.read().strip() != "evil"
    assert master.proc.poll() is None
    new = set(os.listdir("/proc")) - before
    assert not [p for p in new if p.isdigit() and _ppid(int(p)) == master.proc.pid
                and _comm(int(p)) not in ("", "bpfs-doorbell", "bpfs-relayfork")]


def test_kill_for_a_node_is_the_callers_and_never_the_machines(master: Master, users) -> None:
    bob = users["bob"]
    roots = subprocess.Popen(["sleep", "30"])
    bobs = subprocess.Popen(["setpriv", f"--reuid={bob.uid}", f"--regid={bob.gid}",
                             "--clear-groups", "sleep", "30"])
    try:
        # setpriv drops to bob only after it starts: until then the process is root's,
        # and the master's kill as bob rightly says EPERM (CI caught that race).
        deadline = time.monotonic() + 10
        while _uids(bobs.pid) != [bob.uid] * 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _uids(bobs.pid) == [bob.uid] * 4
        async def go() -> None:
            async with fake_node(master) as node:
                asks = [(-1, 0, 0), (0, 0, 0), (1, 0, 0), (master.proc.pid, 0, 0),
                        (-master.proc.pid, 0, 0), (roots.pid, bob.uid, bob.uid),
                        (4_000_000, bob.uid, bob.uid), (bobs.pid, bob.uid, bob.uid)]
                for seq, (pid, ruid, euid) in enumerate(asks, 1):
                    await node.fs.send({"t": "kill", "seq": seq, "pid": pid,
                                        "sig": signal.SIGTERM, "ruid": ruid, "euid": euid})
                await wait_for(lambda: len(answers(node, "killed")) == len(asks))
                got = {a["seq"]: a["errno"] for a in answers(node, "killed")}
                assert got == {1: errno.EINVAL, 2: errno.EINVAL, 3: errno.EPERM,
                               4: errno.EPERM, 5: errno.EPERM, 6: errno.EPERM,
                               7: errno.ESRCH, 8: None}, got
        trio.run(go)
        assert bobs.wait(timeout=5) == -signal.SIGTERM
        assert roots.poll() is None and master.proc.poll() is None
        with open(f"/proc/{master.proc.pid}/status") as f:     # root again after the kills
            assert "Uid:\t0\t0\t0\t0" in f.read()
    finally:
        for p in (roots, bobs):
            if p.poll() is None:
                p.kill()
                p.wait()


def _uids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("Uid:"))
        return [int(u) for u in line.split()[1:]]
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_a_node_takes_only_the_spares_it_was_given(master: Master) -> None:
    """A node given two spares for a process (it forked twice in a row) claims them with
    `took`; a claim of another PID, another id (the other spare's too), under another
    parent, or of a spare taken already is refused (`nottaken`) and logged, and disturbs
    nothing: the spares it was given are still its own, taken in order as children of
    that process's ghost; each `took` brings the next spare, so the pair is refilled.
    Once the node is gone, no spare is left."""
    from tests.cluster.test_master_procs import proc_state, request, restored, writer
    spares: list[int] = []

    async def go() -> None:
        async with fake_node(master) as node:
            await wait_for(lambda: master.read("nodes/0/status") == "up\n")
            proc = writer(master, 0, request())
            try:
                await restored(master, node, proc)
                g = proc.pid
                for seq in (1, 2):      # twice in a row: the second brings two spares
                    await node.fs.send({"t": "fork", "seq": seq, "parent": g})
                await wait_for(lambda: len(answers(node, "spare")) == 2, what="two spares")
                (a, b) = [(s["pid"], s["id"]) for s in answers(node, "spare")]
                for s in answers(node, "spare"):
                    assert s["parent"] == g and _ppid(s["pid"]) == g
                    assert str(s["pid"]) not in os.listdir(master.path("procs"))
                assert a != b and a[0] != b[0]
                forged = [(g, a[0], b[1]), (g, b[0], a[1]), (g, b[0], b[1] + 1),
                          (os.getpid(), b[0], b[1]), (g, max(a[0], b[0]) + 1, a[1])]
                for parent, p, m in forged:
                    await node.fs.send({"t": "took", "parent": parent, "pid": p, "id": m})
                await wait_for(lambda: len(answers(node, "nottaken")) == len(forged))
                assert master.log().count("claims pid") == len(forged)
                assert _ppid(a[0]) == g and _ppid(b[0]) == g and not node.closed.is_set()
                for k, (pid, mid) in enumerate((a, b), 1):
                    await node.fs.send({"t": "took", "parent": g, "pid": pid, "id": mid})
                    await wait_for(lambda: proc_state(master, pid) == "running")
                    assert master.read(f"procs/{pid}/node").strip() == "0"
                    await wait_for(lambda: len(answers(node, "spare")) == 2 + k,
                                   what="the next spare")
                # taken already: no longer a spare
                await node.fs.send({"t": "took", "parent": g, "pid": a[0], "id": a[1]})
                await wait_for(lambda: len(answers(node, "nottaken")) == len(forged) + 1)
                assert proc_state(master, a[0]) == "running"
                spares.extend(s["pid"] for s in answers(node, "spare"))
                assert len(set(spares)) == 4 and all(_ppid(p) == g for p in spares[2:])
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    trio.run(go)
    deadline = time.monotonic() + 10
    while any(_comm(p) for p in spares[2:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_comm(p) for p in spares[2:])
    assert master.proc.poll() is None

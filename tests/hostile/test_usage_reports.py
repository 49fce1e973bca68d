"""A node's usage reports with a real master and fake nodes: a node speaks only for what it
holds, and a node that does not answer `sample` costs a reader one short wait."""

from __future__ import annotations

import time

import pytest
import trio

from bpfs import formats
from bpfs.wire import messages as m
from tests.cluster.test_master import Master, fake_node, master, wait_for  # noqa: F401
from tests.cluster.test_master_procs import messages, reap, request, restored, writer

pytestmark = pytest.mark.timeout(60)


def entry(pid: int, mid: int, utime: int) -> list:
    return [pid, mid, "R", "spin", utime, 0, 0, 0, 5, 0, 0, 0, 0, 1, 500, 8192, 4096]


def usage_of(master: Master, pid: int):
    return formats.parse_proc_status(master.read(f"procs/{pid}/status")).usage


async def read_in_thread(master: Master, rel: str) -> tuple[str, float]:
    t = time.monotonic()
    text = await trio.to_thread.run_sync(master.read, rel)
    return text, time.monotonic() - t


async def test_a_node_cannot_report_another_nodes_process(master: Master) -> None:
    async with fake_node(master, number=1) as node, fake_node(master, number=2) as other:
        await wait_for(lambda: master.read("nodes/1/status") == "up\n"
                       and master.read("nodes/2/status") == "up\n")
        proc = writer(master, 1, request())
        try:
            mid = (await restored(master, node, proc))["id"]
            pid = proc.pid
            await other.fs.send({"t": "usage", "hz": 100, "at": 1.0,
                                 "procs": [entry(pid, mid, 500)]})      # not node 2's
            await node.fs.send({"t": "usage", "hz": 100, "at": 1.0,
                                "procs": [entry(pid, mid + 1, 700)]})   # not that restore's
            await trio.sleep(0.3)
            assert usage_of(master, pid) is None
            await node.fs.send({"t": "usage", "hz": 100, "at": 1.0,
                                "procs": [entry(pid, mid, 300), entry(1, 0, 9)]})
            await wait_for(lambda: usage_of(master, pid) is not None, what="taken")
            assert usage_of(master, pid).utime == 3.0
            assert not messages(other, "sample")
            # old figures: a read asks node 1, which never answers: one short wait, then none
            await trio.sleep(0.6)
            asked = len(messages(node, "sample"))
            text, took = await read_in_thread(master, f"procs/{pid}/stat")
            assert text.startswith(f"{pid} (spin) R ") and 0.2 < took < 2.0
            assert len(messages(node, "sample")) == asked + 1
            _, again = await read_in_thread(master, f"procs/{pid}/status")
            assert again < 0.2
        finally:
            reap(proc)


async def test_a_flood_of_entries_over_the_bound_closes_only_that_node(master: Master) -> None:
    async with fake_node(master, number=1) as node:
        await wait_for(lambda: master.read("nodes/1/status") == "up\n")
        await node.fs.send({"t": "usage", "hz": 100, "at": 1.0,
                            "procs": [entry(5, 0, 1)] * (m.MAX_USAGE + 1)})
        await wait_for(lambda: master.read("nodes/1/status") == "down\n", timeout=5)
    assert "usage.procs: expected `array` of length <= 65536" in master.log()

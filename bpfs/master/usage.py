"""Remote usage on the master: the nodes' reports into the model, and fresh figures on demand.

    usage = UsageService(cluster, send_node, interval=2.0)
    await nursery.start(usage.run)
    usage.on_usage(node, msg)           a node's `usage` (bpfs/master/links.py's FROM_NODE)
    usage.node_lost(node)
    await usage.fresh(pid)              before procs/P/stat or status is rendered

Nodes report every `interval` seconds by themselves (the interval goes to them in
`welcome`). A reader of procs/P/stat or status who finds the figures older than
MAX_AGE asks the process's node for a report at once (`sample`) and waits for it, at
most WAIT seconds; every reader of that node's processes meanwhile waits for the same
report, so `bpstat -p` over a thousand processes costs each node one report. A node
that does not answer in time is not asked again (and nobody waits for it) until
`interval` has passed: a slow or old node delays one reader once, never each of them.
Only a node that has sent `usage` is ever asked (an older node would take `sample` for
a protocol error). Nothing here blocks the event loop: waits are trio waits with a
deadline, the `sample` is sent by a task of the service.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

from bpfs.errors import BpfsError
from bpfs.model import Cluster
from bpfs.wire import messages

log = logging.getLogger("bpfs.master.usage")

INTERVAL = 2.0          # seconds between a node's reports (bpfs master --usage-interval)
MAX_AGE = 0.5           # figures older than this are refreshed for a reader
WAIT = 0.3              # how long a reader waits for the refresh at most

SendNode = Callable[[int, messages.Msg], Awaitable[None]]


class UsageService:
    """The nodes' usage reports (see the module doc)."""

    def __init__(self, cluster: Cluster, send_node: SendNode, interval: float = INTERVAL,
                 max_age: float = MAX_AGE, wait: float = WAIT) -> None:
        self.cluster = cluster
        self.send_node = send_node
        self.interval = interval
        self.max_age = max_age
        self.wait = wait
        self.reporting: set[int] = set()            # nodes that have sent `usage`
        self._asked: dict[int, float] = {}          # node -> when `sample` went (monotonic)
        self._reported: dict[int, trio.Event] = {}  # node -> set at its next report
        self._nursery: trio.Nursery | None = None
        self.reports = 0                            # counters, for bench/usage.py
        self.report_bytes = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def on_usage(self, node: int, msg: messages.Usage) -> None:
        self.cluster.record_usage(node, msg.hz, msg.at, msg.procs, trio.current_time())
        self.reports += 1
        self.reporting.add(node)
        self._asked.pop(node, None)
        ev = self._reported.pop(node, None)
        if ev is not None:
            ev.set()

    def node_lost(self, node: int) -> None:
        self.reporting.discard(node)
        self._asked.pop(node, None)
        ev = self._reported.pop(node, None)
        if ev is not None:
            ev.set()

    async def fresh(self, pid: int) -> None:
        """Make `pid`'s figures at most MAX_AGE old if its node answers within WAIT."""
        p = self.cluster.procs.get(pid)
        now = trio.current_time()
        if p is None or p.state in ("exited", "starting") or now - p.usage_at <= self.max_age \
                or p.node not in self.reporting:
            return
        node = p.node
        asked = self._asked.get(node)
        if asked is None or now - asked > self.interval:
            asked = self._ask(node, now)
        ev = self._reported.get(node)
        if ev is not None:
            with trio.move_on_at(asked + self.wait):
                await ev.wait()

    def _ask(self, node: int, now: float) -> float:
        self._asked[node] = now
        self._reported.setdefault(node, trio.Event())
        if self._nursery is not None:
            self._nursery.start_soon(self._send_sample, node)
        return now

    async def _send_sample(self, node: int) -> None:
        try:
            await self.send_node(node, messages.Sample())
        except BpfsError as exc:
            log.debug("node %d: sample not sent: %s", node, exc)

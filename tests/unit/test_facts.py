"""Node facts: every field's type and range, and the cost of gathering them."""

from __future__ import annotations

import os
import time

from bpfs.formats import Facts
from bpfs.node.facts import facts
from bpfs.wire import messages


def test_a_formats_facts_with_every_field_set():
    f = facts()
    assert isinstance(f, Facts)
    assert f.__record_fields__ == tuple(messages.FACT_TYPES)


def test_types_and_ranges():
    f = facts()
    assert isinstance(f.hostname, str) and f.hostname == os.uname().nodename
    assert isinstance(f.cpus, int) and 1 <= f.cpus <= 65536
    assert isinstance(f.arch, str) and f.arch == os.uname().machine
    assert isinstance(f.kernel, str) and f.kernel == os.uname().release
    assert isinstance(f.load, tuple) and len(f.load) == 3
    assert all(isinstance(x, float) and 0 <= x < 1e6 for x in f.load)
    assert isinstance(f.mem_total, int) and f.mem_total > 16 * 2**20
    assert isinstance(f.mem_available, int) and 0 <= f.mem_available <= f.mem_total
    assert isinstance(f.uptime, float) and 0 < f.uptime < 100 * 365 * 86400


def test_uptime_advances():
    a = facts().uptime
    time.sleep(0.05)
    assert facts().uptime >= a


def test_survives_the_wire():
    """What the node sends in `facts` is what the master keeps (within the bounds, and the
    words need no sanitizing)."""
    f = facts()
    body = messages.encode(messages.Facts(facts=messages.NodeFacts.of(f)))
    assert messages.FROM_NODE.decode(body).facts.facts() == f


def test_cheap_enough_for_every_heartbeat():
    facts()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        facts()
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 1e-3, f"facts() takes {per_call * 1e6:.0f} µs"

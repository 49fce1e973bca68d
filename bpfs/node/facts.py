"""What a node tells the master about itself: the FACTS map of the wire protocol.

    FACTS := {"hostname": str, "cpus": int >= 1, "arch": str, "kernel": str,
              "load": [l1, l5, l15] (floats >= 0), "mem_total": int > 0 (bytes),
              "mem_available": int in [0, mem_total], "uptime": float >= 0 (seconds)}

Sent with `register` and then on every heartbeat, so it must be cheap: one
uname(), one getloadavg(), one read of /proc/meminfo (psutil) and one of
/proc/uptime; the CPU count does not change while we run and is read once.
About 30 µs in all on the development machine (see tests/unit/test_facts.py).

Under a UTS namespace the hostname is the simulated node's (nN); memory, load
and uptime are the host's, as the kernel does not namespace them.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import psutil

Facts = dict[str, Any]


@functools.lru_cache(maxsize=1)
def _cpus() -> int:
    return psutil.cpu_count(logical=True) or os.cpu_count() or 1


def _uptime() -> float:
    """Seconds since boot, from /proc/uptime; psutil.boot_time() minus now drifts with NTP."""
    try:
        with open("/proc/uptime", "rb") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return max(0.0, time.time() - psutil.boot_time())


def facts() -> Facts:
    """The node's facts now. Never raises for a readable /proc."""
    un = os.uname()
    mem = psutil.virtual_memory()
    return {
        "hostname": un.nodename,
        "cpus": _cpus(),
        "arch": un.machine,
        "kernel": un.release,
        "load": [round(x, 2) for x in os.getloadavg()],
        "mem_total": int(mem.total),
        "mem_available": int(min(mem.available, mem.total)),
        "uptime": round(_uptime(), 2),
    }

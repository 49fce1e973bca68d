"""What a node tells the master about itself: a bpfs.formats.Facts, read now.

    hostname, arch, kernel: uname(); cpus >= 1; load: (l1, l5, l15), floats >= 0;
    mem_total > 0 and mem_available in [0, mem_total] (bytes); uptime >= 0 (seconds)
    (the wire's bounds: bpfs/wire/messages.py's FACT_TYPES)

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

import psutil

from bpfs.formats import Facts


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
    l1, l5, l15 = os.getloadavg()
    return Facts(un.nodename, _cpus(), un.machine, un.release,
                 (round(l1, 2), round(l5, 2), round(l15, 2)), int(mem.total),
                 int(min(mem.available, mem.total)), round(_uptime(), 2))

"""procs/P/stat: proc(5)'s stat line of a migrated process, as its ghost's would be.

The figures are the node's (model.Proc.usage, bpfs/usage.py); the job-control ids
(ppid, pgrp, session, tty_nr, tpgid) are the ghost's, read from the master's own
/proc/P/stat, since the ghost is the process the master's shell and terminal deal with.
Times are in the master's clock ticks and `starttime` in ticks since the master's boot,
so a reader computes elapsed times and %CPU as for a local process. Before the node's
first report the line has the model's state and start and zero usage.
"""

from __future__ import annotations

import os

from bpfs.model import Cluster, Proc
from bpfs.usage import Usage, parse_stat, render_stat, stat_int

HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
_LETTERS = {"starting": "R", "running": "R", "stopped": "T", "exited": "Z"}


def _boot_time() -> float:
    """btime of the master's /proc/stat: the epoch second it booted."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


BOOT = _boot_time()


def ghost_ids(pid: int) -> tuple[int, int, int, int, int]:
    """ppid, pgrp, session, tty_nr, tpgid of the master's process `pid` (zeros if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            _, rest = parse_stat(f.read())
        return tuple(stat_int(rest, n) for n in range(4, 9))   # type: ignore[return-value]
    except (OSError, ValueError):
        return (0, 0, 0, 0, 0)


def placeholder(p: Proc) -> Usage:
    """What stat shows before the node's first report: the model's state and start."""
    words = p.cmd.split()
    comm = os.path.basename(words[0])[:15] if words else "?"
    return Usage(state=_LETTERS.get(p.state, "R"), comm=comm, started=p.started)


def render(cluster: Cluster, pid: int) -> str:
    p = cluster.proc(pid)
    return render_stat(pid, p.usage or placeholder(p), ghost_ids(pid), HZ, BOOT, PAGE)

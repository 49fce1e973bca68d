"""The usage reports' messages (bpfs/node/usage.py, bpfs/master/usage.py). Their grammar is
in bpfs/wire/messages.py's docstring."""

from __future__ import annotations

from typing import Annotated, Optional

from msgspec import Meta, Struct

from bpfs.wire.grammar import *  # noqa: F401,F403  (the bounded types)
from bpfs.wire.grammar import Msg, _bytes, _int, _num, _str  # noqa: F401

class Sample(Msg, tag="sample"):
    sender = "master"


class ProcUsage(Struct, frozen=True, array_like=True):
    """One process's figures in `usage` (bpfs.usage.Sample's fields, bounded)."""
    pid: PID
    id: ID
    state: LETTER
    comm: COMM
    utime: TICKS
    stime: TICKS
    cutime: TICKS
    cstime: TICKS
    minflt: COUNT
    majflt: COUNT
    cminflt: COUNT
    cmajflt: COUNT
    nice: _int(-20, 19)
    threads: _int(0, 1 << 22)
    age: TICKS
    vsize: BYTES
    rss: BYTES


class Usage(Msg, tag="usage"):
    sender = "node"
    hz: _int(1, 10**6)
    at: SECONDS
    procs: Annotated[list[ProcUsage], Meta(max_length=MAX_USAGE)]

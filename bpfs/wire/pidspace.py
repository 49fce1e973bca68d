"""The one PID space's messages (bpfs/node/supervisor.py, bpfs/master/forks.py,
bpfs/master/nodeexec.py): forks, exec, ends and signals of the processes on nodes, and
launches from nodes. Their grammar is in bpfs/wire/messages.py's docstring."""

from __future__ import annotations

from typing import Annotated, Optional

from msgspec import Meta, Struct

from bpfs.wire.grammar import *  # noqa: F401,F403  (the bounded types)
from bpfs.wire.grammar import Msg, _bytes, _int, _num, _str  # noqa: F401

# ---- one PID space: the node's supervisor (bpfs/node/supervisor.py) and the master ----

class Fork(Msg, tag="fork"):
    """`parent`, on this node, is forking: a ghost child of its ghost, please."""
    sender = "node"
    seq: ID
    parent: PID


class Forked(Msg, tag="forked"):
    """The answer to `fork`: the new ghost's PID (the child's PID on the node too) and
    the id its messages carry, or the errno the fork fails with."""
    sender = "master"
    seq: ID
    pid: Optional[PID] = None
    id: Optional[ID] = None
    errno: Optional[ERRNO] = None


class Unforked(Msg, tag="unforked"):
    """The fork that `pid` was made for did not happen: its ghost must go, unseen. Also
    a spare the node gives back unused (`spare`): it goes the same way."""
    sender = "node"
    pid: PID
    id: ID


class Spare(Msg, tag="spare"):
    """A ghost child of `parent`'s ghost made ahead of one of its next forks on the node
    (a parent that forks again and again: two are given ahead, the next one after each
    `took`): the node gives `pid` to a fork at once, with no round trip, and says so
    (`took`); or gives it back unused (`unforked`)."""
    sender = "master"
    parent: PID
    pid: PID
    id: ID


class Took(Msg, tag="took"):
    """`parent` forked, and its child took the spare `pid` the master gave for it (its
    messages carry `id`); the master records it as it records a `forked` child.
    `waited`: the fork found no spare in hand and waited for this one on its way (the
    master counts those: with two spares ahead, a steady loop should have none)."""
    sender = "node"
    parent: PID
    pid: PID
    id: ID
    waited: Optional[bool] = None


class NotTaken(Msg, tag="nottaken"):
    """The answer to a `took` the master refuses (`pid` is not the spare it gave this
    node for that parent): the child has no ghost; the node ends it."""
    sender = "master"
    pid: PID
    id: ID


class Execed(Msg, tag="execed"):
    """`pid` ran execve: its command line (NUL-separated, as /proc/PID/cmdline) is now
    `cmdline`; its ghost takes it."""
    sender = "node"
    pid: PID
    id: ID
    cmdline: _bytes(0, 65536)


class Kill(Msg, tag="kill"):
    """A process on the node signals `pid` (a process group if negative), which is not on
    this node: the master delivers it with the caller's real and effective uid."""
    sender = "node"
    seq: ID
    pid: _int(-(1 << 22), 1 << 22)
    sig: _int(0, 64)
    ruid: ID32
    euid: ID32


class Killed(Msg, tag="killed"):
    """The answer to `kill`: None, or the errno kill(2) gives the caller."""
    sender = "master"
    seq: ID
    errno: Optional[ERRNO] = None


class Watch(Msg, tag="watch"):
    """A process on the node opened a pidfd of `pid`, which is not on this node: answer
    as kill(pid, 0) would with the caller's uids (`killed`), then say when it ends
    (`ended`): the node's proxy for it (bpfs/node/pidproxy.py) ends then."""
    sender = "node"
    seq: ID
    pid: PID
    ruid: ID32
    euid: ID32


class Armed(Msg, tag="armed"):
    """`pid` on this node wrote an execmove that the master took: its next execve is the
    master's to run (in its ghost) and migrate (sent before the write's own answer)."""
    sender = "master"
    pid: PID


ARG = _bytes(0, 131072)             # one word of argv or envp (MAX_ARG_STRLEN)
ARGS = Annotated[list[ARG], Meta(max_length=65536)]


class Exec(Msg, tag="exec"):
    """An armed `pid` runs execve(path, argv, envp) in `cwd`: the master runs it in its
    ghost and migrates it; the answer is `execd`."""
    sender = "node"
    seq: ID
    pid: PID
    path: _bytes(1, 4096)
    argv: ARGS
    envp: ARGS
    cwd: _bytes(1, 4096)


class Ended(Msg, tag="ended"):
    """The program `pid` launched from this node ended elsewhere with wait `status`: its
    stand-in here ends the same way (bpfs/standin.py)."""
    sender = "master"
    pid: PID
    status: _int(0, 0xFFFF)


class Execd(Msg, tag="execd"):
    """The answer to `exec`: None (the program runs, migrated: the caller waits for it as
    a stand-in), or the errno its execve fails with."""
    sender = "master"
    seq: ID
    errno: Optional[ERRNO] = None

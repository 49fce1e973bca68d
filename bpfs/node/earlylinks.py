"""A moved process's stdio links, connected at its `again`, before its `restore` is in.

    on_again(session, msg)              `again` with the restore's link fields: connect now
    links_for(session, req, pid)        the restore's links: those, if they fit, else new

Why: the master sends `again` right before the `restore`, whose image (a MB or more) takes
a millisecond to arrive; the links' connects and headers took 0.3 ms of the restore's
path once it was in (bench/results-move.md, branch move-small2). Made at `again`, they are
ready when the restore starts. They are the restore's only if its request names the same
server, token, PID, specs and consumed count (else closed, and made as before); those of
a restore that never comes are closed at its `abort`, when MAX_EARLY newer ones wait, or
at the session's end. A connect that fails early is forgotten: the restore connects
again itself and reports what it finds.
"""

from __future__ import annotations

import logging
from typing import Any

from bpfs.errors import BpfsError
from bpfs.node import stdio
from bpfs.wire import messages

log = logging.getLogger("bpslave")

MAX_EARLY = 16


def _key(host: str, port: int, token: str, pid: int, io: Any, consumed: int) -> tuple:
    return (host, port, token, pid, tuple(io), consumed)


def _again(host: str, port: int, token: str, pid: int, io: Any,
           consumed: int) -> stdio.Links:
    return stdio.Links.again(io, {
        n: stdio.LinkTarget(host, port, token, pid, consumed if n == 0 else 0)
        for n, spec in enumerate(io) if spec == "socket"})


def on_again(session: Any, msg: messages.Again) -> None:
    """Connect the links `msg` names, if it names them (the master's `again`)."""
    if None in (msg.port, msg.token, msg.io, msg.pid):
        return
    host = msg.host or session.node.cfg.host
    try:
        links = _again(host, msg.port, msg.token, msg.pid, msg.io, msg.consumed)
        links.ready()                       # the connects over (loopback): headers sent
    except BpfsError as exc:
        log.debug("restore %d: its links not made early: %s", msg.id, exc)
        return
    drop(session, msg.id)
    while len(session.early) >= MAX_EARLY:
        drop(session, next(iter(session.early)))
    session.early[msg.id] = (_key(host, msg.port, msg.token, msg.pid, msg.io, msg.consumed),
                             links)


def links_for(session: Any, req: messages.Restore, pid: int) -> stdio.Links:
    """Restore `req`'s links for `pid`: first ones, or made again (an `again` came), those
    made early if they are the same."""
    host = req.host or session.node.cfg.host
    consumed = session.again.pop(req.id, None)
    early = session.early.pop(req.id, None)
    if consumed is None:
        if early is not None:
            early[1].close()
        return stdio.Links(host, req.port, req.token, pid, req.io)
    if early is not None:
        if early[0] == _key(host, req.port, req.token, pid, req.io, consumed):
            return early[1]
        early[1].close()
    return _again(host, req.port, req.token, pid, req.io, consumed)


def drop(session: Any, rid: int) -> None:
    early = session.early.pop(rid, None)
    if early is not None:
        early[1].close()


def drop_all(session: Any) -> None:
    for rid in list(session.early):
        drop(session, rid)

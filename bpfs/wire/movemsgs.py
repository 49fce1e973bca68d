"""Moving a running process (bpfs/master/moves.py, bpfs/node/mover.py): the node that has
it dumps it and waits for the verdict; the target restores it (`restore` with `again`).
Their grammar is in bpfs/wire/messages.py's docstring, with that of the direct stream: a
moving process's pages sent from node to node (`open`, `chunk`: bpfs/node/direct.py)."""

from __future__ import annotations

from typing import Annotated, Optional

from msgspec import Meta

from bpfs.wire.grammar import *  # noqa: F401,F403  (the bounded types)
from bpfs.wire.grammar import Msg, _bytes, _int  # noqa: F401

PART = 8 << 20                      # bytes of an image in one `part` (below every frame limit)
FD = _int(0, 2)
# A piece decodes as a view of the frame it came in (no copy: the receiver copies it into
# place at once, bpfs/migrate/imagebuf.py); the frame stays alive as long as the view.
PIECE = Annotated[memoryview, Meta(min_length=1, max_length=PART)]
IMAGE = Annotated[memoryview, Meta(max_length=PART)]     # a `dumped`'s: a view too
TOKEN = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]     # 256 random bits, in hex


class Dump(Msg, tag="dump"):
    """Stop `pid` (a process this node restored) and dump it for a move: `dumped` (after
    any number of `part`s) or `failed`, with this `id`; then it waits, stopped, for `drop`
    or `resume`. The node stops it before it reads its next message (a process that
    moves itself is stopped before its ctl write is answered). `links`: its fds that are
    stdio links (sockets to its stdio server), made again by the target."""
    sender = "master"
    id: ID
    pid: PID
    links: Optional[Annotated[tuple[FD, ...], Meta(max_length=3)]] = None
    # where its pages go straight (a move to a node that `taking` answered): connect to
    # `host`:`port` within a second and open with restore `to`'s id and `token`, else
    # send them as before
    host: Optional[ADDRESS] = None
    port: Optional[_int(1, 65535)] = None
    token: Optional[TOKEN] = None
    to: Optional[ID] = None
    # or: a `way` follows with them (asked of the target meanwhile); a small image does
    # not wait for it, it goes through the master
    way: Optional[bool] = None
    # straight only for an image with big runs (a move home: a small one comes whole, in
    # one `dumped`, which the master restores at once)
    big_only: Optional[bool] = None


class Way(Msg, tag="way"):
    """Where the pages of move `id` (a `dump` of `pid` that said `way`) go: `host`,
    `port`, `token`, `to` as a `dump`'s; none of them: through the master."""
    sender = "master"
    id: ID
    pid: PID
    host: Optional[ADDRESS] = None
    port: Optional[_int(1, 65535)] = None
    token: Optional[TOKEN] = None
    to: Optional[ID] = None


class Part(Msg, tag="part"):
    """A piece of the image of move `id`, ahead of its `dumped`, in order. The first says
    the image's `total` size and how many bytes of its stdin link the process had read
    (`consumed`): a master moving it to a node forwards each part as it comes (a `piece`
    behind a `restore` that needs `consumed`), one moving it home gathers them."""
    sender = "node"
    id: ID
    data: PIECE
    total: Optional[BYTES] = None
    consumed: Optional[BYTES] = None
    direct: Optional[bool] = None   # (first part) the rest goes straight to the target


class Streamed(Msg, tag="streamed"):
    """Restore `id` (next) has an image of `total` bytes: its `image` is the first piece,
    the rest follows in `piece`s."""
    sender = "master"
    id: ID
    total: BYTES


class Piece(Msg, tag="piece"):
    """The bytes of restore `id`'s image from offset `at`, behind a `streamed` restore
    (whose `image` is the first piece). The node takes them in order only (`at`
    is where the last one ended) and within the total: else that restore fails (EPROTO,
    EFBIG) and later pieces of it are ignored. It writes their pages into the process
    being built as they come (bpfs/node/streamin.py)."""
    sender = "master"
    id: ID
    at: BYTES
    data: PIECE


class Abort(Msg, tag="abort"):
    """Restore `id`, whose image was coming in pieces, will not be finished (its source
    failed, or the master gave up): the node discards what it built, unreported."""
    sender = "master"
    id: ID


class Dumped(Msg, tag="dumped"):
    """The image of move `id` is the `part`s sent before this, then `image`; `consumed`:
    how many bytes of its stdin link the process had read when it stopped (also in the
    first `part`, if any)."""
    sender = "node"
    id: ID
    image: IMAGE
    consumed: Optional[BYTES] = None


class Relayed(Msg, tag="relayed"):
    """Move `id` is of a process forked on this node: it stays here as its stand-in once
    it runs elsewhere (bpfs/node/standins.py), and its stdio links go to the relay that
    listens at this node's address, `port`, with `token` (before its `dumped`)."""
    sender = "node"
    id: ID
    port: _int(1, 65535)
    token: WORD                     # the master checks it: 32 hex digits


class Drop(Msg, tag="drop"):
    """Move `id` is done elsewhere: end the stopped copy of `pid` here, unreported."""
    sender = "master"
    id: ID
    pid: PID


class Resume(Msg, tag="resume"):
    """Move `id` failed: let `pid` go on here as it was; with `errno`, the write it was
    stopped in (its own `move`) fails with that."""
    sender = "master"
    id: ID
    pid: PID
    errno: Optional[ERRNO] = None


class Again(Msg, tag="again"):
    """Restore `id` (next) is of a process that moved: its links are made again
    (`TOKEN PID FD again CONSUMED`), and it had read `consumed` bytes of its stdin. With
    the restore's `port`, `token`, `io`, `pid` (and `host`), the node connects them now,
    while the image comes (bpfs/node/earlylinks.py)."""
    sender = "master"
    id: ID
    consumed: BYTES
    port: Optional[PORT] = None
    token: Optional[WORD] = None
    io: Optional[tuple[IO, IO, IO]] = None
    pid: Optional[PID] = None
    host: Optional[WORD] = None


class Take(Msg, tag="take"):
    """Restore `id` (next) may get its image's pages straight from the node that dumps
    it: listen for it and answer `taking` (or `failed`: the master then sends them)."""
    sender = "master"
    id: ID


class Taking(Msg, tag="taking"):
    """Restore `id` takes its pages at this node's address (the one it reaches the master
    from), `port`, from the first connection that opens with `token`."""
    sender = "node"
    id: ID
    port: _int(1, 65535)
    token: TOKEN


# ---- the direct stream: node -> node, on the connection a `taking` listens for ----------

class Open(Msg, tag="open"):
    """The first frame of a direct stream: its restore `id`, and the `token` the target
    gave for it (anything else, or a wrong token, and the target closes the connection)."""
    sender = "peer"
    id: ID
    token: TOKEN


class Chunk(Msg, tag="chunk"):
    """The bytes of restore `id`'s image from offset `at` (the pages after the header the
    master passed on), in order: taken as a `piece` (EPROTO, EFBIG as for one)."""
    sender = "peer"
    id: ID
    at: BYTES
    data: PIECE

"""The messages of the master <-> node protocol: one typed class each, checked as decoded.

Every message is a msgspec Struct below, tagged by its name in the "t" key of the
msgpack map (the frames are those of the dict-built protocol before it, byte for byte
where a field is set). bpfs/wire/framing.py frames and authenticates; it decodes each
payload with the decoder of the side at the other end (`FROM_NODE`, `FROM_MASTER`, or
`HANDSHAKE` until the handshake is over), so a handler gets an instance of one of these
classes whose every field is of its type and within its bounds. The classes ARE the
grammar (names in capitals are the bounded types defined below):

  handshake (framing.py; sent with the 4 KiB handshake frame limit):
    node   -> master  hello      v: VERSION, nonce: NONCE
    master -> node    challenge  v: VERSION, nonce: NONCE, mac: MAC
    node   -> master  auth       mac: MAC
    master -> node    ok
                      refused    errno: ERRNO, message: TEXT     (then the master closes; also
                                                                  a registration's refusal)
  registration and life (bpfs/master, bpfs/node/service.py):
    node   -> master  register   node: NODE | nil, facts: FACTS
    master -> node    welcome    node: NODE, heartbeat: seconds (> 0, at most 1e6),
                                 [pid_max: PID]        (the master's kernel's),
                                 [usage: seconds]    report `usage` this often (absent: never),
                                 [mount: PATH]       (BPROC_MOUNT: where the node mounts it)
    node   -> master  state      state: WORD          ("up" once booted)
                      facts      facts: FACTS         (the heartbeat)
    master -> node    ctl        cmd: WORD            ("reboot" | "halt" | "pwroff")
    master -> node    names      master: ADDRESS, nodes: [[NODE, ADDRESS]] (at most
                                 MAX_ITEMS)           the cluster's names (bpfs/hostsfile.py)
  migration (bpfs/master, bpfs/node/procs.py):
    master -> node    restore    id: ID, image: BLOB, uid: ID32, gid: ID32,
                                 groups: [ID32] (at most NGROUPS), io: [IO, IO, IO],
                                 port: PORT, token: WORD, [pid: PID], [rank: RANK],
                                 [ppid: PID], [pgid: PID], [sid: PID]   (the ghost's),
                                 [host: WORD]       (bpsh's address, if not the master's)
    node   -> master  need       id: ID, hashes: [HASH] (at most MAX_ITEMS)
    master -> node    files      id: ID, contents: {HASH: BLOB} (at most MAX_ITEMS)
    node   -> master  restored   id: ID, pid: PID
                      failed     id: ID, errno: ERRNO, message: TEXT
    master -> node    signal     pid: PID, sig: SIGNAL, [id: ID], [group: BOOL]
    node   -> master  stopped    pid: PID, [sig: SIGNAL]     the process stopped (a group stop)
                      continued  pid: PID                    ... and was continued (SIGCONT)
    node   -> master  exited     pid: PID, [code: 0..255], [signal: SIGNAL], [id: ID]
  one PID space (bpfs/node/supervisor.py, bpfs/master/forks.py):
    node   -> master  fork       seq: ID, parent: PID
    master -> node    forked     seq: ID, [pid: PID], [id: ID], [errno: ERRNO]
    node   -> master  unforked   pid: PID, id: ID     (also a spare given back unused)
    master -> node    spare      parent: PID, pid: PID, id: ID   (a ghost for a next fork;
                                 up to two held per parent)
    node   -> master  took       parent: PID, pid: PID, id: ID, [waited: BOOL]   (a fork
                                 took a spare; `waited`: for it, none was in hand)
    master -> node    nottaken   pid: PID, id: ID     (that `took` is refused: end it)
                      execed     pid: PID, id: ID, cmdline: bytes (at most 64 KiB)
                      kill       seq: ID, pid: -PID..PID, sig: 0..64, ruid: ID32, euid: ID32
                      watch      seq: ID, pid: PID, ruid: ID32, euid: ID32  (-> killed, ended)
    master -> node    killed     seq: ID, [errno: ERRNO]
                      armed      pid: PID            (its execmove from the node was taken)
    node   -> master  exec       seq: ID, pid: PID, path: bytes, argv: [bytes], envp: [bytes],
                                 cwd: bytes          (words at most 128 KiB, 65536 of them)
    master -> node    execd      seq: ID, [errno: ERRNO]
                      ended      pid: PID, status: 0..65535   (its stand-in ends so)
  moves (bpfs/master/moves.py, bpfs/node/mover.py, bpfs/node/direct.py):
    master -> node    take       id: ID     (to a move's target: its pages may come straight)
    node   -> master  taking     id: ID, port: 1..65535, token: TOKEN   (or failed)
    master -> node    dump       id: ID, pid: PID, links: [0..2] (at most 3),
                                 [host: ADDRESS, port: 1..65535, token: TOKEN, to: ID]
                                 (a `taking`'s, of restore `to`: send the pages there,
                                 else as below)
                                 [way: BOOL]   (or: they follow in a `way`)
    master -> node    way        id: ID, pid: PID, [host: ADDRESS, port: 1..65535,
                                 token: TOKEN, to: ID]   (a `taking`'s, once it came;
                                 none: through the master)
    node   -> master  part       id: ID, data: bytes (1..8 MiB), [total: BYTES],
                                 [consumed: BYTES], [direct: BOOL]  (image pieces, in
                                 order; the first says the total and the stdin read;
                                 `direct`: it is the header, the pages go straight)
                      dumped     id: ID, image: bytes (the last piece), [consumed: BYTES]
                      relayed    id: ID, port: 1..65535, token: WORD   (before
                                 `dumped`: a process forked there, its stdio relay)
                      (or failed id, errno, message)
    master -> node    piece      id: ID, at: BYTES, data: bytes (1..8 MiB)   (behind a
                                 `restore` with a total: the image from byte `at`, in order)
                      streamed   id: ID, total: BYTES  (ahead of a `restore`: its image is
                                 `total` bytes, `image` the first piece, `piece`s follow)
                      abort      id: ID     (that restore will not be finished: discard it)
                      again      id: ID, consumed: BYTES   (ahead of a `restore`: a moved
                                 process, its links made again; its stdin read so far)
                                 [port: PORT, token: WORD, io: [IO, IO, IO], pid: PID,
                                 host: WORD]   (the restore's: its links connect now)
                      drop       id: ID, pid: PID     (moved: end the stopped copy, unreported)
                      resume     id: ID, pid: PID, [errno: ERRNO]   (not moved: go on)
  the direct stream (node -> node, on the connection a `taking` listens for; DIRECT):
    node   -> node    open       id: ID, token: TOKEN       (first, in a 4 KiB frame)
                      chunk      id: ID, at: BYTES, data: bytes (1..8 MiB)   (in order)
    TOKEN := 64 hex digits (256 random bits, the target's, good for one connection)
  usage (bpfs/node/usage.py, bpfs/master/usage.py):
    master -> node    sample                         report `usage` now
    node   -> master  usage      hz: 1..10^6, at: SECONDS, procs: [PROCUSAGE] (at most
                                 MAX_USAGE): one per process the node holds
    PROCUSAGE := [pid: PID, id: ID, state: LETTER, comm: COMM, utime, stime, cutime,
                  cstime: TICKS, minflt, majflt, cminflt, cmajflt: COUNT, nice: -20..19,
                  threads: 0..PID_MAX, age: TICKS, vsize: BYTES, rss: BYTES]  (an array)
  the cluster seen from a node (bpfs/fs/remote.py asks, bpfs/fs/forwarded.py answers):
    node   -> master  fs_lookup  id: ID, parent: INODE, name: NAME
                      fs_getattr  id, ino
                      fs_setattr  id, ino, cred: CRED, [mode], [uid: ID32], [gid: ID32], [size]
                      fs_access  id, ino, mode: 0..7, cred
                      fs_opendir  id, ino, cred
                      fs_readdir  id, fh: ID, start: ID
                      fs_open    id, ino, flags: u32, cred
                      fs_release  id, fh
                      fs_read    id, fh, off: ID, size: 0..FS_DATA
                      fs_write   id, fh, off: ID, data: at most FS_DATA bytes
                      fs_cancel  id                         (its caller was interrupted)
    master -> node    fs_reply   id, [errno], [attr: ATTR], [fh], [data], [entries: [ENTRY]
                                 at most FS_ENTRIES], [ok: BOOL], [nonseekable: BOOL]
    CRED := {uid, gid: ID32, groups: [ID32] (at most NGROUPS), [pid: PID]}; ATTR := {ino,
            mode, nlink, uid, gid, size, time_ns, entry_timeout, attr_timeout}; ENTRY :=
            {name: NAME, attr: ATTR, next: ID}

    FACTS := bpfs.formats.Facts's fields, each bounded by FACT_TYPES: {hostname: WORD,
             cpus: 0..2^20, arch: WORD, kernel: WORD, load: [LOAD, LOAD, LOAD],
             mem_total: BYTES, mem_available: BYTES, uptime: SECONDS}

  In a migration, ID is the master's number for it; `image` is bpfs.migrate.dumps'
  bytes, `io` bpfs.wire.execreq's specs; `pid` is the ghost's PID (else the image's) and
  `rank`, with `pid`, a rank of a multi-node run (it goes into BPROC_RANK=XXXXXXX).
  The `id` of `signal` and `exited` names the restore the pid belongs to: a node
  signals only the process it restored for that migration, and the master takes an
  exit only for the migration that pid now belongs to (a late message about a reused
  pid is stale and ignored); absent, the pid alone decides (older peers). `group`
  true: a terminal's signal (Ctrl-C, Ctrl-\\, Ctrl-Z) or SIGCONT, for the job's whole
  process group on the node, as a terminal signals a local job.
  `usage` is sent every `usage` seconds of `welcome` (and at once after `sample`), only
  when `welcome` names the interval: a master that does not ask for it is never sent
  one, and the master sends `sample` only to a node that has sent `usage`. `at` is the
  node's clock (its uptime), the times are ticks of the node's `hz`, `age` the ticks since
  the process started; the master takes only the entries of processes it knows on that
  node (bpfs.model.Cluster.record_usage).
  An `fs_*` request is one operation of the FUSE mount a node daemon serves at the
  master's mount point (`welcome`'s `mount`) for the node's processes; `id` is the
  node's number for it, which the one `fs_reply` repeats (with `errno` for a refusal);
  `fs_release` and `fs_cancel` have none.
  CRED is the caller as the node's kernel told its daemon (`pid` is the node's number
  for it, for logs only): the master acts with exactly those ids, never more. An `fh`
  is the master's handle number, good only on the connection that opened it.
  `hello` keeps its shape in every protocol version, so a node of another version
  gets the master's `refused` rather than a protocol error.

Types: integers are never booleans and are bounded; seconds and loads are finite ints
or floats, given to handlers as floats; strings and byte strings have a maximum
length; lists and maps a maximum count. `[field]` may be absent or nil (the handler
gets None; a sender omits it when None). A field a class does not name is dropped
(map keys must be strings). What the types cannot say (an IO spec's syntax, a
state's meaning) the handler checks, with the field already of the right type.
After decoding, the facts' words go through `sanitize_word` (`NodeFacts.facts()`).

Refusals (`Side.decode` raises ProtocolError, EPROTO, whose message names the message
and the field, never echoing more than a few characters of the peer's data): a payload
that is not msgpack, or not a map with a string "t"; an unknown message; a message the
other side sends (a node sending `restore`); a handshake message in a session or the
reverse; a missing field; a field of the wrong type or out of bounds. The receiver
closes that one connection. Which messages may come when (`register` first, then
anything a registered node sends) is the receiver's dispatch table's to enforce.

Every list and map of every message has a maximum length, which the decoder checks
from the container's header before it builds it; strings and byte strings cannot be
longer than the frame. So no frame makes the receiver build a container larger than
the largest the grammar allows (MAX_ITEMS), whatever its headers claim.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Optional, Union, get_type_hints

import msgpack
import msgspec
from msgspec import Meta, Struct

from bpfs.errors import ProtocolError
from bpfs.wire.grammar import *  # noqa: F401,F403  (the bounded types: messages.PID...)
from bpfs.wire.grammar import Msg, _bytes, _int, _num, _str  # noqa: F401
from bpfs.wire.fsops import *  # noqa: F401,F403  (the groups of messages, re-exported)
from bpfs.wire.pidspace import *  # noqa: F401,F403
from bpfs.wire.movemsgs import *  # noqa: F401,F403
from bpfs.wire.usagemsgs import *  # noqa: F401,F403


# ---- the messages ---------------------------------------------------------------------------

class Hello(Msg, tag="hello"):
    sender = "node"
    handshake = True
    v: VERSION
    nonce: NONCE


class Challenge(Msg, tag="challenge"):
    sender = "master"
    handshake = True
    v: VERSION
    nonce: NONCE
    mac: MAC


class Auth(Msg, tag="auth"):
    sender = "node"
    handshake = True
    mac: MAC


class Ok(Msg, tag="ok"):
    sender = "master"
    handshake = True


class Refused(Msg, tag="refused"):
    sender = "master"
    handshake = None            # also a registration's refusal
    errno: ERRNO
    message: TEXT


class Register(Msg, tag="register", kw_only=True):
    sender = "node"
    node: Optional[NODE] = None
    facts: NodeFacts            # type: ignore[valid-type]


class Welcome(Msg, tag="welcome"):
    sender = "master"
    node: NODE
    heartbeat: Annotated[float, Meta(ge=1e-9, le=1e6)]
    pid_max: Optional[PID] = None       # the master's: the node keeps its own PIDs above it
    usage: Optional[Annotated[float, Meta(ge=0.01, le=1e6)]] = None
    mount: Optional[PATH] = None


class State(Msg, tag="state"):
    sender = "node"
    state: WORD


class Facts(Msg, tag="facts"):
    sender = "node"
    facts: NodeFacts            # type: ignore[valid-type]


class Ctl(Msg, tag="ctl"):
    sender = "master"
    cmd: WORD


class Names(Msg, tag="names"):
    sender = "master"
    master: ADDRESS
    nodes: Annotated[list[tuple[NODE, ADDRESS]], Meta(max_length=MAX_ITEMS)]


class Restore(Msg, tag="restore"):
    sender = "master"
    id: ID
    image: VIEW                         # a view of the frame it came in: no copy of a MB
    uid: ID32
    gid: ID32
    groups: Annotated[tuple[ID32, ...], Meta(max_length=NGROUPS)]
    io: tuple[IO, IO, IO]
    port: PORT
    token: WORD
    pid: Optional[PID] = None
    rank: Optional[RANK] = None
    host: Optional[WORD] = None         # where bpsh listens, if not on the master's host
    ppid: Optional[PID] = None          # the ghost's parent, group and session on the master:
    pgid: Optional[PID] = None          # what getppid, getpgid and getsid answer on the node
    sid: Optional[PID] = None


class Need(Msg, tag="need"):
    sender = "node"
    id: ID
    hashes: Annotated[list[HASH], Meta(max_length=MAX_ITEMS)]


class Files(Msg, tag="files"):
    sender = "master"
    id: ID
    contents: Annotated[dict[HASH, BLOB], Meta(max_length=MAX_ITEMS)]


class Restored(Msg, tag="restored"):
    sender = "node"
    id: ID
    pid: PID


class Failed(Msg, tag="failed"):
    sender = "node"
    id: ID
    errno: ERRNO
    message: TEXT


class Signal(Msg, tag="signal"):
    sender = "master"
    pid: PID
    sig: SIGNAL
    id: Optional[ID] = None
    group: Optional[bool] = None


class Stopped(Msg, tag="stopped"):
    sender = "node"
    pid: PID
    sig: Optional[SIGNAL] = None


class Continued(Msg, tag="continued"):
    sender = "node"
    pid: PID


class Exited(Msg, tag="exited"):
    sender = "node"
    pid: PID
    code: Optional[EXIT_CODE] = None
    signal: Optional[SIGNAL] = None
    id: Optional[ID] = None


MESSAGES: dict[str, type[Msg]] = {
    cls.__struct_config__.tag: cls for cls in Msg.__subclasses__()}   # type: ignore[misc]


def replace(msg: Msg, **changes: Any) -> Msg:
    """A copy of `msg` with `changes` (messages are frozen)."""
    return msgspec.structs.replace(msg, **changes)


def tag(cls: type[Msg]) -> str:
    return cls.__struct_config__.tag           # type: ignore[return-value]


# ---- encoding and decoding --------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
"""A message's msgpack payload (framing.py adds the length prefix)."""


def encode_after(msg: Msg, room: int) -> bytearray:
    """`room` bytes (left for the caller's prefix), then the payload of `msg`: one copy
    of a big field (a piece of an image), where prefix + payload made two."""
    buf = bytearray(room)
    _encoder.encode_into(msg, buf, room)
    return buf


def encode_split(msg: Msg, name: str, size: int | None = None) -> tuple[bytes, memoryview]:
    """`msg`'s payload as (head, the bytes of its last field `name`): the head ends with
    that field's bin32 header, so head + bytes is a payload the decoders take, and a big
    field (a chunk's 8 MiB) is written from where it is, not copied into a frame. `size`:
    the field's length, for bytes the caller writes itself (a process's own pages)."""
    data = memoryview(getattr(msg, name)).cast("B")
    head = _encoder.encode(msgspec.structs.replace(msg, **{name: b""}))
    if msgspec.structs.fields(msg)[-1].name != name or not head.endswith(b"\xc4\x00"):
        raise ValueError(f"{name} is not the last field of {tag(type(msg))}")
    size = len(data) if size is None else size
    return head[:-2] + b"\xc6" + size.to_bytes(4, "big"), data


class Side:
    """The messages one end sends in one phase, and their decoder."""

    def __init__(self, sender: str | None, handshake: bool) -> None:
        self.sender = sender
        self.handshake = handshake
        self.classes = tuple(c for c in MESSAGES.values() if c.handshake in (handshake, None)
                             and (sender is None or c.sender == sender))
        self._type = Union[self.classes]                                   # type: ignore
        self._decode = msgspec.msgpack.Decoder(self._type).decode

    def __repr__(self) -> str:
        return f"Side({self.sender!r}, handshake={self.handshake})"

    def decode(self, body: bytes) -> Msg:
        """The message in `body`, or ProtocolError (see the module docstring)."""
        try:
            return self._decode(body)
        except msgspec.MsgspecError as exc:
            raise self._refusal(body, exc) from None
        except RecursionError:
            pass
        # Nested deeper than this thread's stack leaves room for (in a field no class
        # names: the classes nest 3 deep): whether that happens depends on the caller's
        # depth, so decide by msgpack's fixed nesting limit instead.
        try:
            return msgspec.convert(loads(body), self._type)
        except msgspec.ValidationError as exc:
            raise self._refusal(body, exc) from None

    def _refusal(self, body: bytes, exc: Exception) -> ProtocolError:
        """Why `body` is refused, in the words of the grammar (the slow path)."""
        if not isinstance(exc, msgspec.ValidationError):
            return ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc!s:.80}")
        name = _tag_of(body)
        if name is None:
            return ProtocolError("frame is not a message map with a string 't'")
        cls = MESSAGES.get(name)
        if cls is None:
            return ProtocolError(f"unknown message {name!r:.40}")
        if self.sender is not None and cls.sender != self.sender:
            return ProtocolError(f"{name!r} is the {cls.sender}'s message; a {self.sender} "
                                 "may not send it")
        if cls.handshake not in (self.handshake, None):
            return ProtocolError(f"{name!r} is a handshake message, not a message of a session"
                                 if cls.handshake else f"{name!r} is not a handshake message")
        return ProtocolError(f"{name}{_problem(str(exc))}"[:150])


def loads(body: bytes, ext: bool = True) -> Any:
    """`body` as plain msgpack, building no string, list or map larger than the frame or
    MAX_ITEMS, nesting no deeper than msgpack's fixed limit, and with `ext` false no
    extension types; ProtocolError otherwise. (The typed decoders skip what no class
    names, an extension type too: the fallback in `Side.decode` must agree.)"""
    n = len(body)
    items = min(n, MAX_ITEMS)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, max_str_len=n,
                               max_bin_len=n, max_array_len=items, max_map_len=items,
                               max_ext_len=n if ext else 0)
    except Exception as exc:  # msgpack raises many types for garbage
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc!s:.80}") from None


class _Tagged(Struct):
    t: str


_tagged = msgspec.msgpack.Decoder(_Tagged).decode


def _tag_of(body: bytes) -> str | None:
    """The string "t" of a payload that is a map, else None."""
    try:
        return _tagged(body).t
    except (msgspec.MsgspecError, RecursionError):
        pass
    try:
        msg = loads(body)                   # a key that is not a string, or deep nesting
    except ProtocolError:
        return None
    t = msg.get("t") if type(msg) is dict else None
    return t if type(t) is str else None


_AT = re.compile(r"(.*) - at `(?:key` in `)?\$(.*)`$")
_MISSING = re.compile(r"Object missing required field `(.*)`")


def _problem(text: str) -> str:
    """msgspec's "Expected `int` <= 255 - at `$.code`" as ".code: expected `int` <= 255"."""
    m = _AT.match(text)
    problem, path = (m.group(1), m.group(2)) if m else (text, "")
    if "key` in `" in text:
        path += " key"
    missing = _MISSING.match(problem)
    if missing:
        problem = f"missing field {missing.group(1)!r}"
    return f"{path}: {problem[:1].lower()}{problem[1:]}"


HANDSHAKE = Side(None, True)
FROM_NODE = Side("node", False)
FROM_MASTER = Side("master", False)
DIRECT = Side("peer", False)        # a direct stream's frames (bpfs/node/direct.py)

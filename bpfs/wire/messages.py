"""The messages of the master <-> node protocol, one schema each, checked on receipt.

bpfs/wire/framing.py frames, authenticates and decodes; every frame it decodes goes through
`check` before anyone reads it, so a handler sees only the fields its message's row
below lists, each of the type and within the bounds written there. The table IS the
grammar (`MESSAGES`; names in capitals are the types defined above it):

  handshake (wire.py; sent with the 4 KiB handshake frame limit):
    node   -> master  hello      v: VERSION, nonce: NONCE
    master -> node    challenge  v: VERSION, nonce: NONCE, mac: MAC
    node   -> master  auth       mac: MAC
    master -> node    ok
                      refused    errno: ERRNO, message: TEXT     (then the master closes)
  registration and life (bpfs/master/daemon.py, bpfs/node/service.py):
    node   -> master  register   node: NODE | nil, facts: FACTS
    master -> node    welcome    node: NODE, heartbeat: seconds (> 0, at most 1e6)
    node   -> master  state      state: WORD          ("up" once booted)
                      facts      facts: FACTS         (the heartbeat)
    master -> node    ctl        cmd: WORD            ("reboot" | "halt" | "pwroff")
  migration (bpfs/master/procs.py, bpfs/node/procs.py):
    master -> node    restore    id: ID, image: BLOB, uid: ID32, gid: ID32,
                                 groups: [ID32] (at most NGROUPS), io: [IO, IO, IO],
                                 port: PORT, token: WORD, [pid: PID], [rank: RANK]
    node   -> master  need       id: ID, hashes: [HASH] (at most MAX_ITEMS)
    master -> node    files      id: ID, contents: {HASH: BLOB} (at most MAX_ITEMS)
    node   -> master  restored   id: ID, pid: PID
                      failed     id: ID, errno: ERRNO, message: TEXT
    master -> node    signal     pid: PID, sig: SIGNAL, [id: ID], [group: BOOL]
    node   -> master  stopped    pid: PID, [sig: SIGNAL]     the process stopped (a group stop)
                      continued  pid: PID                    ... and was continued (SIGCONT)
    node   -> master  exited     pid: PID, code: 0..255 | nil, signal: SIGNAL | nil, [id: ID]

    FACTS := {hostname: WORD, cpus: 0..2^20, arch: WORD, kernel: WORD,
              load: [LOAD, LOAD, LOAD], mem_total: BYTES, mem_available: BYTES,
              uptime: SECONDS}

  In a migration, ID is the master's number for it; `image` is bpfs.migrate.dumps'
  bytes, `io` bpfs.wire.execreq's specs; `pid` is the ghost's PID (else the image's) and
  `rank`, with `pid`, a rank of a multi-node run (it goes into BPROC_RANK=XXXXXXX).
  The `id` of `signal` and `exited` names the restore the pid belongs to: a node
  signals only the process it restored for that migration, and the master takes an
  exit only for the migration that pid now belongs to (a late message about a reused
  pid is stale and ignored); absent, the pid alone decides (older peers). `group`
  true: a terminal's signal (Ctrl-C, Ctrl-\\, Ctrl-Z) or SIGCONT, for the job's whole
  process group on the node, as a terminal signals a local job.
  `hello` keeps its shape in every protocol version, so a node of another version
  gets the master's `refused` rather than a protocol error.

Types: integers are never booleans and are bounded (`Int`); numbers (`Num`) are finite
ints or floats, given to handlers as floats; strings (`Str`) and byte strings (`Bytes`)
have a maximum length; lists and maps have a maximum count. `[field]` may be absent or
nil (the handler gets None). A field not in a message's row is dropped: add it to the
table to use it. What the table cannot say (an IO spec's syntax, a state's meaning) the
handler checks, with the field already of the right type.

Refusals (`check` raises ProtocolError, EPROTO, whose message names the message and the
field, never echoing more than a few characters of the peer's data): a payload that is
not a map with a string "t"; an unknown message; a message the other side sends (a node
sending `restore`); a missing field; a field of the wrong type or out of bounds. The
receiver closes that one connection. Which messages may come when (`register` first,
then anything a registered node sends) is the receiver's dispatch table's to enforce.

`MAX_ITEMS` bounds any list or map the decoder builds (wire.py hands it to msgpack), so
no frame makes the receiver build a container larger than the largest the table allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from bpfs.errors import ProtocolError
from bpfs.model import MAX_NODE

MAX_ITEMS = 65536           # the longest list or map in any message (NGROUPS_MAX, hashes)
MAX_BLOB = 1 << 30          # bytes; the frame limit is the real bound (wire.py)

Message = dict[str, Any]


def describe(value: Any) -> str:
    """What the peer sent, in a few characters: its type, and a short value."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return f"bool {value}"
    if isinstance(value, (int, float)):
        return f"{type(value).__name__} {value!r:.24}"
    if isinstance(value, (str, bytes, list, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


class Bad(Exception):
    """A value does not fit its Spec. `path` grows as it leaves nested containers (so
    a value that fits costs no string building); `check` turns it into a ProtocolError."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = ""

    def under(self, part: str) -> "Bad":
        self.path = part + self.path
        return self


class Spec:
    """A field's type and bounds: `check(value)` returns the value as handlers get it,
    or raises Bad."""

    what = "?"

    def check(self, value: Any) -> Any:
        if not self.accepts(value):
            raise Bad(f"expected {self.what}, got {describe(value)}")
        return value

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int

    @property
    def what(self) -> str:          # type: ignore[override]
        return f"an integer in {self.lo}..{self.hi}"

    def accepts(self, value: Any) -> bool:
        return type(value) is int and self.lo <= value <= self.hi


@dataclass(frozen=True)
class Bool(Spec):
    what = "a boolean"

    def accepts(self, value: Any) -> bool:
        return type(value) is bool


@dataclass(frozen=True)
class Num(Spec):
    """An int or a finite float; handlers get a float."""
    lo: float
    hi: float

    @property
    def what(self) -> str:          # type: ignore[override]
        return f"a number in {self.lo:g}..{self.hi:g}"

    def accepts(self, value: Any) -> bool:
        return (type(value) in (int, float) and math.isfinite(value)
                and self.lo <= value <= self.hi)

    def check(self, value: Any) -> float:
        return float(super().check(value))


@dataclass(frozen=True)
class Str(Spec):
    max: int

    @property
    def what(self) -> str:          # type: ignore[override]
        return f"a string of at most {self.max} characters"

    def accepts(self, value: Any) -> bool:
        return type(value) is str and len(value) <= self.max


@dataclass(frozen=True)
class Bytes(Spec):
    lo: int
    hi: int

    @property
    def what(self) -> str:          # type: ignore[override]
        return f"{self.lo if self.lo == self.hi else f'at most {self.hi}'} bytes"

    def accepts(self, value: Any) -> bool:
        return type(value) is bytes and self.lo <= len(value) <= self.hi


@dataclass(frozen=True)
class Opt(Spec):
    """Absent, nil (None either way), or a value of `spec`."""
    spec: Spec

    def check(self, value: Any) -> Any:
        return None if value is None else self.spec.check(value)


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    lo: int
    hi: int

    @property
    def what(self) -> str:          # type: ignore[override]
        return f"a list of {self.lo if self.lo == self.hi else f'at most {self.hi}'} items"

    def check(self, value: Any) -> list[Any]:
        if type(value) is not list or not self.lo <= len(value) <= self.hi:
            raise Bad(f"expected {self.what}, got {describe(value)}")
        i = 0
        try:
            out = []
            for i, v in enumerate(value):
                out.append(self.item.check(v))
            return out
        except Bad as bad:
            raise bad.under(f"[{i}]") from None


@dataclass(frozen=True)
class Map(Spec):
    key: Spec
    value: Spec
    hi: int

    @property
    def what(self) -> str:          # type: ignore[override]
        return f"a map of at most {self.hi} entries"

    def check(self, value: Any) -> dict[Any, Any]:
        if type(value) is not dict or len(value) > self.hi:
            raise Bad(f"expected {self.what}, got {describe(value)}")
        out = {}
        for k, v in value.items():
            try:
                k = self.key.check(k)
            except Bad as bad:
                raise bad.under(" key") from None
            try:
                out[k] = self.value.check(v)
            except Bad as bad:
                raise bad.under(f"[{k!r:.24}]") from None
        return out


@dataclass(frozen=True)
class Record(Spec):
    """A map with named fields (FACTS; a message's own fields are one too). Fields
    not named here are dropped."""
    fields: Mapping[str, Spec]

    what = "a map"

    def check(self, value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise Bad(f"expected {self.what}, got {describe(value)}")
        out = {}
        for name, spec in self.fields.items():
            if name not in value and not isinstance(spec, Opt):
                raise Bad(f"missing field {name!r}")
            try:
                out[name] = spec.check(value.get(name))
            except Bad as bad:
                raise bad.under(f".{name}") from None
        return out


# ---- the types of the grammar ----------------------------------------------------------

VERSION = Int(0, 2**31 - 1)
NONCE = Bytes(32, 32)               # wire.NONCE_BYTES
MAC = Bytes(32, 32)                 # HMAC-SHA256
ERRNO = Int(1, 4095)
TEXT = Str(65536)                   # an error message: a path or two in it
WORD = Str(256)
NODE = Int(0, MAX_NODE)
SECONDS = Num(0, 1e12)
ID = Int(0, 2**63 - 1)
ID32 = Int(0, 2**32 - 2)            # uid_t, gid_t; -1 is "no change" to the kernel
NGROUPS = MAX_ITEMS
IO = Str(8192)                      # bpfs.wire.execreq.parse_io: null, socket, stdout, file:PATH
PORT = Int(0, 65535)
PID = Int(1, 1 << 22)               # PID_MAX_LIMIT
RANK = Int(0, 10**7 - 1)            # BPROC_RANK has 7 digits
HASH = Str(128)                     # "sha256:" and 64 hex digits
BLOB = Bytes(0, MAX_BLOB)
SIGNAL = Int(1, 64)                 # 1 .. NSIG-1
LOAD = Num(0, 1e9)
BYTES = Int(0, 2**64 - 1)
BOOL = Bool()

FACTS = Record({"hostname": WORD, "cpus": Int(0, 1 << 20), "arch": WORD, "kernel": WORD,
                "load": List(LOAD, 3, 3), "mem_total": BYTES, "mem_available": BYTES,
                "uptime": SECONDS})


@dataclass(frozen=True)
class Schema:
    sender: str                     # "node" or "master"
    fields: Record


def _row(sender: str, **fields: Spec) -> Schema:
    return Schema(sender, Record(fields))


MESSAGES: dict[str, Schema] = {
    "hello": _row("node", v=VERSION, nonce=NONCE),
    "challenge": _row("master", v=VERSION, nonce=NONCE, mac=MAC),
    "auth": _row("node", mac=MAC),
    "ok": _row("master"),
    "refused": _row("master", errno=ERRNO, message=TEXT),
    "register": _row("node", node=Opt(NODE), facts=FACTS),
    "welcome": _row("master", node=NODE, heartbeat=Num(1e-9, 1e6)),
    "state": _row("node", state=WORD),
    "facts": _row("node", facts=FACTS),
    "ctl": _row("master", cmd=WORD),
    "restore": _row("master", id=ID, image=BLOB, uid=ID32, gid=ID32,
                    groups=List(ID32, 0, NGROUPS), io=List(IO, 3, 3), port=PORT,
                    token=WORD, pid=Opt(PID), rank=Opt(RANK)),
    "need": _row("node", id=ID, hashes=List(HASH, 0, MAX_ITEMS)),
    "files": _row("master", id=ID, contents=Map(HASH, BLOB, MAX_ITEMS)),
    "restored": _row("node", id=ID, pid=PID),
    "failed": _row("node", id=ID, errno=ERRNO, message=TEXT),
    "signal": _row("master", pid=PID, sig=SIGNAL, id=Opt(ID), group=Opt(BOOL)),
    "stopped": _row("node", pid=PID, sig=Opt(SIGNAL)),
    "continued": _row("node", pid=PID),
    "exited": _row("node", pid=PID, code=Opt(Int(0, 255)), signal=Opt(SIGNAL), id=Opt(ID)),
}


def check(msg: Any, sender: str) -> Message:
    """`msg` as its row in MESSAGES says, from `sender` ("node" or "master"); else
    ProtocolError naming the message and the field (see the module docstring)."""
    if type(msg) is not dict or type(msg.get("t")) is not str:
        raise ProtocolError("frame is not a message map with a string 't'")
    name = msg["t"]
    schema = MESSAGES.get(name)
    if schema is None:
        raise ProtocolError(f"unknown message {name!r:.40}")
    if schema.sender != sender:
        raise ProtocolError(f"{name!r} is the {schema.sender}'s message; a {sender} may "
                            "not send it")
    try:
        out = schema.fields.check(msg)
    except Bad as bad:
        raise ProtocolError(f"{name}{bad.path}: {bad.problem}") from None
    out["t"] = name
    return out

"""The protocol's grammar: its bounded types, the node facts, and `Msg`, the base of every
message (bpfs/wire/messages.py lists them all and decodes them). A type here says what a
field may hold; msgspec checks it as it decodes, before any handler sees the message."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Optional, Union, get_type_hints

import msgpack
import msgspec
from msgspec import Meta, Struct

from bpfs import formats
from bpfs.errors import ProtocolError
from bpfs.model import MAX_NODE

MAX_ITEMS = 65536           # the longest list or map in any message (NGROUPS_MAX, hashes)
MAX_BLOB = 1 << 30          # bytes; the frame limit is the real bound (framing.py)


def _int(lo: int, hi: int) -> Any:
    return Annotated[int, Meta(ge=lo, le=hi)]


def _num(lo: float, hi: float) -> Any:
    return Annotated[float, Meta(ge=lo, le=hi)]


def _str(most: int) -> Any:
    return Annotated[str, Meta(max_length=most)]


def _bytes(lo: int, hi: int) -> Any:
    return Annotated[bytes, Meta(min_length=lo, max_length=hi)]


# ---- the types of the grammar ----------------------------------------------------------

VERSION = _int(0, 2**31 - 1)
NONCE = _bytes(32, 32)              # framing.NONCE_BYTES
MAC = _bytes(32, 32)                # HMAC-SHA256
ERRNO = _int(1, 4095)
TEXT = _str(65536)                  # an error message: a path or two in it
WORD = _str(256)
NODE = _int(0, MAX_NODE)
SECONDS = _num(0, 1e12)
ID = _int(0, 2**63 - 1)
ID32 = _int(0, 2**32 - 2)           # uid_t, gid_t; -1 is "no change" to the kernel
NGROUPS = MAX_ITEMS
IO = _str(8192)                     # bpfs.wire.execreq.parse_io: null, socket, stdout, file:PATH
PORT = _int(0, 65535)
PID = _int(1, 1 << 22)              # PID_MAX_LIMIT
RANK = _int(0, 10**7 - 1)           # BPROC_RANK has 7 digits
HASH = _str(128)                    # "sha256:" and 64 hex digits
BLOB = _bytes(0, MAX_BLOB)
VIEW = Annotated[memoryview, Meta(max_length=MAX_BLOB)]    # decoded as a view of its frame
SIGNAL = _int(1, 64)                # 1 .. NSIG-1
LOAD = _num(0, 1e9)
BYTES = Annotated[int, Meta(ge=0)]    # 0..2^64-1: msgpack has no larger int
EXIT_CODE = _int(0, 255)
ADDRESS = _str(64)                  # an IP address as text (the node checks it parses)
TICKS = _int(0, 2**63 - 1)
COUNT = _int(0, 2**63 - 1)
LETTER = _str(1)
COMM = _str(64)                     # TASK_COMM_LEN is 16 bytes; room for escapes
MAX_USAGE = 65536                   # processes in one `usage`: about 5 MB at most, well
                                    # under the node frame limit (master/links.py)
PATH = _str(4096)                   # PATH_MAX
INODE = Annotated[int, Meta(ge=1)]  # 1..2^64-1: bpfs.fs.inodes packs 64 bits
NAME = _bytes(1, 255)               # NAME_MAX
FS_DATA = 1 << 20                   # bytes in one read or write (FUSE asks for 128 KiB)
FS_ENTRIES = 1024                   # directory entries in one fs_reply
U32 = _int(0, 2**32 - 1)
TIMEOUT = _num(0, 3600)


# ---- facts: bpfs.formats.Facts's fields, bounded -------------------------------------------

FACT_TYPES: dict[str, Any] = {
    "hostname": WORD, "cpus": _int(0, 1 << 20), "arch": WORD, "kernel": WORD,
    "load": tuple[LOAD, LOAD, LOAD], "mem_total": BYTES, "mem_available": BYTES,
    "uptime": SECONDS,
}


def sanitize_word(x: str) -> str:
    """A single printable word of at most 64 chars (it goes into key: value lines)."""
    if x.isprintable() and " " not in x:    # the usual word (the only printable space is " ")
        return x[:64]
    return "".join(ch for ch in x if ch.isprintable() and not ch.isspace())[:64]


def _node_facts() -> type[Struct]:
    """The Struct of FACTS: formats.Facts's fields in its order, each of FACT_TYPES' type
    (a test holds the two to the same names and base types)."""
    hints = get_type_hints(formats.Facts)

    def facts(self: Any) -> formats.Facts:
        """The node's facts as the master keeps them: words sanitized."""
        return formats.Facts(sanitize_word(self.hostname), self.cpus, sanitize_word(self.arch),
                             sanitize_word(self.kernel), self.load, self.mem_total,
                             self.mem_available, self.uptime)

    def of(cls: Any, f: formats.Facts) -> Any:
        return cls(*(getattr(f, name) for name in hints))

    return msgspec.defstruct("NodeFacts", [(name, FACT_TYPES[name]) for name in hints],
                             frozen=True, namespace={"facts": facts, "of": classmethod(of)},
                             module=__name__)


NodeFacts = _node_facts()


# ---- the messages ---------------------------------------------------------------------------

class Msg(Struct, frozen=True, tag_field="t", forbid_unknown_fields=False,
          omit_defaults=True):
    """A message; `sender` is who may send it, `handshake` whether before the session
    (None: in both, as `refused`)."""
    sender: ClassVar[str]
    handshake: ClassVar[bool | None] = False

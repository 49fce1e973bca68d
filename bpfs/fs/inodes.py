"""Inode numbers of the /bproc tree: (kind, id, generation) packed in 64 bits.

    bits  0..7    kind (Kind below)
    bits  8..39   id: a node number or a pid (0 for the fixed files)
    bits 40..63   generation: a process's serial, so a reused pid never reaches
                  a stale handle (0 for everything but process files); the model
                  keeps serials below 2**24 (model.PROC_GENERATIONS), so the
                  number holds it whole and decodes to what the model compares

Nothing is stored per inode: every number decodes to what it names, and the
model says whether that still exists. The root is pyfuse3.ROOT_INODE (1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NewType

from bpfs.model import PROC_GENERATIONS

Inode = NewType("Inode", int)

ID_BITS = 32
GEN_BITS = 24
assert 1 << GEN_BITS == PROC_GENERATIONS     # every generation fits, so none is cut


class Kind(IntEnum):
    ROOT = 1
    STATUS = 2
    EVENTS = 3
    NODES = 4
    PROCS = 5
    NODE_DIR = 6
    PROC_DIR = 7
    NODE_STATUS = 0x10
    NODE_CTL = 0x11
    NODE_INFO = 0x12
    NODE_PROCS = 0x13
    PROC_STATUS = 0x20
    PROC_NODE = 0x21
    PROC_SIGNAL = 0x22
    PROC_CTL = 0x23
    PROC_STDOUT = 0x24
    PROC_STDERR = 0x25
    PROC_STAT = 0x26


DIR_KINDS = frozenset({Kind.ROOT, Kind.NODES, Kind.PROCS, Kind.NODE_DIR, Kind.PROC_DIR})
NODE_KINDS = frozenset({Kind.NODE_DIR, Kind.NODE_STATUS, Kind.NODE_CTL, Kind.NODE_INFO,
                        Kind.NODE_PROCS})
PROC_KINDS = frozenset({Kind.PROC_DIR, Kind.PROC_STATUS, Kind.PROC_NODE, Kind.PROC_SIGNAL,
                        Kind.PROC_CTL, Kind.PROC_STDOUT, Kind.PROC_STDERR, Kind.PROC_STAT})


@dataclass(frozen=True)
class Ino:
    kind: Kind
    id: int = 0
    gen: int = 0

    def encode(self) -> Inode:
        return Inode(int(self.kind) | (self.id << 8) | (self.gen << (8 + ID_BITS)))

    @classmethod
    def decode(cls, ino: int) -> "Ino":
        """ValueError for a number no Ino encodes (the caller answers ENOENT)."""
        kind = Kind(ino & 0xFF)
        return cls(kind, (ino >> 8) & ((1 << ID_BITS) - 1), ino >> (8 + ID_BITS))

    @property
    def is_dir(self) -> bool:
        return self.kind in DIR_KINDS

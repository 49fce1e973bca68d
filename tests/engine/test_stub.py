"""Syscall batches as bytes: the table the loop reads, parts, and where a failure points."""

from __future__ import annotations

import struct

from bpfs.migrate import ptrace as pt, stub
from bpfs.migrate.restore import _rlimit_wanted

BASE = 0x2000_0000_0000


def _old_table(entries: list[tuple[str, tuple[int, ...], bool]]) -> bytes:
    """The table as the first version packed it, one flat list of quadwords."""
    flat: list[int] = []
    for name, args, may_fail in entries:
        flat.append(pt.SYS[name])
        flat.extend(a & (2**64 - 1) for a in args)
        flat.extend([0] * (7 - len(args)))
        flat.append(1 if may_fail else 0)
    return struct.pack(f"<{len(flat)}Q", *flat)


CALLS = [("close_range", (0, 2**32 - 1, 0), False), ("mmap", (BASE, 4096, 3, 0x32, -1, 0), False),
         ("chdir", (BASE + 5,), True), ("getpid", (), False), ("prlimit64", (0, 7, BASE, 0), False)]


def test_table_packs_the_same_bytes_as_before() -> None:
    b = stub.Batch(BASE)
    for name, args, may_fail in CALLS:
        b.call(name, *args, may_fail=may_fail)
    assert b.table() == _old_table(CALLS)
    assert b.count() == len(CALLS) and len(b.table()) == stub.ENTRY * len(CALLS)


def test_parts_carry_their_count_and_failures_name_the_entry() -> None:
    b = stub.Batch(BASE)
    for name, args, may_fail in CALLS[:2]:
        b.call(name, *args, may_fail=may_fail)
    b.pause()
    for name, args, may_fail in CALLS[2:]:
        b.call(name, *args, may_fail=may_fail)
    table = b.table()
    first = 2 * stub.ENTRY
    assert table == _old_table(CALLS[:2]) + struct.pack("<Q", 3) + _old_table(CALLS[2:])
    assert b.count(0) == 2 and b.count(1) == 3
    at = BASE + stub.TABLE_OFFSET
    assert b.entry_at(at + stub.ENTRY) == 1
    assert b.entry_at(at + first + 8) == 2 and b.names[2] == "chdir"
    assert b.entry_at(at + first + 8 + 2 * stub.ENTRY) == 4
    assert b.entry_at(at + first) == -1 and b.entry_at(at + 3) == -1


def test_code_ends_success_in_int3_and_failure_in_ud2() -> None:
    assert stub.CODE[stub.SYSCALL_OFFSET:stub.SYSCALL_OFFSET + 2] == b"\x0f\x05"
    assert b"\x0f\x0b\xcc" in stub.CODE  # ud2 (SIGILL) right before done's int3 (SIGTRAP)


def test_rlimits_are_clamped_to_the_inherited_hard_limit() -> None:
    inf = 2**64 - 1
    assert _rlimit_wanted(8 << 20, inf, inf) == (8 << 20, inf)
    assert _rlimit_wanted(inf, inf, 4096) == (4096, 4096)
    assert _rlimit_wanted(1024, 8192, 4096) == (1024, 4096)

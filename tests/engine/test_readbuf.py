"""ptrace.read_memory_buffer: a small read lands in heap memory (a bytearray), a large
one in a populated mapping; the bytes are the same either way (read from this very
process: process_vm_readv of oneself needs no tracer)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from bpfs.migrate import ptrace as pt

pytestmark = pytest.mark.timeout(20)


def test_small_and_large_reads_give_the_same_bytes(monkeypatch) -> None:
    src = bytearray(os.urandom(300_000))
    base = ctypes.addressof(ctypes.c_char.from_buffer(src))
    ranges = [(base, 4096), (base + 10_000, 123_456), (base + 200_000, 99_999)]
    want = b"".join(bytes(src[a - base:a - base + n]) for a, n in ranges)
    small = pt.read_memory_buffer(os.getpid(), ranges)
    assert type(small) is bytearray and bytes(small) == want
    monkeypatch.setattr(pt, "SMALL_READ", 0)
    large = pt.read_memory_buffer(os.getpid(), ranges)
    assert type(large) is mmap.mmap and large[:len(want)] == want

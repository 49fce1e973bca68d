"""A batch of system calls run inside a tracee by a 62-byte machine-code loop.

Injecting one syscall by single-step costs a ptrace round trip (~25 µs); a restore needs dozens
(mmaps, dup3s, sigactions, credentials). The restore helper instead keeps this loop in its scratch
area and runs a whole table in one PTRACE_CONT:

    loop:   test r12, r12 ; jz done              r12 = entries left, rbx = current entry
            rax, rdi, rsi, rdx, r10, r8, r9 = [rbx], [rbx+8] ... [rbx+48]
            syscall ; [rbx+56] = rax             result kept in the entry
            cmp rax, -4095 ; jae failed          -4095..-1 are errors
    next:   add rbx, 72 ; dec r12 ; jmp loop
    failed: test byte [rbx+64], 1 ; jnz next     flag bit 0: this entry may fail
    done:   int3

On the SIGTRAP, r12 == 0 means every entry ran; otherwise rbx points at the failed entry and rax
holds -errno. Pointer arguments point into a data area written with the table.
"""

from __future__ import annotations

import errno
import os
import struct
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError

CODE = bytes.fromhex(
    "4d85e47438488b03488b7b08488b7310488b53184c8b53204c8b43284c8b4b300f0548894338"
    "483d01f0ffff73094883c34849ffccebc9f643400175f1cc")
SYSCALL_OFFSET = 0x20  # the `syscall` inside CODE doubles as an injection gadget
ENTRY = 72
MAY_FAIL = 1
TABLE_OFFSET = 0x1000
DATA_OFFSET = 0x80000
SIGTRAP = 5


class Batch:
    """Syscalls and the data they point to, laid out for a scratch area at `base`."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.entries: list[tuple[str, int, tuple[int, ...], int]] = []
        self._data = bytearray()

    def data(self, payload: bytes, align: int = 16) -> int:
        """Append `payload` to the data area; returns its address in the tracee."""
        self._data.extend(bytes(-len(self._data) % align))
        addr = self.base + DATA_OFFSET + len(self._data)
        self._data.extend(payload)
        return addr

    def cstr(self, text: str | bytes) -> int:
        raw = text.encode(errors="surrogateescape") if isinstance(text, str) else text
        return self.data(raw + b"\0", 1)

    def call(self, name: str, *args: int, may_fail: bool = False) -> int:
        """Add syscall `name`; returns the entry's index."""
        self.entries.append((name, pt.SYS[name], args, MAY_FAIL if may_fail else 0))
        return len(self.entries) - 1

    def table(self) -> bytes:
        flat: list[int] = []
        mask = 2**64 - 1
        for _name, nr, args, flags in self.entries:
            flat.append(nr)
            flat.extend(a & mask for a in args)
            flat.extend([0] * (7 - len(args)))  # unused args and the result slot
            flat.append(flags)
        return struct.pack(f"<{len(flat)}Q", *flat)

    def writes(self) -> list[tuple[int, bytes]]:
        table = self.table()
        if TABLE_OFFSET + len(table) > DATA_OFFSET:
            raise MigrateError(errno.E2BIG, f"batch of {len(self.entries)} syscalls is too long")
        out = [(self.base + TABLE_OFFSET, table)]
        if self._data:
            out.append((self.base + DATA_OFFSET, bytes(self._data)))
        return out

    def run(self, pid: int, regs: pt.Regs) -> None:
        """Run the batch in stopped `pid` (its registers otherwise `regs`); raise on failure."""
        pt.write_memory(pid, self.writes())
        start(pid, regs, self.base, len(self.entries))
        finish(pid, self, pt.wait_stop(pid))


def start(pid: int, regs: pt.Regs, base: int, count: int) -> None:
    r = regs.copy()
    r.rip, r.rbx, r.r12, r.orig_rax = base, base + TABLE_OFFSET, count, 2**64 - 1
    pt.setregs(pid, r)
    pt.cont(pid)


def finish(pid: int, batch: "Batch", stop: int) -> None:
    """Check the stop that ended a batch; a failed entry raises with its errno and name."""
    if stop != SIGTRAP:
        raise MigrateError(errno.EIO, f"syscall batch stopped by {stop:#x}, not int3", pid)
    regs = pt.getregs(pid)
    if regs.r12 == 0:
        return
    index = (regs.rbx - batch.base - TABLE_OFFSET) // ENTRY
    code = (2**64 - regs.rax) if regs.rax >= 2**63 else errno.EIO
    name = batch.entries[index][0] if 0 <= index < len(batch.entries) else "?"
    raise MigrateError(code, f"{name} (entry {index}) failed in process {pid}: "
                       f"{os.strerror(code)}", pid)


def install(pid: int, base: int) -> None:
    pt.write_memory(pid, [(base, CODE)])

"""A batch of system calls run inside a tracee by a 73-byte machine-code loop.

Injecting one syscall by single-step costs a ptrace round trip (~25 µs); a restore needs dozens
(mmaps, dup3s, sigactions, credentials). The restore helper instead keeps this loop in its scratch
area and runs a whole table in one PTRACE_CONT:

    loop:   test r12, r12 ; jz done              r12 = entries left, rbx = current entry
            rax, rdi, rsi, rdx, r10, r8, r9 = [rbx], [rbx+8] ... [rbx+48]
            syscall ; [rbx+56] = rax             result kept in the entry
            cmp rax, -4095 ; jae failed          -4095..-1 are errors
    next:   add rbx, 72 ; dec r12 ; jmp loop
    failed: test byte [rbx+64], 1 ; jnz next     flag bit 0: this entry may fail
            ud2                                  SIGILL: rbx = the failed entry, rax = -errno
    done:   int3                                 SIGTRAP: every entry ran
            r12 = [rbx] ; add rbx, 8 ; jmp loop  PTRACE_CONT runs the next part of the table

The stop's signal alone says whether the batch succeeded, so success costs no PTRACE_GETREGS.
A table may come in parts (`Batch.pause()`): each part ends in the int3 stop, and the next part's
entry count follows right after it in the table, so the tracer can do its work between parts
(write the pages) and continue without setting registers again. Pointer arguments point into a
data area written with the table.
"""

from __future__ import annotations

import errno
import os
import struct
from bpfs.migrate import ptrace as pt
from bpfs.migrate.errors import MigrateError

CODE = bytes.fromhex(
    "4d85e4743a488b03488b7b08488b7310488b53184c8b53204c8b43284c8b4b300f0548894338"
    "483d01f0ffff73094883c34849ffccebc9f643400175f10f0bcc4c8b234883c308ebb7")
SYSCALL_OFFSET = 0x20  # the `syscall` inside CODE doubles as an injection gadget
ENTRY = 72
MAY_FAIL = 1
TABLE_OFFSET = 0x1000
DATA_OFFSET = 0x80000
SIGTRAP, SIGILL = 5, 4
_MASK = 2**64 - 1
# One entry with n arguments: number, the arguments, zeros for the rest and the result, flags.
_ENTRIES = [struct.Struct(f"<{n + 1}Q{8 * (7 - n)}xQ") for n in range(7)]
_COUNT = struct.Struct("<Q")


class Batch:
    """Syscalls and the data they point to, laid out for a scratch area at `base`.

    Entries are packed as they are added: a restore adds some sixty, and packing them one
    by one in `table()` was as costly as everything else a batch does in Python.
    """

    def __init__(self, base: int) -> None:
        self.base = base
        self.names: list[str] = []
        self._parts: list[bytearray] = [bytearray()]
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

    def call(self, name: str, *args: int, may_fail: bool = False, what: str = "") -> int:
        """Add syscall `name`; returns the entry's index. `what` names it in a failure's
        message instead (e.g. the file an openat opens)."""
        try:
            entry = _ENTRIES[len(args)].pack(pt.SYS[name], *args, may_fail)
        except struct.error:  # a negative argument (fd -1): the tracee sees it as 2**64 - 1
            entry = _ENTRIES[len(args)].pack(pt.SYS[name], *(a & _MASK for a in args), may_fail)
        self._parts[-1] += entry
        self.names.append(what or name)
        return len(self.names) - 1

    def pause(self) -> None:
        """End a part: the tracee stops here (SIGTRAP) until the tracer continues it."""
        self._parts.append(bytearray())

    def count(self, part: int = 0) -> int:
        return len(self._parts[part]) // ENTRY

    def table(self) -> bytes:
        """The entries as the loop reads them: each part after the first behind its count."""
        out = bytearray(self._parts[0])
        for part in self._parts[1:]:
            out += _COUNT.pack(len(part) // ENTRY)
            out += part
        return bytes(out)

    def writes(self) -> list[tuple[int, bytes]]:
        table = self.table()
        if TABLE_OFFSET + len(table) > DATA_OFFSET:
            raise MigrateError(errno.E2BIG, f"batch of {len(self.names)} syscalls is too long")
        out = [(self.base + TABLE_OFFSET, table)]
        if self._data:
            out.append((self.base + DATA_OFFSET, bytes(self._data)))
        return out

    def entry_at(self, addr: int) -> int:
        """The index of the entry at tracee address `addr` (-1 if none)."""
        off, index = addr - self.base - TABLE_OFFSET, 0
        for part in self._parts:
            n = len(part) // ENTRY
            if 0 <= off < len(part) and off % ENTRY == 0:
                return index + off // ENTRY
            off -= len(part) + _COUNT.size
            index += n
        return -1

    def run(self, pid: int, regs: pt.Regs) -> None:
        """Run the batch's first part in stopped `pid` (its registers otherwise `regs`);
        raise on failure."""
        pt.write_memory(pid, self.writes())
        start(pid, regs, self.base, self.count())
        finish(pid, self, pt.wait_stop(pid))

    def resume(self, pid: int) -> None:
        """Run the next part in `pid`, stopped at the end of the last one; raise on failure."""
        pt.cont(pid)
        finish(pid, self, pt.wait_stop(pid))


def start(pid: int, regs: pt.Regs, base: int, count: int) -> None:
    r = regs.copy()
    r.rip, r.rbx, r.r12, r.orig_rax = base, base + TABLE_OFFSET, count, 2**64 - 1
    pt.setregs(pid, r)
    pt.cont(pid)


def finish(pid: int, batch: "Batch", stop: int) -> None:
    """Check the stop that ended a part; a failed entry raises with its errno and name."""
    if stop == SIGTRAP:
        return
    if stop != SIGILL:
        raise MigrateError(errno.EIO, f"syscall batch stopped by {stop:#x}, not int3", pid)
    regs = pt.getregs(pid)
    index = batch.entry_at(regs.rbx)
    code = (2**64 - regs.rax) if 2**64 - 4096 < regs.rax else errno.EIO
    name = batch.names[index] if index >= 0 else "?"
    raise MigrateError(code, f"{name} (entry {index}) failed in process {pid}: "
                       f"{os.strerror(code)}", pid)


def install(pid: int, base: int) -> None:
    pt.write_memory(pid, [(base, CODE)])

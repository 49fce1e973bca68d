"""Parsers for the /proc/PID files a dump reads: maps, stat, limits, auxv, pagemap (status:
bpfs.procstatus, the one parser, through `read_status`).

Each parser takes the file's text (or bytes) so it can be tested without a process; the
`read_*` helpers add the I/O and turn OSError into MigrateError naming the pid.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from dataclasses import dataclass

from bpfs import procstatus
from bpfs.migrate.errors import MigrateError, from_oserror

PAGE = os.sysconf("SC_PAGE_SIZE")
SPECIAL = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")
AT_NULL, AT_PHDR, AT_BASE, AT_ENTRY, AT_SYSINFO_EHDR = 0, 3, 7, 9, 33


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "r-xp"
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def prot(self) -> int:
        return (1 if self.perms[0] == "r" else 0) | (2 if self.perms[1] == "w" else 0) | \
            (4 if self.perms[2] == "x" else 0)

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and not self.path.startswith("[")


_MAPS_RE = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)")


def parse_maps(text: str) -> list[Mapping]:
    out = []
    for line in text.splitlines():
        m = _MAPS_RE.match(line)
        if not m:
            raise MigrateError(errno.EIO, f"unparsable maps line: {line!r}")
        out.append(Mapping(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5],
                           int(m[6]), m[7]))
    return out


# /proc/PID/stat fields after the ")" that ends comm (which may itself hold spaces or ")").
_STAT_FIELDS = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45,
                "end_data": 46, "start_brk": 47, "arg_start": 48, "arg_end": 49,
                "env_start": 50, "env_end": 51}


def parse_stat(text: str) -> dict[str, int]:
    """Memory-layout fields of /proc/PID/stat (numbered as in proc(5))."""
    rest = text.rsplit(")", 1)[1].split()
    return {name: int(rest[num - 3]) for name, num in _STAT_FIELDS.items()}


# /proc/PID/limits names each limit (fs/proc/base.c `lnames`), in RLIMIT_* order.
_LIMIT_NAMES = {name: res for res, name in enumerate((
    "Max cpu time", "Max file size", "Max data size", "Max stack size", "Max core file size",
    "Max resident set", "Max processes", "Max open files", "Max locked memory",
    "Max address space", "Max file locks", "Max pending signals", "Max msgqueue size",
    "Max nice priority", "Max realtime priority", "Max realtime timeout"))}
RLIM_INFINITY = 2**64 - 1


def parse_limits(text: str) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) from /proc/PID/limits, "unlimited" as RLIM_INFINITY.

    That file, not prlimit(), because anyone may read it: prlimit() on another user's
    process needs CAP_SYS_RESOURCE even to read, which a master may lack. Columns are
    separated by two spaces or more (names have single spaces; units may be empty);
    lines with an unknown name are skipped.
    """
    out = []
    for line in text.splitlines()[1:]:
        cols = re.split(r"\s{2,}", line.strip())
        res = _LIMIT_NAMES.get(cols[0])
        if res is None or len(cols) < 3:
            continue
        soft, hard = (RLIM_INFINITY if v == "unlimited" else int(v) for v in cols[1:3])
        out.append((res, soft, hard))
    return out


def parse_auxv(data: bytes) -> dict[int, int]:
    out = {}
    for i in range(0, len(data) - 15, 16):
        key, val = struct.unpack_from("<QQ", data, i)
        if key == AT_NULL:
            break
        out[key] = val
    return out


def auxv_bytes(data: bytes) -> bytes:
    """The auxv up to and including its AT_NULL entry (what PR_SET_MM_MAP wants)."""
    for i in range(0, len(data) - 15, 16):
        if struct.unpack_from("<Q", data, i)[0] == AT_NULL:
            return data[:i + 16]
    return data


def read_text(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except OSError as exc:
        raise from_oserror(exc, f"reading /proc/{pid}/{name}", pid) from exc


def read_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status (bpfs.procstatus), OSError as MigrateError."""
    try:
        return procstatus.read(pid)
    except OSError as exc:
        raise from_oserror(exc, f"reading /proc/{pid}/status", pid) from exc


def read_bytes(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError as exc:
        raise from_oserror(exc, f"reading /proc/{pid}/{name}", pid) from exc


# pagemap: one little-endian u64 per page; we only need its top byte (bits 56..63):
# bit 63 present, 62 swapped, 61 file page or shared anon.
# An anonymous mapping must send every present or swapped page; a private file mapping only the
# pages that were copied on write (present and not a file page, or swapped).
_ANON = bytes(1 if b & 0xC0 else 0 for b in range(256))
_COW = bytes(1 if (b & 0x80 and not b & 0x20) or b & 0x40 else 0 for b in range(256))
_RUN = re.compile(rb"\x01+")


def page_runs(pagemap: bytes, start: int, anon: bool) -> list[tuple[int, int]]:
    """(addr, size) runs of pages that must travel, from a region's pagemap entries."""
    flags = pagemap[7::8].translate(_ANON if anon else _COW)
    return [(start + m.start() * PAGE, (m.end() - m.start()) * PAGE)
            for m in _RUN.finditer(flags)]


def open_pagemap(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    except OSError as exc:
        raise from_oserror(exc, f"opening /proc/{pid}/pagemap", pid) from exc


def read_pagemap(fd: int, start: int, end: int) -> bytes:
    size = (end - start) // PAGE * 8
    return os.pread(fd, size, start // PAGE * 8)

"""The migration image: one stopped process (at its entry point, or anywhere while it ran), as
msgpack, its page bytes raw after it (`imageframe`). Owned by this module.

Grammar (msgpack; every map below has exactly these string keys; ints are unsigned unless said)::

    image    = { "magic": "bpfs-image", "version": 4,
                 "pid": int, "argv": [str], "comm": str, "exe": int (index into files),
                 "cwd": str, "uid": int, "gid": int, "groups": [int],
                 "dumpable": bool   true: its user may read and trace it (the kernel's
                                    PR_GET_DUMPABLE was 1); false: restored non-dumpable
                 "umask": int, "personality": int, "nice": int (-20..19),
                 "regs": bin(216)   (struct user_regs_struct),
                 "xstate": bin      (NT_X86_XSTATE as GETREGSET returned it),
                 "auxv": bin        (16-byte pairs ending with AT_NULL),
                 "mm": mm, "sigmask": int,
                 "sigactions": [[sig, handler, flags, restorer, mask]],   only non-default ones
                 "pending": [sig]   signals pending at the dump, sent again once restored
                 "rseq": nil | [addr, size, signature],
                 "robust": nil | [head, len], "tid_address": nil | int,
                 "rlimits": [[resource, soft, hard]]    (RLIM_INFINITY is 2**64 - 1)
                 "special": { name: [start, end] }   name in vvar, vvar_vclock, vdso, vsyscall
                 "host": host, "files": [file], "regions": [region],
                 "contents": { hash: bin },         file contents carried inline (may be empty)
                 "open_files": [ofile] }            fds reopened by path on the node
    mm       = { start_code, end_code, start_data, end_data, start_brk, brk, start_stack,
                 arg_start, arg_end, env_start, env_end: int }
    host     = { "kernel": str, "vdso": str (hash of the vdso bytes), "cpu_flags": [str],
                 "xcr0": int, "xstate_size": int }
    file     = { "hash": "sha256:" hex64, "size": int, "path": str }
    region   = { "start": int, "end": int, "prot": int (PROT_* bits), "kind": "anon" | "file",
                 "growsdown": bool, "file": int (index into files, -1 for anon),
                 "offset": int, "pages": [[addr, size]] }  byte runs to write over the mapping,
                                   their bytes in the frame's page section (v2, v3: [addr, bin])
    ofile    = { "fd": int (0 .. 2**20 - 1), "path": str (absolute, no NUL, < 4096 bytes),
                 "flags": int (O_* of OPEN_FLAGS only: never O_CREAT, O_TRUNC, O_EXCL),
                 "offset": int (0 .. 2**63 - 1) }   at most MAX_OPEN_FILES, fds ascending

Addresses are page-aligned and below 2**47; regions are sorted and disjoint and do not meet the
special mappings; byte runs are ordered, disjoint and inside their region (they need not be
whole pages: only bytes that differ from zero, or from the mapped file, travel). `loads`
checks all of that and raises `MigrateError(EINVAL, "corrupt image: ...")`, so a restore never
starts from a bad image.
Version 2 added "dumpable" (version 1 had no such key, and its reader restores every process
dumpable: an execute-only program's memory would be readable on the node); version 3 "nice";
version 4 "open_files" (a running process's regular files, directories and safe devices),
and the frame.
A reader takes version 4, version 3 as no open files (a version 3 restore closed every fd
beyond 0-2), and version 2 also as nice 0 (what a version 2 reader gave every process); it
refuses any other version rather than guess.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import msgpack

from bpfs.migrate import imageframe
from bpfs.migrate.errors import MigrateError, corrupt
from bpfs.migrate.typecheck import bounded as _bounded, check as _check, exact_map as _map, \
    typed as _typed
from bpfs.migrate.ptrace import REGS_SIZE, Regs

MAGIC = "bpfs-image"
VERSION = 4
READS = (2, 3, 4)
PAGE = 4096
TASK_SIZE = 1 << 47
U64 = 2**64 - 1
MAX_IMAGE = 1 << 34
SPECIAL_NAMES = ("vvar", "vvar_vclock", "vdso", "vsyscall")
MM_KEYS = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
           "start_stack", "arg_start", "arg_end", "env_start", "env_end")
HASH_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_FILE_KEYS = frozenset(("hash", "size", "path"))
_REGION_KEYS = frozenset(("start", "end", "prot", "kind", "growsdown", "file", "offset", "pages"))
_STR, _INT, _BIN = frozenset((str,)), {int}, (bytes, memoryview)   # runs: views of v4 pages
MAX_OPEN_FILES = 1 << 16
MAX_FD = 1 << 20          # fs.nr_open's default: no fd number is larger
MAX_PATH = 4096
# open(2) flags an open file may carry (x86_64 values): O_ACCMODE, O_APPEND, O_NONBLOCK,
# O_DSYNC, O_DIRECT, O_LARGEFILE, O_DIRECTORY, O_NOFOLLOW, O_NOATIME, O_CLOEXEC, O_SYNC, O_PATH
OPEN_FLAGS = 0o3 | 0o2000 | 0o4000 | 0o10000 | 0o40000 | 0o100000 | 0o200000 | 0o400000 \
    | 0o1000000 | 0o2000000 | 0o4000000 | 0o10000000


@dataclass
class FileRef:
    """A file some region maps: who it is (content hash, size) and where the master had it."""

    hash: str
    size: int
    path: str


@dataclass
class OpenFile:
    """An fd of a running process that the node opens again: same number, path, flags, offset.
    `flags` holds O_CLOEXEC when the fd was close-on-exec."""

    fd: int
    path: str
    flags: int
    offset: int


@dataclass
class Region:
    """One private mapping to recreate, with the page runs whose content must be written."""

    start: int
    end: int
    prot: int
    kind: str  # "anon" or "file"
    growsdown: bool = False
    file: int = -1
    offset: int = 0
    pages: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class Host:
    """Facts of the master a node must match to run the image (kernel build, CPU features)."""

    kernel: str
    vdso: str
    cpu_flags: list[str]
    xcr0: int
    xstate_size: int


@dataclass
class Image:
    pid: int
    argv: list[str]
    comm: str
    exe: int
    cwd: str
    uid: int
    gid: int
    groups: list[int]
    dumpable: bool  # False: the user could not read its executable or interpreter (would_dump)
    umask: int
    personality: int
    regs: bytes
    xstate: bytes
    auxv: bytes
    mm: dict[str, int]
    sigmask: int
    sigactions: list[tuple[int, int, int, int, int]]
    pending: list[int]
    rseq: tuple[int, int, int] | None
    robust: tuple[int, int] | None
    tid_address: int | None
    rlimits: list[tuple[int, int, int]]
    special: dict[str, tuple[int, int]]
    host: Host
    files: list[FileRef]
    regions: list[Region]
    contents: dict[str, bytes] = field(default_factory=dict)
    nice: int = 0  # getpriority(PRIO_PROCESS) at the dump, set again by the restore
    open_files: list[OpenFile] = field(default_factory=list)  # fds the node opens again

    @property
    def exe_path(self) -> str:
        return self.files[self.exe].path

    def file_refs(self) -> list[FileRef]:
        """The files this image maps by reference (the node must have each, or get it)."""
        return list(self.files)

    def registers(self) -> Regs:
        return Regs.unpack(self.regs)

    def page_bytes(self) -> int:
        return sum(len(d) for r in self.regions for _, d in r.pages)


# ---- encoding ----

def _to_obj(img: Image) -> dict[str, Any]:
    return {
        "magic": MAGIC, "version": VERSION, "pid": img.pid, "argv": img.argv, "comm": img.comm,
        "exe": img.exe, "cwd": img.cwd, "uid": img.uid, "gid": img.gid, "groups": img.groups,
        "dumpable": img.dumpable, "umask": img.umask, "personality": img.personality,
        "nice": img.nice, "regs": img.regs, "xstate": img.xstate, "auxv": img.auxv, "mm": img.mm,
        "sigmask": img.sigmask,
        "sigactions": [list(a) for a in img.sigactions], "pending": img.pending,
        "rseq": list(img.rseq) if img.rseq else None,
        "robust": list(img.robust) if img.robust else None, "tid_address": img.tid_address,
        "rlimits": [list(r) for r in img.rlimits],
        "special": {k: list(v) for k, v in img.special.items()},
        "host": {"kernel": img.host.kernel, "vdso": img.host.vdso,
                 "cpu_flags": img.host.cpu_flags, "xcr0": img.host.xcr0,
                 "xstate_size": img.host.xstate_size},
        "files": [{"hash": f.hash, "size": f.size, "path": f.path} for f in img.files],
        "regions": [{"start": r.start, "end": r.end, "prot": r.prot, "kind": r.kind,
                     "growsdown": r.growsdown, "file": r.file, "offset": r.offset,
                     "pages": [[a, len(d)] for a, d in r.pages]} for r in img.regions],
        "contents": img.contents,
        "open_files": [{"fd": f.fd, "path": f.path, "flags": f.flags, "offset": f.offset}
                       for f in img.open_files],
    }


def dumps(img: Image) -> bytes:
    from bpfs.migrate.lazyrun import materialize
    return b"".join(materialize(p) for p in dumps_parts(img))  # type: ignore[misc]


def dumps_parts(img: Image) -> list[imageframe.Buffer]:
    """`dumps(img)` as buffers to send one after the other: the runs are not copied."""
    header = msgpack.packb(_to_obj(img), use_bin_type=True)
    return imageframe.parts(header, [d for r in img.regions for _, d in r.pages])


def dump(img: Image, fp: BinaryIO) -> None:
    fp.write(dumps(img))


def loads(data: bytes) -> Image:
    """Decode and check an image; any defect raises MigrateError(EINVAL, "corrupt image: ...").
    A version 4 image's runs are views of `data` (no copy): leave it unchanged meanwhile."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise corrupt("not bytes")
    if len(data) > MAX_IMAGE:
        raise corrupt("too large")
    framed = imageframe.split(data)
    try:
        obj = msgpack.unpackb(framed[0] if framed else data, raw=False, strict_map_key=False,
                              max_bin_len=MAX_IMAGE, max_str_len=1 << 24)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise corrupt(f"not msgpack ({type(exc).__name__})") from exc
    v4 = type(obj) is dict and obj.get("version") == VERSION
    _check(v4 == bool(framed), "version 4 is framed, and only version 4")
    if framed:
        imageframe.attach(obj, framed[1])
    return _from_obj(obj)


def load(fp: BinaryIO) -> Image:
    return loads(fp.read())


# ---- checking ----

def _addr(v: Any, what: str, aligned: bool = True) -> int:
    if type(v) is int and 0 <= v <= TASK_SIZE and (not aligned or v % PAGE == 0):
        return v
    _bounded(v, 0, TASK_SIZE, what)
    raise corrupt(f"{what} is not page-aligned")


_TOP = ("magic", "version", "pid", "argv", "comm", "exe", "cwd", "uid", "gid", "groups", "dumpable",
        "umask", "personality", "regs", "xstate", "auxv", "mm", "sigmask", "sigactions", "pending",
        "rseq", "robust", "tid_address", "rlimits", "special", "host", "files", "regions",
        "contents", "nice", "open_files")
_KEYS = {2: _TOP[:-2], 3: _TOP[:-1], 4: _TOP}  # what each version READS holds


def _from_obj(obj: Any) -> Image:
    _check(isinstance(obj, dict), "top level is not a map")
    _check(obj.get("magic") == MAGIC, "bad magic")
    version = obj.get("version")
    if version not in READS or type(version) is not int:
        raise corrupt(f"unsupported image version {version!r} (want {VERSION})")
    _map(obj, _KEYS[version], "image")
    files = _files(obj["files"])
    special = _special(obj["special"])
    regions = _regions(obj["regions"], len(files))
    _check_layout(regions, special)
    img = Image(
        pid=_bounded(obj["pid"], 1, 1 << 22, "pid"),
        argv=_strings(_typed(obj["argv"], list, "argv"), "argv item"),
        comm=_typed(obj["comm"], str, "comm"),
        exe=_bounded(obj["exe"], 0, max(len(files) - 1, 0), "exe"),
        cwd=_typed(obj["cwd"], str, "cwd"), uid=_bounded(obj["uid"], 0, 2**32 - 2, "uid"),
        gid=_bounded(obj["gid"], 0, 2**32 - 2, "gid"),
        groups=_ints(_typed(obj["groups"], list, "groups"), "group", 0, 2**32 - 2),
        dumpable=_typed(obj["dumpable"], bool, "dumpable"),
        umask=_bounded(obj["umask"], 0, 0o777, "umask"),
        personality=_bounded(obj["personality"], 0, 2**32 - 1, "personality"),
        regs=_typed(obj["regs"], bytes, "regs"), xstate=_typed(obj["xstate"], bytes, "xstate"),
        auxv=_typed(obj["auxv"], bytes, "auxv"), mm=_mm(obj["mm"]),
        sigmask=_bounded(obj["sigmask"], 0, U64, "sigmask"),
        sigactions=_sigactions(obj["sigactions"]),
        pending=_ints(_typed(obj["pending"], list, "pending"), "pending signal", 1, 64),
        rseq=_optional_tuple(obj["rseq"], 3, "rseq"),
        robust=_optional_tuple(obj["robust"], 2, "robust"),
        tid_address=None if obj["tid_address"] is None else _addr(obj["tid_address"],
                                                                  "tid_address", False),
        rlimits=_rlimits(obj["rlimits"]), special=special, host=_host(obj["host"]), files=files,
        regions=regions, contents=_contents(obj["contents"], files),
        nice=_bounded(obj["nice"], -20, 19, "nice") if "nice" in obj else 0,
        open_files=_open_files(obj["open_files"]) if "open_files" in obj else [])
    _check(len(files) > 0, "no executable file")
    _check(len(img.regs) == REGS_SIZE, f"regs is {len(img.regs)} bytes, want {REGS_SIZE}")
    _check(576 <= len(img.xstate) <= 16384 and len(img.xstate) == img.host.xstate_size,
           "xstate size")
    _check(0 < len(img.auxv) <= 1024 and len(img.auxv) % 16 == 0, "auxv size")
    _check(len(img.comm.encode()) < 16, "comm longer than 15 bytes")
    return img


# The lists an image is made of (files, regions and their byte runs, rlimits) are checked in
# one pass that only says yes or no; when it says no, the naming checks below run over the
# same list and raise with the defect's place. The fast pass must never accept what the naming
# checks refuse (tests/engine/test_image.py compares the two on mutated images).

def _files(obj: Any) -> list[FileRef]:
    out = _files_fast(obj)
    if out is None:
        out = [_file(f, i) for i, f in enumerate(_typed(obj, list, "files"))]
    return out


def _files_fast(obj: Any) -> list[FileRef] | None:
    if type(obj) is not list:
        return None
    out = []
    for f in obj:
        if type(f) is not dict or f.keys() != _FILE_KEYS:
            return None
        digest, size, path = f["hash"], f["size"], f["path"]
        if type(digest) is not str or not HASH_RE.match(digest) or type(size) is not int \
                or not 0 <= size <= 1 << 40 or type(path) is not str:
            return None
        out.append(FileRef(digest, size, path))
    return out


def _regions(obj: Any, nfiles: int) -> list[Region]:
    out = _regions_fast(obj, nfiles)
    if out is None:
        out = [_region(r, i, nfiles) for i, r in enumerate(_typed(obj, list, "regions"))]
    return out


def _regions_fast(obj: Any, nfiles: int) -> list[Region] | None:
    if type(obj) is not list:
        return None
    out = []
    for r in obj:
        if type(r) is not dict or r.keys() != _REGION_KEYS:
            return None
        start, end, prot, kind = r["start"], r["end"], r["prot"], r["kind"]
        growsdown, fidx, offset = r["growsdown"], r["file"], r["offset"]
        if not (type(start) is int and type(end) is int and 0 <= start < end <= TASK_SIZE
                and not (start | end) & (PAGE - 1) and type(prot) is int and 0 <= prot <= 7
                and type(growsdown) is bool and type(fidx) is int and type(offset) is int):
            return None
        if kind == "file":
            if not (0 <= fidx < nfiles and 0 <= offset <= TASK_SIZE and not offset & (PAGE - 1)):
                return None
        elif kind != "anon" or fidx != -1 or offset != 0:
            return None
        pages = _runs_fast(r["pages"], start, end)
        if pages is None:
            return None
        out.append(Region(start, end, prot, kind, growsdown, fidx, offset, pages))
    return out


def _runs_fast(runs: Any, start: int, end: int) -> list[tuple[int, bytes]] | None:
    """The byte runs of a region if they are ordered, disjoint, non-empty and inside it."""
    if type(runs) is not list:
        return None
    pages = []
    last = start
    for run in runs:
        if type(run) is not list or len(run) != 2:
            return None
        addr, data = run
        if type(addr) is not int or type(data) not in _BIN or not data or addr < last:
            return None
        last = addr + len(data)
        pages.append((addr, data))
    return pages if last <= end else None


def _strings(items: list, what: str) -> list[str]:
    if set(map(type, items)) <= _STR:
        return items
    raise corrupt(f"a {what} is not a string")


def _ints(items: list, what: str, lo: int, hi: int) -> list[int]:
    if not items or (set(map(type, items)) == _INT and lo <= min(items) and max(items) <= hi):
        return items
    for v in items:
        _bounded(v, lo, hi, what)
    return items


def _file(obj: Any, i: int) -> FileRef:
    _map(obj, ("hash", "size", "path"), f"files[{i}]")
    _check(isinstance(obj["hash"], str) and bool(HASH_RE.match(obj["hash"])),
           f"files[{i}].hash is not sha256:<hex>")
    return FileRef(obj["hash"], _bounded(obj["size"], 0, 1 << 40, f"files[{i}].size"),
                   _typed(obj["path"], str, f"files[{i}].path"))


def _special(obj: Any) -> dict[str, tuple[int, int]]:
    _check(isinstance(obj, dict), "special is not a map")
    out = {}
    for name, rng in obj.items():
        _check(name in SPECIAL_NAMES, f"unknown special mapping {name!r}")
        if type(rng) is list and len(rng) == 2 and type(rng[0]) is int and type(rng[1]) is int \
                and 0 <= rng[0] < rng[1] <= TASK_SIZE and not (rng[0] | rng[1]) & (PAGE - 1):
            out[name] = (rng[0], rng[1])
            continue
        start, end = _tuple(rng, 2, f"special {name}", aligned=name != "vsyscall")
        _check(start < end, f"special {name} is empty")
        out[name] = (start, end)
    _check("vdso" in out and "vvar" in out, "vdso or vvar missing")
    return out


def _region(obj: Any, i: int, nfiles: int) -> Region:
    what = f"regions[{i}]"
    _map(obj, ("start", "end", "prot", "kind", "growsdown", "file", "offset", "pages"), what)
    start, end = _addr(obj["start"], f"{what}.start"), _addr(obj["end"], f"{what}.end")
    _check(start < end, f"{what} is empty or reversed")
    kind = obj["kind"]
    _check(kind in ("anon", "file"), f"{what}.kind {kind!r} is not anon or file")
    fidx = _bounded(obj["file"], -1, nfiles - 1, f"{what}.file")
    _check((kind == "file") == (fidx >= 0), f"{what}.file does not match its kind")
    _check(isinstance(obj["growsdown"], bool), f"{what}.growsdown is not a bool")
    pages = []
    last = start
    runs = _typed(obj["pages"], list, f"{what}.pages")
    for j, run in enumerate(runs):
        # the common case in one expression; the checks below only name what is wrong
        if type(run) is list and len(run) == 2 and type(run[0]) is int \
                and type(run[1]) in _BIN and run[1] and last <= run[0] \
                and run[0] + len(run[1]) <= end:
            addr, data = run
        else:
            addr, data = _tuple(run, 2, f"{what}.pages[{j}]", raw=True)
            _addr(addr, f"{what}.pages[{j}].addr", aligned=False)
            _check(type(data) in _BIN, f"{what}.pages[{j}].data is not binary")
            _check(len(data) > 0, f"{what}.pages[{j}] is empty")
            _check(last <= addr and addr + len(data) <= end, f"{what}.pages[{j}] outside region")
        last = addr + len(data)
        pages.append((addr, data))
    return Region(start, end, _bounded(obj["prot"], 0, 7, f"{what}.prot"), kind,
                  obj["growsdown"], fidx,
                  _addr(obj["offset"], f"{what}.offset", True) if kind == "file"
                  else _bounded(obj["offset"], 0, 0, f"{what}.offset"), pages)


_OPEN_FILE_KEYS = ("fd", "path", "flags", "offset")


def _open_files(obj: Any) -> list[OpenFile]:
    """Bounded in count, fd numbers ascending, each path absolute and each flag one the node
    may pass to open(2); the node opens them as the process's user (restore)."""
    items = _typed(obj, list, "open_files")
    _check(len(items) <= MAX_OPEN_FILES, f"more than {MAX_OPEN_FILES} open files")
    out: list[OpenFile] = []
    for i, f in enumerate(items):
        what = f"open_files[{i}]"
        fd = _bounded(_map(f, _OPEN_FILE_KEYS, what)["fd"], 0, MAX_FD - 1, f"{what}.fd")
        _check(not out or out[-1].fd < fd, f"{what}.fd is not above the one before")
        path = _typed(f["path"], str, f"{what}.path")
        _check(path.startswith("/") and "\0" not in path and len(path.encode(
            errors="surrogateescape")) < MAX_PATH, f"{what}.path is not an absolute path")
        flags = _bounded(f["flags"], 0, 2**32 - 1, f"{what}.flags")
        _check(not flags & ~OPEN_FLAGS, f"{what}.flags has bits {flags & ~OPEN_FLAGS:#o}")
        out.append(OpenFile(fd, path, flags, _bounded(f["offset"], 0, 2**63 - 1, what)))
    return out


def _check_layout(regions: list[Region], special: dict[str, tuple[int, int]]) -> None:
    """Regions sorted and disjoint, none meeting a special mapping; the slow pass names which."""
    spans = sorted(v for k, v in special.items() if k != "vsyscall")
    last = 0
    for r in regions:
        if r.start < last:
            break
        last = r.end
    else:
        if _clear_of(regions, spans):
            return
    _check_layout_slow(regions, special)


def _clear_of(regions: list[Region], spans: list[tuple[int, int]]) -> bool:
    """Whether sorted, disjoint `regions` and the sorted `spans` overlap neither each other nor
    themselves."""
    starts = [r.start for r in regions]
    for (s1, e1), (s2, _e2) in zip(spans, spans[1:]):
        if e1 > s2:
            return False
    for s, e in spans:
        i = bisect.bisect_right(starts, s)
        if (i and regions[i - 1].end > s) or (i < len(regions) and starts[i] < e):
            return False
    return True


def _check_layout_slow(regions: list[Region], special: dict[str, tuple[int, int]]) -> None:
    spans = sorted([(r.start, r.end, f"region at {r.start:#x}") for r in regions] +
                   [(s, e, name) for name, (s, e) in special.items() if name != "vsyscall"])
    for (s1, e1, n1), (s2, _e2, n2) in zip(spans, spans[1:]):
        _check(e1 <= s2, f"{n1} overlaps {n2}")
    starts = [r.start for r in regions]
    _check(starts == sorted(starts), "regions are not sorted")


def _mm(obj: Any) -> dict[str, int]:
    _map(obj, MM_KEYS, "mm")
    values = obj.values()
    if set(map(type, values)) == _INT and min(values) >= 0 and max(values) <= TASK_SIZE:
        return {k: obj[k] for k in MM_KEYS}
    return {k: _addr(obj[k], f"mm.{k}", False) for k in MM_KEYS}


def _sigactions(obj: Any) -> list[tuple[int, int, int, int, int]]:
    out = []
    for i, act in enumerate(_typed(obj, list, "sigactions")):
        sig, handler, flags, restorer, mask = _tuple(act, 5, f"sigactions[{i}]", aligned=False)
        _check(1 <= sig <= 64 and sig not in (9, 19), f"sigactions[{i}] signal {sig}")
        out.append((sig, handler, flags, restorer, mask))
    return out


def _rlimits(obj: Any) -> list[tuple[int, int, int]]:
    out = []
    for lim in _typed(obj, list, "rlimits"):
        if type(lim) is not list or len(lim) != 3:
            break
        res, soft, hard = lim
        if type(res) is not int or type(soft) is not int or type(hard) is not int \
                or not (0 <= res < 16 and 0 <= soft <= hard <= U64):
            break
        out.append((res, soft, hard))
    else:
        return out
    return [_rlimit(lim, i) for i, lim in enumerate(obj)]


def _rlimit(obj: Any, i: int) -> tuple[int, int, int]:
    res, soft, hard = _tuple(obj, 3, f"rlimits[{i}]")
    _check(res < 16 and soft <= hard, f"rlimits[{i}] is not a resource with soft <= hard")
    return res, soft, hard


def _optional_tuple(obj: Any, n: int, what: str) -> Any:
    return None if obj is None else _tuple(obj, n, what)


def _tuple(obj: Any, n: int, what: str, aligned: bool = False, raw: bool = False) -> Any:
    _check(isinstance(obj, list) and len(obj) == n, f"{what} is not a list of {n}")
    if raw:
        return tuple(obj)
    return tuple(_bounded(v, 0, U64, what) if not aligned else _addr(v, what) for v in obj)


def _host(obj: Any) -> Host:
    _map(obj, ("kernel", "vdso", "cpu_flags", "xcr0", "xstate_size"), "host")
    return Host(_typed(obj["kernel"], str, "host.kernel"),
                _typed(obj["vdso"], str, "host.vdso"),
                _strings(_typed(obj["cpu_flags"], list, "host.cpu_flags"), "cpu flag"),
                _bounded(obj["xcr0"], 0, U64, "host.xcr0"),
                _bounded(obj["xstate_size"], 0, U64, "host.xstate_size"))


def _contents(obj: Any, files: list[FileRef]) -> dict[str, bytes]:
    _check(isinstance(obj, dict), "contents is not a map")
    sizes = {f.hash: f.size for f in files}
    for h, data in obj.items():
        _check(h in sizes, f"contents for unknown file {h!r}")
        _check(isinstance(data, bytes) and len(data) == sizes[h], f"contents of {h} size")
    return dict(obj)


__all__ = ["Image", "Region", "FileRef", "Host", "OpenFile", "dumps", "dump", "loads", "load",
           "MigrateError"]

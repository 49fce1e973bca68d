"""The image format alone: round trip, generated images, and corrupt input refused with EINVAL."""

from __future__ import annotations

import dataclasses
import errno

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from bpfs.errors import BpfsError
from bpfs.migrate import image, imageframe, rank
from bpfs.migrate.image import FileRef, Host, Image, OpenFile, Region

pytestmark = pytest.mark.timeout(60)
PAGE = image.PAGE
HASH = "sha256:" + "ab" * 32


def sample(**over) -> Image:
    base = 0x5555_0000_0000
    img = Image(
        pid=4242, argv=["/bin/true", "x"], comm="true", exe=0, cwd="/home/u", uid=1000,
        gid=1000, groups=[1000, 27], dumpable=True, umask=0o022, personality=0,
        regs=bytes(range(216)),
        xstate=bytes(2696), auxv=bytes(16 * 3), mm={k: base for k in image.MM_KEYS},
        sigmask=1 << 12, sigactions=[(13, 1, 0, 0, 0), (10, base + 16, 0x04000000, base, 0)], pending=[10],
        rseq=(base + 64, 32, 0x53053053), robust=(base + 128, 24), tid_address=base + 720,
        rlimits=[(3, 8 << 20, 2**64 - 1), (7, 1024, 4096)], open_files=FILES[:2],
        special={"vvar": (0x7FFF_0000_0000, 0x7FFF_0000_4000),
                 "vdso": (0x7FFF_0000_6000, 0x7FFF_0000_8000)},
        host=Host("Linux 6.18", "sha256:" + "0" * 64, ["avx2", "sse"], 0x2E7, 2696),
        files=[FileRef(HASH, 35664, "/usr/bin/true")],
        regions=[Region(base, base + 4 * PAGE, 5, "file", False, 0, 0, []),
                 Region(base + 4 * PAGE, base + 6 * PAGE, 3, "file", False, 0, 4 * PAGE,
                        [(base + 5 * PAGE, b"\x01" * PAGE)]),
                 Region(0x7FFE_0000_0000, 0x7FFE_0002_1000, 3, "anon", True, -1, 0,
                        [(0x7FFE_0002_0000, b"\x02" * PAGE)])])
    return dataclasses.replace(img, **over)


def test_round_trip() -> None:
    img = sample()
    assert image.loads(image.dumps(img)) == img
    assert image.dumps(image.loads(image.dumps(img))) == image.dumps(img)


def test_round_trip_keeps_a_process_not_dumpable() -> None:
    """An execute-only program's image says so, and the node reads it back so."""
    back = image.loads(image.dumps(sample(dumpable=False)))
    assert back.dumpable is False
    assert image.loads(image.dumps(sample())).dumpable is True


@pytest.mark.parametrize("nice", [-20, -3, 0, 5, 19])
def test_round_trip_keeps_the_nice_value(nice: int) -> None:
    back = image.loads(image.dumps(sample(nice=nice)))
    assert back.nice == nice and back == sample(nice=nice)


def test_a_version_2_image_has_no_nice_and_loads_as_nice_0() -> None:
    """Version 2 readers restored every process at nice 0: the same image reads so here."""
    back = image.loads(_raw(version=2, nice=KeyError, open_files=KeyError))
    assert back.nice == 0 and back == sample(nice=0, open_files=[])


FILES = [OpenFile(0, "/dev/null", 0o100000, 0), OpenFile(3, "/var/log/x y.log", 0o102001, 4096),
         OpenFile(7, "/home/u", 0o2200000, 0), OpenFile(1023, "/data/\u00e9t\u00e9", 0o2, 2**63 - 1)]


def test_round_trip_keeps_open_files() -> None:
    back = image.loads(image.dumps(sample(open_files=FILES)))
    assert back.open_files == FILES and back == sample(open_files=FILES)


def test_a_version_3_image_has_no_open_files() -> None:
    """A version 3 restore closed every fd beyond 0-2: the same image reads so here."""
    back = image.loads(_raw(version=3, open_files=KeyError))
    assert back.open_files == [] and back == sample(open_files=[])


def test_a_loaded_images_runs_are_views_of_its_bytes() -> None:
    """No copy of the page bytes on load (imageframe): the runs point into the data."""
    data = bytearray(image.dumps(sample()))
    back = image.loads(data)
    run = back.regions[1].pages[0][1]
    assert isinstance(run, memoryview) and run == b"\x01" * PAGE
    data[-1] = 7
    assert back.regions[2].pages[0][1][-1] == 7


def test_a_version_3_image_of_plain_msgpack_still_loads() -> None:
    obj = _decoded(image.dumps(sample(open_files=[])))
    del obj["open_files"]
    back = image.loads(msgpack.packb(dict(obj, version=3), use_bin_type=True))
    assert back == sample(open_files=[])


def test_round_trip_with_contents_and_file_refs() -> None:
    img = sample(contents={HASH: b"z" * 35664})
    back = image.loads(image.dumps(img))
    assert back.contents == {HASH: b"z" * 35664}
    assert [f.hash for f in back.file_refs()] == [HASH]


page_runs = st.lists(st.tuples(st.integers(0, 7), st.integers(1, 3)), max_size=4)


@st.composite
def images(draw) -> Image:
    regions, addr = [], 0x1000_0000
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 12))
        anon = draw(st.booleans())
        pages, at = [], addr
        for gap, length in draw(page_runs):
            start = at + gap * PAGE
            if start + length * PAGE > addr + n * PAGE:
                break
            pages.append((start, draw(st.binary(min_size=1, max_size=8)).ljust(length * PAGE,
                                                                                 b"\0")))
            at = start + length * PAGE
        regions.append(Region(addr, addr + n * PAGE, draw(st.integers(0, 7)),
                              "anon" if anon else "file", draw(st.booleans()),
                              -1 if anon else 0, 0 if anon else draw(st.integers(0, 9)) * PAGE,
                              pages))
        addr += (n + draw(st.integers(0, 3))) * PAGE
    return sample(regions=regions, pid=draw(st.integers(1, 1 << 22)),
                  argv=draw(st.lists(st.text(max_size=20), max_size=4)),
                  comm=draw(st.text(max_size=3)), cwd=draw(st.text(max_size=30)),
                  groups=draw(st.lists(st.integers(0, 2**32 - 2), max_size=5)),
                  dumpable=draw(st.booleans()), sigmask=draw(st.integers(0, 2**64 - 1)))


@settings(max_examples=60, deadline=None)
@given(images())
def test_generated_round_trip(img: Image) -> None:
    assert image.loads(image.dumps(img)) == img


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_bytes_never_half_load(data) -> None:
    """Any byte flipped either still decodes to a checked image or is refused with EINVAL."""
    raw = bytearray(image.dumps(sample()))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        image.loads(bytes(raw))
    except BpfsError as exc:
        assert exc.errno == errno.EINVAL and exc.message.startswith("corrupt image")


def _decoded(data: bytes) -> dict:
    """A framed image's header, its runs' [addr, size] made [addr, bytes] again (as loads
    hands it to the checks; a frame attach refuses raises)."""
    header, pages = imageframe.split(data)
    obj = msgpack.unpackb(header, raw=False, strict_map_key=False)
    imageframe.attach(obj, pages)
    for r in obj["regions"]:
        r["pages"] = [[a, bytes(d)] for a, d in r["pages"]]
    return obj


def _encoded(obj: dict) -> bytes:
    """`obj` framed as version 4 if it says so (runs that are [addr, bytes] go to the page
    section, odd ones stay in the header as they are), else plain msgpack (versions 2, 3)."""
    if obj.get("version") != image.VERSION:
        return msgpack.packb(obj, use_bin_type=True)
    runs = []
    for r in obj["regions"] if isinstance(obj.get("regions"), list) else []:
        if isinstance(r, dict) and isinstance(r.get("pages"), list):
            for run in r["pages"]:
                if isinstance(run, list) and len(run) == 2 and isinstance(run[1], bytes):
                    runs.append(run[1])
                    run[1] = len(run[1])
    return b"".join(imageframe.parts(msgpack.packb(obj, use_bin_type=True), runs))


def _raw(**changes) -> bytes:
    obj = _decoded(image.dumps(sample()))
    for path, value in changes.items():
        target = obj
        keys = path.split(".")
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value is KeyError:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return _encoded(obj)


CORRUPT = {
    "truncated": image.dumps(sample())[:-10],
    "not msgpack": b"\xc1\xc1\xc1",
    "not a map": msgpack.packb([1, 2]),
    "framed, not a map": b"".join(imageframe.parts(msgpack.packb([1, 2]), [])),
    "framed version 3": b"".join(imageframe.parts(msgpack.packb({"version": 3}), [])),
    "version 4 unframed": msgpack.packb(_decoded(image.dumps(sample()))),
    "header past the end": image.dumps(sample())[:8] + b"\xff" * 8,
    "pages left over": image.dumps(sample()) + b"x",
    "pages short": image.dumps(sample())[:-1],
    "run size zero": _raw(**{"regions.1.pages.0.1": b""}),
    "run as bin in v4": b"".join(imageframe.parts(msgpack.packb(
        _decoded(image.dumps(sample()))), [])),
    "bad magic": _raw(magic="criu"),
    "future version": _raw(version=image.VERSION + 1),
    "version 1": _raw(version=1, dumpable=KeyError),  # its reader restores all dumpable
    "missing dumpable": _raw(dumpable=KeyError),
    "missing nice": _raw(nice=KeyError),
    "version 2 with nice": _raw(version=2),
    "nice too low": _raw(nice=-21),
    "nice too high": _raw(nice=20),
    "nice as str": _raw(nice="5"),
    "nice as bool": _raw(nice=True),
    "version as float": _raw(version=3.0),
    "dumpable as int": _raw(dumpable=0),
    "missing key": _raw(pid=KeyError),
    "unknown key": _raw(**{"host.extra": 1}),
    "regs size": _raw(regs=b"\0" * 100),
    "xstate size": _raw(xstate=b"\0" * 100),
    "unaligned region": _raw(**{"regions.0.start": 0x5555_0000_0001}),
    "reversed region": _raw(**{"regions.0.end": 0x5554_0000_0000}),
    "kernel address": _raw(**{"regions.2.end": 1 << 48}),
    "bad kind": _raw(**{"regions.0.kind": "shm"}),
    "file index": _raw(**{"regions.0.file": 5}),
    "anon with file": _raw(**{"regions.2.file": 0}),
    "page outside": _raw(**{"regions.1.pages.0.0": 0x5555_0000_0000}),
    "empty run": _raw(**{"regions.1.pages.0.1": b""}),
    "run past region": _raw(**{"regions.1.pages.0.1": b"x" * (PAGE + 1)}),
    "overlap": _raw(**{"regions.1.start": 0x5555_0000_2000}),
    "meets vdso": _raw(**{"regions.2.start": 0x7FFF_0000_0000,
                          "regions.2.end": 0x7FFF_0000_7000}),
    "bad hash": _raw(**{"files.0.hash": "md5:00"}),
    "bad signal": _raw(**{"sigactions.0.0": 9}),
    "bad pending": _raw(pending=[65]),
    "bad rlimit": _raw(**{"rlimits.1": [7, 5000, 4096]}),
    "bool as int": _raw(pid=True),
    "negative uid": _raw(uid=-1),
    "contents size": _raw(contents={HASH: b"short"}),
    "contents unknown": _raw(contents={"sha256:" + "cd" * 32: b""}),
    "long comm": _raw(comm="x" * 40),
    "version 3 with open files": _raw(version=3),
    "missing open files": _raw(open_files=KeyError),
    "open files not a list": _raw(open_files={}),
    "too many open files": _raw(open_files=[{"fd": i, "path": "/x", "flags": 0, "offset": 0}
                                            for i in range(image.MAX_OPEN_FILES + 1)]),
    "open file not a map": _raw(**{"open_files.0": [0, "/dev/null", 0, 0]}),
    "open file extra key": _raw(**{"open_files.0.kind": "file"}),
    "open file lacks path": _raw(**{"open_files.0.path": KeyError}),
    "fd negative": _raw(**{"open_files.0.fd": -1}),
    "fd too large": _raw(**{"open_files.1.fd": image.MAX_FD}),
    "fd as bool": _raw(**{"open_files.0.fd": False}),
    "fds not ascending": _raw(**{"open_files.1.fd": 0}),
    "relative path": _raw(**{"open_files.1.path": "var/log/x"}),
    "empty path": _raw(**{"open_files.1.path": ""}),
    "path with NUL": _raw(**{"open_files.1.path": "/tmp/a\0b"}),
    "path too long": _raw(**{"open_files.1.path": "/" + "a" * 5000}),
    "path as bytes": _raw(**{"open_files.1.path": b"/tmp/a"}),
    "O_CREAT": _raw(**{"open_files.1.flags": 0o100}),
    "O_TRUNC": _raw(**{"open_files.1.flags": 0o1001}),
    "O_EXCL": _raw(**{"open_files.1.flags": 0o200}),
    "flags too large": _raw(**{"open_files.1.flags": 2**40}),
    "negative offset": _raw(**{"open_files.1.offset": -1}),
    "offset too large": _raw(**{"open_files.1.offset": 2**63}),
    "offset as str": _raw(**{"open_files.1.offset": "4096"}),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_refused(name: str) -> None:
    with pytest.raises(BpfsError) as info:
        image.loads(CORRUPT[name])
    assert info.value.errno == errno.EINVAL
    assert info.value.message.startswith("corrupt image: ")


# ---- set_rank: one image, many ranks (bproc's vexecmove) ----

STACK = 0x7FFE_0002_0000


def _with_env(strings: list[bytes], argv: list[bytes] = [b"prog"]) -> Image:
    """An image whose stack page holds argv then the environment, as the kernel lays it out."""
    args = b"".join(a + b"\0" for a in argv)
    env = b"".join(s + b"\0" for s in strings)
    arg_start = STACK + 0x800
    env_start = arg_start + len(args)
    mm = dict(sample().mm, arg_start=arg_start, arg_end=env_start, env_start=env_start,
              env_end=env_start + len(env))
    run = b"\x02" * 0x800 + args + env
    return sample(mm=mm, regions=[*sample().regions[:2],
                                  Region(0x7FFE_0000_0000, STACK + PAGE, 3, "anon", True, -1, 0,
                                         [(STACK, run)])])


def _env(img: Image) -> list[bytes]:
    (addr, data), = img.regions[-1].pages
    lo, hi = img.mm["env_start"] - addr, img.mm["env_end"] - addr
    return data[lo:hi].split(b"\0")[:-1]


def test_set_rank_writes_seven_digits_over_the_placeholder() -> None:
    img = _with_env([b"A=1", b"BPROC_RANK=XXXXXXX", b"B=2"])
    assert rank.set_rank(img, 31)
    assert _env(img) == [b"A=1", b"BPROC_RANK=0000031", b"B=2"]
    assert rank.set_rank(_with_env([b"BPROC_RANK=XXXXXXX"]), 0)


def test_set_rank_only_touches_a_whole_environment_string() -> None:
    img = _with_env([b"X_BPROC_RANK=XXXXXXX", b"BPROC_RANK=XXXXXXXY"],
                    argv=[b"echo", b"BPROC_RANK=XXXXXXX"])
    before = image.dumps(img)
    assert not rank.set_rank(img, 5)
    assert image.dumps(img) == before


def test_set_rank_refuses_a_rank_of_eight_digits() -> None:
    with pytest.raises(BpfsError) as err:
        rank.set_rank(_with_env([b"BPROC_RANK=XXXXXXX"]), 10**7)
    assert err.value.errno == errno.EINVAL


# ---- the one-pass checks against the naming checks ----

ODD = [-1, 0, 1, 7, 8, True, False, 4095, 4096, 2**47, 2**47 + 4096, 2**64 - 1, 1.0, "x", "file",
       "anon", b"", b"x", None, [], [1], [0, b"x"], {}]
FIELDS = ([f"regions.{i}.{k}" for i in range(3) for k in ("start", "end", "prot", "kind",
                                                          "growsdown", "file", "offset")]
          + ["regions.1.pages.0", "regions.1.pages.0.0", "regions.1.pages.0.1", "regions.2.pages",
             "regions.1", "files.0.size", "files.0.path", "files.0.hash", "rlimits.0",
             "rlimits.1.0", "rlimits.1.1", "mm.brk", "special.vdso", "special.vvar.1",
             "groups.0", "argv.1", "sigactions.0", "rseq", "robust", "pending.0", "host.cpu_flags.0"]
          + ["dumpable", "nice", "open_files", "open_files.0", "open_files.1.fd",
             "open_files.1.path", "open_files.1.flags", "open_files.1.offset"])


def _slow_from_obj(obj) -> image.Image:
    """`_from_obj` with every one-pass check refusing, so only the naming checks decide."""
    saved = {n: getattr(image, n) for n in ("_regions_fast", "_files_fast", "_clear_of")}
    image._regions_fast = image._files_fast = lambda *a: None
    image._clear_of = lambda *a: False
    try:
        return image._from_obj(obj)
    finally:
        for n, f in saved.items():
            setattr(image, n, f)


def _outcome(fn, obj):
    try:
        return fn(msgpack.unpackb(msgpack.packb(obj), raw=False, strict_map_key=False))
    except BpfsError as exc:
        assert exc.errno == errno.EINVAL and exc.message.startswith("corrupt image: ")
        return ("refused", exc.message)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIELDS), st.sampled_from(ODD))
def test_fast_checks_agree_with_the_naming_checks(path: str, value) -> None:
    """An odd value anywhere: both ways accept the same image or refuse with the same message."""
    try:
        obj = _decoded(_raw(**{path: value}))
    except BpfsError:
        return   # the frame refused it: neither check runs
    assert _outcome(image._from_obj, obj) == _outcome(_slow_from_obj, obj)


def test_overlap_with_a_special_mapping_is_named() -> None:
    raw = _raw(**{"regions.2.start": 0x7FFF_0000_0000, "regions.2.end": 0x7FFF_0000_7000,
                  "regions.2.pages": []})
    with pytest.raises(BpfsError, match="vvar overlaps region at 0x7fff00000000"):
        image.loads(raw)

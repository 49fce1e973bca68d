"""The message classes (bpfs/wire/messages.py): each round-trips through the wire, in the
bytes the dict-built protocol wrote; what does not fit is a ProtocolError naming the message
and the field; and what our own senders build fits.

Pure: no sockets. The same decoders are tried over real sockets against a real master and a
real node daemon in tests/hostile/test_hostile_peer.py, with the strategies defined here
(`valid`, `struct_fields`), which walk the classes' own type information.
"""

from __future__ import annotations

import errno
import logging
import math
import re
from typing import Any, get_type_hints

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfs import formats
from bpfs.errors import ProtocolError
from bpfs.master.links import RefusalLog
from bpfs.ratelog import RateLog
from bpfs.node import facts as node_facts
from bpfs.wire import framing as wire, messages as m

FACTS = {"hostname": "n1", "cpus": 2, "arch": "x86_64", "kernel": "6.1.0",
         "load": [0.5, 0.25, 0.0], "mem_total": 2_000_000, "mem_available": 1_000_000,
         "uptime": 42.0}
NODE_FACTS = m.NodeFacts(**{**FACTS, "load": tuple(FACTS["load"])})
TOKEN = "0123456789abcdef" * 2
HASH = "sha256:" + "0" * 64
CRED = m.Cred(uid=1000, gid=100, groups=(27, 100), pid=4242)
ATTR = m.FsAttr(ino=0x106, mode=0o40111, nlink=2, uid=0, gid=0, size=0, time_ns=1,
                entry_timeout=10.0, attr_timeout=0.0)

# One message of each kind (some twice), as the master and the node send them.
GOOD = [
    m.Hello(v=1, nonce=b"n" * 32),
    m.Challenge(v=1, nonce=b"n" * 32, mac=b"m" * 32),
    m.Auth(mac=b"m" * 32),
    m.Ok(),
    m.Refused(errno=errno.EBUSY, message="node 3 is taken"),
    m.Register(facts=NODE_FACTS),
    m.Register(node=65535, facts=NODE_FACTS),
    m.Welcome(node=3, heartbeat=1.0),
    m.State(state="up"),
    m.Facts(facts=m.NodeFacts.of(node_facts.facts())),
    m.Ctl(cmd="reboot"),
    m.Names(master="10.0.0.1", nodes=[(0, "10.0.0.10"), (5, "fd00::5")]),
    m.Restore(id=1, image=b"\0" * 100, uid=1000, gid=100, groups=(100, 27),
              io=("socket", "null", "file:/tmp/x"), port=4000, token=TOKEN, pid=4242,
              rank=9_999_999),
    m.Restore(id=2, image=b"", uid=0, gid=0, groups=(), io=("null",) * 3, port=0, token=""),
    m.Need(id=1, hashes=[HASH]),
    m.Files(id=1, contents={HASH: b"\x7fELF"}),
    m.Restored(id=1, pid=4242),
    m.Failed(id=1, errno=errno.ENOENT, message="no such file"),
    m.Signal(pid=4242, sig=64),
    m.Signal(pid=4242, sig=20, id=7, group=True),
    m.Stopped(pid=4242, sig=20),
    m.Continued(pid=4242),
    m.Exited(pid=4242, code=255),
    m.Exited(pid=4242, signal=9, id=3),
    m.Welcome(node=3, heartbeat=1.0, pid_max=32768),
    m.Restore(id=3, image=b"", uid=0, gid=0, groups=(), io=("null",) * 3, port=0, token="",
              pid=4242, ppid=4000, pgid=4000, sid=3999),
    m.Fork(seq=1, parent=4242),
    m.Forked(seq=1, pid=4243, id=8),
    m.Forked(seq=2, errno=errno.EAGAIN),
    m.Unforked(pid=4243, id=8),
    m.Spare(parent=4242, pid=4244, id=9),
    m.Took(parent=4242, pid=4244, id=9),
    m.Took(parent=4242, pid=4245, id=10, waited=True),
    m.NotTaken(pid=4244, id=9),
    m.Execed(pid=4243, id=8, cmdline=b"sleep\x00100\x00"),
    m.Kill(seq=3, pid=-4000, sig=15, ruid=1000, euid=1000),
    m.Kill(seq=4, pid=4000, sig=0, ruid=0, euid=0),
    m.Killed(seq=3),
    m.Killed(seq=4, errno=errno.EPERM),
    m.Armed(pid=4243),
    m.Watch(seq=7, pid=4000, ruid=1000, euid=1000),
    m.Exec(seq=5, pid=4243, path=b"/bin/hostname", argv=[b"hostname"], envp=[b"A=b"],
           cwd=b"/tmp"),
    m.Execd(seq=5),
    m.Execd(seq=6, errno=errno.ENOENT),
    m.Ended(pid=4243, status=15),
    m.Dump(id=7, pid=4242, links=(0, 1, 2)), m.Dump(id=8, pid=4242),
    m.Part(id=7, data=b"x" * 100), m.Dumped(id=7, image=b"img", consumed=12),
    m.Dumped(id=7, image=b""), m.Piece(id=9, at=0, data=b"y"), m.Abort(id=9), m.Streamed(id=9, total=1 << 33), m.Drop(id=7, pid=4242),
    m.Relayed(id=7, port=4000, token="ab" * 16),
    m.Take(id=9), m.Taking(id=9, port=4001, token="cd" * 32),
    m.Way(id=9, pid=300), m.Way(id=9, pid=300, host="10.0.0.2", port=4001, token="cd" * 32,
                                to=10),
    m.Dump(id=7, pid=4242, host="10.0.0.2", port=4001, token="cd" * 32, to=9),
    m.Dump(id=7, pid=4242, way=True),
    m.Dump(id=7, pid=4242, host="10.0.0.1", port=4001, token="cd" * 32, to=7, big_only=True),
    m.Part(id=7, data=b"h" * 50, total=1 << 30, consumed=0, direct=True),
    m.Open(id=9, token="cd" * 32), m.Chunk(id=9, at=50, data=b"z" * 10),
    m.Resume(id=7, pid=4242), m.Resume(id=7, pid=4242, errno=errno.EBUSY),
    m.Again(id=9, consumed=0), m.Again(id=9, consumed=1 << 40),
    m.Again(id=9, consumed=5, port=4000, token="ab" * 16, io=("socket", "socket", "stdout"),
            pid=300, host="10.0.0.1"),
    m.Welcome(node=3, heartbeat=1.0, usage=2.0),
    m.Sample(),
    m.Usage(hz=100, at=12.5, procs=[]),
    m.Usage(hz=100, at=12.5, procs=[m.ProcUsage(4242, 7, "R", "spin (x)", 1234, 56, 0, 0,
                                                900, 1, 0, 0, -20, 1, 5000, 2**40, 2**20)]),
    m.Welcome(node=3, heartbeat=1.0, mount="/bproc"),
    m.FsLookup(id=1, parent=1, name=b"nodes"),
    m.FsGetattr(id=2, ino=2**64 - 1),
    m.FsSetattr(id=3, ino=6, cred=CRED, mode=0o110, uid=1000),
    m.FsAccess(id=4, ino=6, mode=2, cred=CRED),
    m.FsOpendir(id=5, ino=1, cred=m.Cred(uid=0, gid=0, groups=())),
    m.FsReaddir(id=6, fh=7, start=0),
    m.FsOpen(id=7, ino=0x111, flags=0o2, cred=CRED),
    m.FsRead(id=8, fh=7, off=0, size=m.FS_DATA),
    m.FsWrite(id=9, fh=7, off=0, data=b"state up\n"),
    m.FsRelease(id=10, fh=7),
    m.FsCancel(id=8),
    m.FsReply(id=1, attr=ATTR),
    m.FsReply(id=6, entries=(m.FsEntry(name=b"0", attr=ATTR, next=1),)),
    m.FsReply(id=7, fh=7, nonseekable=True),
    m.FsReply(id=8, data=b"up\n"),
    m.FsReply(id=9, errno=errno.EPERM),
    m.FsReply(id=4, ok=False),
]
USAGE_ENTRY = [4242, 7, "R", "spin", 1, 2, 0, 0, 9, 0, 0, 0, 5, 1, 500, 4096, 4096]


def entry(**change: Any) -> list:
    """USAGE_ENTRY with fields changed by name (ProcUsage's order)."""
    out = list(USAGE_ENTRY)
    for k, v in change.items():
        out[m.ProcUsage.__struct_fields__.index(k)] = v
    return out


def side_of(cls: type[m.Msg], sender: str | None = None) -> m.Side:
    """The decoder that takes `cls` (from `sender`, by default its own)."""
    sender = sender or cls.sender
    if cls.handshake:
        return m.HANDSHAKE
    if sender == "peer":
        return m.DIRECT
    return m.FROM_NODE if sender == "node" else m.FROM_MASTER


def plain(msg: Any, nones: bool = True) -> Any:
    """A decoded message as the fake peers of the cluster tests read it: a dict with "t" and
    every field (None where absent), lists for arrays (the test-side view of the wire).
    Without `nones`, as the dict-built protocol wrote it: None fields left out."""
    if isinstance(msg, msgspec.Struct) and msg.__struct_config__.array_like:
        return [plain(getattr(msg, k), nones) for k in msg.__struct_fields__]
    if isinstance(msg, msgspec.Struct):
        out = {"t": m.tag(type(msg))} if isinstance(msg, m.Msg) else {}
        out.update({k: plain(getattr(msg, k), nones) for k in msg.__struct_fields__
                    if nones or getattr(msg, k) is not None})
        return out
    if isinstance(msg, (list, tuple)):
        return [plain(x, nones) for x in msg]
    if isinstance(msg, dict):
        return {k: plain(v, nones) for k, v in msg.items()}
    return msg


def as_dict(msg: Any) -> Any:
    return plain(msg, nones=False)


def test_every_message_has_an_example_here() -> None:
    assert {m.tag(type(x)) for x in GOOD} == set(m.MESSAGES)


def test_each_side_takes_the_messages_of_its_sender_and_phase() -> None:
    assert {c.__name__ for c in m.FROM_NODE.classes} == {
        "Register", "State", "Facts", "Need", "Restored", "Failed", "Stopped", "Continued",
        "Exited", "Fork", "Unforked", "Took", "Execed", "Kill", "Exec", "Watch", "Usage", "FsLookup",
        "FsGetattr", "FsSetattr", "FsAccess", "FsOpendir", "FsReaddir", "FsOpen", "FsRead",
        "FsWrite", "FsRelease", "FsCancel", "Part", "Dumped", "Relayed", "Taking"}
    assert {c.__name__ for c in m.FROM_MASTER.classes} == {
        "Refused", "Welcome", "Ctl", "Restore", "Files", "Signal", "Forked", "Killed",
        "Spare", "NotTaken", "Armed", "Execd", "Ended", "Sample", "FsReply", "Names", "Dump",
        "Piece", "Drop", "Resume", "Again", "Abort", "Streamed", "Take", "Way"}
    assert {c.__name__ for c in m.DIRECT.classes} == {"Open", "Chunk"}
    assert {c.__name__ for c in m.HANDSHAKE.classes} == {
        "Hello", "Challenge", "Auth", "Ok", "Refused"}


@pytest.mark.parametrize("msg", GOOD, ids=[f"{m.tag(type(x))}-{i}" for i, x in enumerate(GOOD)])
def test_each_message_round_trips_in_the_bytes_of_the_dict_protocol(msg: m.Msg) -> None:
    body = m.encode(msg)
    assert body == msgpack.packb(as_dict(msg), use_bin_type=True)
    assert side_of(type(msg)).decode(body) == msg
    assert side_of(type(msg)).decode(wire.pack(msg)[4:]) == msg


def test_optional_fields_may_be_absent_or_nil_and_unknown_fields_are_dropped() -> None:
    raw = {"t": "restore", "id": 1, "image": b"", "uid": 0, "gid": 0, "groups": [],
           "io": ["null"] * 3, "port": 0, "token": "", "cwd": "/tmp", "pid": None,
           "later": {"a": [1, {"b": b"x"}]}}
    got = m.FROM_MASTER.decode(msgpack.packb(raw))
    assert isinstance(got, m.Restore) and got.pid is None and got.rank is None
    assert not hasattr(got, "cwd") and got.groups == () and got.io == ("null",) * 3


def test_numbers_become_floats_and_ints_stay_ints() -> None:
    got = m.FROM_NODE.decode(msgpack.packb(
        {"t": "facts", "facts": {**FACTS, "load": [1, 2, 3], "uptime": 5}}))
    assert got.facts.load == (1.0, 2.0, 3.0) and type(got.facts.uptime) is float
    assert type(got.facts.cpus) is int
    hb = m.FROM_MASTER.decode(msgpack.packb({"t": "welcome", "node": 0, "heartbeat": 1}))
    assert type(hb.heartbeat) is float


def test_the_facts_are_formats_facts_fields_each_bounded() -> None:
    """formats.Facts is THE schema: the wire's NodeFacts has its fields in its order, of
    its types, each with a bound in FACT_TYPES."""
    hints = get_type_hints(formats.Facts)
    assert list(m.FACT_TYPES) == list(hints) == list(m.NodeFacts.__struct_fields__)
    for name, hint in hints.items():
        info = msgspec.inspect.type_info(m.FACT_TYPES[name])
        if name == "load":
            assert hint == tuple[float, float, float]
            assert all(isinstance(t, msgspec.inspect.FloatType) and t.ge == 0 and t.le
                       for t in info.item_types)
        elif hint is str:
            assert isinstance(info, msgspec.inspect.StrType) and info.max_length
        else:
            assert isinstance(info, {int: msgspec.inspect.IntType,
                                     float: msgspec.inspect.FloatType}[hint]), name
            assert info.ge == 0, name


def test_facts_words_are_sanitized_for_the_master() -> None:
    raw = {**FACTS, "hostname": "a b\n\x1b[31m" + "x" * 100, "kernel": "6.1 x"}
    got = m.FROM_NODE.decode(msgpack.packb({"t": "facts", "facts": raw})).facts.facts()
    assert isinstance(got, formats.Facts)
    assert got.hostname == ("ab[31m" + "x" * 100)[:64] and got.kernel == "6.1x"
    assert got.load == (0.5, 0.25, 0.0) and got.mem_total == 2_000_000
    assert m.NodeFacts.of(got).facts() == got


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_the_word_sanitizer_keeps_printable_non_space_characters_up_to_64(x: str) -> None:
    assert m.sanitize_word(x) == "".join(
        ch for ch in x if ch.isprintable() and not ch.isspace())[:64]


BAD = [
    ({"t": "auth", "mac": 8_000_000_000}, m.HANDSHAKE, "auth.mac: expected `bytes`, got `int`"),
    ({"t": "auth", "mac": 2**63}, m.HANDSHAKE, "auth.mac: expected `bytes`, got `int`"),
    ({"t": "auth", "mac": "x" * 32}, m.HANDSHAKE, "auth.mac: expected `bytes`, got `str`"),
    ({"t": "auth", "mac": [1]}, m.HANDSHAKE, "auth.mac: expected `bytes`, got `array`"),
    ({"t": "auth", "mac": {}}, m.HANDSHAKE, "auth.mac: expected `bytes`, got `object`"),
    ({"t": "auth", "mac": None}, m.HANDSHAKE, "auth.mac: expected `bytes`, got `None`"),
    ({"t": "auth", "mac": b"short"}, m.HANDSHAKE, "auth.mac: expected `bytes` of length >= 32"),
    ({"t": "auth"}, m.HANDSHAKE, "auth: missing field 'mac'"),
    ({"t": "hello", "v": True, "nonce": b"n" * 32}, m.HANDSHAKE, "hello.v: expected `int`, got `bool`"),
    ({"t": "register", "node": 65536, "facts": FACTS}, m.FROM_NODE, "register.node: expected `int` <= 65535"),
    ({"t": "register", "node": "7", "facts": FACTS}, m.FROM_NODE, "register.node"),
    ({"t": "register", "node": None, "facts": {**FACTS, "cpus": -1}}, m.FROM_NODE, "register.facts.cpus"),
    ({"t": "facts", "facts": {**FACTS, "cpus": "x"}}, m.FROM_NODE, "facts.facts.cpus: expected `int`, got `str`"),
    ({"t": "facts", "facts": {**FACTS, "cpus": True}}, m.FROM_NODE, "facts.facts.cpus: expected `int`, got `bool`"),
    ({"t": "facts", "facts": {**FACTS, "arch": 7}}, m.FROM_NODE, "facts.facts.arch: expected `str`, got `int`"),
    ({"t": "facts", "facts": {**FACTS, "mem_total": -5}}, m.FROM_NODE, "facts.facts.mem_total: expected `int` >= 0"),
    ({"t": "facts", "facts": None}, m.FROM_NODE, "facts.facts: expected `object`, got `None`"),
    ({"t": "facts", "facts": {**FACTS, "load": [0.1, math.inf, 0]}}, m.FROM_NODE,
     "facts.facts.load[1]: expected `float` <= 1000000000.0"),
    ({"t": "facts", "facts": {**FACTS, "uptime": math.nan}}, m.FROM_NODE, "facts.facts.uptime"),
    ({"t": "facts", "facts": {**FACTS, "load": [1, 2]}}, m.FROM_NODE,
     "facts.facts.load: expected `array` of length 3"),
    ({"t": "facts", "facts": {k: v for k, v in FACTS.items() if k != "arch"}}, m.FROM_NODE,
     "facts.facts: missing field 'arch'"),
    ({"t": "facts", "facts": {**FACTS, "hostname": "h" * 257}}, m.FROM_NODE,
     "facts.facts.hostname: expected `str` of length <= 256"),
    ({"t": "facts"}, m.FROM_NODE, "facts: missing field 'facts'"),
    ({"t": "need", "id": 1, "hashes": ["x"] * 65537}, m.FROM_NODE, "need.hashes: expected `array` of length <= 65536"),
    ({"t": "need", "id": 1, "hashes": [b"x"]}, m.FROM_NODE, "need.hashes[0]: expected `str`"),
    ({"t": "need", "id": -1, "hashes": []}, m.FROM_NODE, "need.id"),
    ({"t": "exited", "pid": 0, "code": 0, "signal": None}, m.FROM_NODE, "exited.pid: expected `int` >= 1"),
    ({"t": "exited", "pid": 2**63, "code": 0}, m.FROM_NODE, "exited.pid: expected `int` <= 4194304"),
    ({"t": "exited", "pid": 5, "code": 256, "signal": None}, m.FROM_NODE, "exited.code"),
    ({"t": "exited", "pid": 5, "code": "zero"}, m.FROM_NODE, "exited.code"),
    ({"t": "exited", "pid": 5, "code": 0, "signal": 65}, m.FROM_NODE, "exited.signal"),
    ({"t": "failed", "id": 1, "errno": 0, "message": "x"}, m.FROM_NODE, "failed.errno"),
    ({"t": "restored", "id": 1.0, "pid": 5}, m.FROM_NODE, "restored.id: expected `int`, got `float`"),
    ({"t": "restored", "id": 1, "pid": 5, 7: "x"}, m.FROM_NODE, "restored key: expected `str`, got `int`"),
    ({"t": "welcome", "node": 1, "heartbeat": 0}, m.FROM_MASTER, "welcome.heartbeat"),
    ({"t": "welcome", "node": 1, "heartbeat": math.nan}, m.FROM_MASTER, "welcome.heartbeat"),
    ({"t": "restore", "id": 1, "image": b"", "uid": 0, "gid": 0, "groups": [-1], "io": ["null"] * 3,
      "port": 0, "token": ""}, m.FROM_MASTER, "restore.groups[0]"),
    ({"t": "restore", "id": 1, "image": b"", "uid": -1, "gid": 0, "groups": [], "io": ["null"] * 3,
      "port": 0, "token": ""}, m.FROM_MASTER, "restore.uid"),
    ({"t": "restore", "id": 1, "image": b"", "uid": 0, "gid": 0, "groups": [], "io": ["null"] * 2,
      "port": 0, "token": ""}, m.FROM_MASTER, "restore.io: expected `array` of length 3"),
    ({"t": "restore", "id": 1, "image": "text", "uid": 0, "gid": 0, "groups": [], "io": ["null"] * 3,
      "port": 0, "token": ""}, m.FROM_MASTER, "restore.image"),
    ({"t": "restore", "id": 1}, m.FROM_MASTER, "restore: missing field 'image'"),
    ({"t": "files", "id": 1, "contents": {b"k": b"v"}}, m.FROM_MASTER, "files.contents key: expected `str`"),
    ({"t": "files", "id": 1, "contents": {"k": "v"}}, m.FROM_MASTER, "files.contents[...]: expected `bytes`"),
    ({"t": "files", "id": 1, "contents": [b"x"]}, m.FROM_MASTER, "files.contents: expected `object`"),
    ({"t": "signal", "pid": 5, "sig": "KILL"}, m.FROM_MASTER, "signal.sig: expected `int`, got `str`"),
    ({"t": "signal", "pid": 5, "sig": 0}, m.FROM_MASTER, "signal.sig: expected `int` >= 1"),
    ({"t": "ctl", "cmd": 8_000_000_000}, m.FROM_MASTER, "ctl.cmd"),
    ({"t": "welcome", "node": 1, "heartbeat": 1, "usage": 0}, m.FROM_MASTER, "welcome.usage"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [USAGE_ENTRY] * 65537}, m.FROM_NODE,
     "usage.procs: expected `array` of length <= 65536"),
    ({"t": "usage", "hz": 0, "at": 1, "procs": []}, m.FROM_NODE, "usage.hz"),
    ({"t": "usage", "hz": 100, "at": -1, "procs": []}, m.FROM_NODE, "usage.at"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [USAGE_ENTRY[:-1]]}, m.FROM_NODE,
     "usage.procs[0]: expected `array` of at least length 17"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [{"pid": 5}]}, m.FROM_NODE,
     "usage.procs[0]: expected `array`, got `object`"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [entry(pid=0)]}, m.FROM_NODE, "usage.procs[0][0]"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [entry(state="RS")]}, m.FROM_NODE,
     "usage.procs[0][2]: expected `str` of length <= 1"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [entry(comm="c" * 65)]}, m.FROM_NODE,
     "usage.procs[0][3]"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [entry(utime=-1)]}, m.FROM_NODE, "usage.procs[0][4]"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [entry(nice=20)]}, m.FROM_NODE, "usage.procs[0][12]"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [entry(rss=-4096)]}, m.FROM_NODE, "usage.procs[0][16]"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": [entry(threads=True)]}, m.FROM_NODE,
     "usage.procs[0][13]: expected `int`, got `bool`"),
    ({"t": "usage", "hz": 100, "at": 1, "procs": []}, m.FROM_MASTER, "'usage' is the node's message"),
    ({"t": "sample"}, m.FROM_NODE, "'sample' is the master's message"),
    ({"t": "welcome", "node": 1, "heartbeat": 1, "mount": "/" * 4097}, m.FROM_MASTER,
     "welcome.mount: expected `str` of length <= 4096"),
    ({"t": "fs_lookup", "id": 1, "parent": 1, "name": b""}, m.FROM_NODE,
     "fs_lookup.name: expected `bytes` of length >= 1"),
    ({"t": "fs_lookup", "id": 1, "parent": 1, "name": b"x" * 256}, m.FROM_NODE,
     "fs_lookup.name: expected `bytes` of length <= 255"),
    ({"t": "fs_lookup", "id": 1, "parent": 1, "name": "status"}, m.FROM_NODE,
     "fs_lookup.name: expected `bytes`, got `str`"),
    ({"t": "fs_getattr", "id": 1, "ino": 0}, m.FROM_NODE, "fs_getattr.ino: expected `int` >= 1"),
    ({"t": "fs_getattr", "id": 1, "ino": -5}, m.FROM_NODE, "fs_getattr.ino"),
    ({"t": "fs_open", "id": 1, "ino": 2, "flags": 2**32, "cred": {"uid": 0, "gid": 0, "groups": []}},
     m.FROM_NODE, "fs_open.flags: expected `int` <= 4294967295"),
    ({"t": "fs_open", "id": 1, "ino": 2, "flags": 0}, m.FROM_NODE, "fs_open: missing field 'cred'"),
    ({"t": "fs_open", "id": 1, "ino": 2, "flags": 0, "cred": {"uid": -1, "gid": 0, "groups": []}},
     m.FROM_NODE, "fs_open.cred.uid: expected `int` >= 0"),
    ({"t": "fs_open", "id": 1, "ino": 2, "flags": 0, "cred": {"uid": 0, "gid": 2**32 - 1, "groups": []}},
     m.FROM_NODE, "fs_open.cred.gid: expected `int` <= 4294967294"),
    ({"t": "fs_open", "id": 1, "ino": 2, "flags": 0, "cred": {"uid": 1, "gid": 1,
      "groups": [1] * 65537}}, m.FROM_NODE, "fs_open.cred.groups: expected `array` of length <= 65536"),
    ({"t": "fs_open", "id": 1, "ino": 2, "flags": 0, "cred": {"uid": 1, "gid": 1, "groups": ["0"]}},
     m.FROM_NODE, "fs_open.cred.groups[0]: expected `int`, got `str`"),
    ({"t": "fs_setattr", "id": 1, "ino": 6, "cred": {"uid": 1, "gid": 1, "groups": []},
      "mode": 0o10000}, m.FROM_NODE, "fs_setattr.mode: expected `int` <= 4095"),
    ({"t": "fs_access", "id": 1, "ino": 6, "mode": 8, "cred": {"uid": 1, "gid": 1, "groups": []}},
     m.FROM_NODE, "fs_access.mode: expected `int` <= 7"),
    ({"t": "fs_read", "id": 1, "fh": 1, "off": 0, "size": m.FS_DATA + 1}, m.FROM_NODE,
     "fs_read.size: expected `int` <= 1048576"),
    ({"t": "fs_read", "id": 1, "fh": 1, "off": -1, "size": 1}, m.FROM_NODE, "fs_read.off"),
    ({"t": "fs_write", "id": 1, "fh": 1, "off": 0, "data": b"x" * (m.FS_DATA + 1)}, m.FROM_NODE,
     "fs_write.data: expected `bytes` of length <= 1048576"),
    ({"t": "fs_write", "id": 1, "fh": 1, "off": 0, "data": "state up"}, m.FROM_NODE,
     "fs_write.data: expected `bytes`, got `str`"),
    ({"t": "fs_cancel", "id": None}, m.FROM_NODE, "fs_cancel.id: expected `int`, got `None`"),
    ({"t": "fs_reply", "id": 1, "entries": [{"name": b"x", "next": 1}]}, m.FROM_MASTER,
     "fs_reply.entries[0]: missing field 'attr'"),
    ({"t": "fs_reply", "id": 1, "errno": 0}, m.FROM_MASTER, "fs_reply.errno: expected `int` >= 1"),
    ({"t": "fs_reply", "id": 1}, m.FROM_NODE, "'fs_reply' is the master's message; a node may not"),
    ({"t": "fs_read", "id": 1, "fh": 1, "off": 0, "size": 1}, m.FROM_MASTER,
     "'fs_read' is the node's message; a master may not"),
    ({"t": "restore", "id": 1}, m.FROM_NODE, "'restore' is the master's message; a node may not send it"),
    ({"t": "restored", "id": 1, "pid": 5}, m.FROM_MASTER, "'restored' is the node's message; a master"),
    ({"t": "hello", "v": 1, "nonce": b"n" * 32}, m.FROM_NODE, "'hello' is a handshake message, not a message of a session"),
    ({"t": "challenge", "v": 1, "nonce": b"n" * 32, "mac": b"m" * 32}, m.FROM_MASTER,
     "not a message of a session"),
    ({"t": "register", "facts": FACTS}, m.HANDSHAKE, "'register' is not a handshake message"),
    ({"t": "frobnicate"}, m.FROM_NODE, "unknown message 'frobnicate'"),
    ({"t": "x" * 1000}, m.FROM_NODE, "unknown message 'xxxxxxxx"),
    ({"t": 5}, m.FROM_NODE, "not a message map"),
    ({"no": "t"}, m.FROM_MASTER, "not a message map"),
    ([1, 2], m.FROM_NODE, "not a message map"),
]


@pytest.mark.parametrize("msg, side, text", BAD, ids=[b[2][:40] for b in BAD])
def test_what_does_not_fit_names_the_message_and_the_field(msg: Any, side: m.Side,
                                                           text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        side.decode(msgpack.packb(msg, use_bin_type=True))
    assert info.value.errno == errno.EPROTO
    assert str(info.value).startswith(text) or text in str(info.value), str(info.value)
    assert len(str(info.value)) < 160                # never the peer's data at length


BOMBS = [b"\xdd" + (2**32 - 1).to_bytes(4, "big"),          # an array of 4G items
         b"\xdf" + (2**32 - 1).to_bytes(4, "big"),          # a map of 4G entries
         b"\xdd\x00\x01\x00\x01" + b"\xc0" * 65537,          # 65537 nils
         b"\xc6\xff\xff\xff\xff",                           # a bin of 4 GiB
         b"\x91" * 5000 + b"\xc0"]                          # nested 5000 deep


def test_the_plain_decoder_builds_nothing_larger_than_the_frame_or_grammar_allows() -> None:
    for body in BOMBS + [b"\xd7\xff" + b"\0" * 8]:          # and no extension type
        with pytest.raises(ProtocolError, match="undecodable"):
            wire.unpack(body)


@pytest.mark.parametrize("field", ["hashes", "later"])
def test_the_typed_decoders_build_nothing_larger_than_the_grammar_allows(field: str) -> None:
    """The same bombs as the value of a field (a list the class bounds, or one it does not
    name and skips): refused at once, without building them (a 4G-item list would need
    32 GiB); a field no class names is skipped, not built (65537 nils cost nothing)."""
    head = msgpack.packb({"t": "need", "id": 1, "hashes": []})
    for bomb in BOMBS:
        body = bytes([head[0] + 1]) + head[1:] if field == "later" else head[:-1]
        body += (msgpack.packb("later") + bomb) if field == "later" else bomb
        if field == "later" and bomb.endswith(b"\xc0" * 65537):
            assert m.FROM_NODE.decode(body) == m.Need(id=1, hashes=[])
            continue
        with pytest.raises(ProtocolError):
            m.FROM_NODE.decode(body)


def nested(depth: int) -> bytes:
    """`continued` with a field no class names, a list nested `depth` deep."""
    return b"\x83" + b"".join(msgpack.packb(x) for x in ("t", "continued", "pid", 1, "x")) \
        + b"\x91" * depth + b"\xc0"


def _at_depth(frames: int, fn: Any) -> Any:
    return fn() if frames == 0 else _at_depth(frames - 1, fn)


@pytest.mark.parametrize("depth", [10, 900, 990, 1100, 5000])
def test_deep_nesting_is_decided_the_same_at_any_stack_depth(depth: int) -> None:
    """A value nested deeper than the stack allows is decided by msgpack's fixed limit, so
    a receiver deep in its own calls decides as a test does."""
    def outcome() -> str:
        try:
            return repr(m.FROM_NODE.decode(nested(depth)))
        except ProtocolError as exc:
            return str(exc)
    assert outcome() == _at_depth(700, outcome)
    assert ("Continued" in outcome()) == (depth < 1000)


# ---- strategies over the classes' type information (also tests/hostile) -------------------

def _bounds(t: Any, default_lo: float, default_hi: float) -> tuple[Any, Any]:
    lo = t.ge if t.ge is not None else default_lo
    hi = t.le if t.le is not None else default_hi
    return lo, hi


def valid(t: Any, plain: bool = False) -> st.SearchStrategy[Any]:
    """Values of msgspec type info `t` (small ones: the point is the shape), as the
    decoder returns them, or with `plain` as msgpack would carry them (maps, lists)."""
    i = msgspec.inspect
    if isinstance(t, i.IntType):
        lo, hi = _bounds(t, -2**63, 2**64 - 1)
        return st.one_of(st.integers(lo, min(hi, lo + 1000)), st.sampled_from([lo, hi]))
    if isinstance(t, i.FloatType):
        lo, hi = _bounds(t, -1e300, 1e300)
        return st.floats(lo, hi, allow_nan=False)
    if isinstance(t, i.BoolType):
        return st.booleans()
    if isinstance(t, i.NoneType):
        return st.none()
    if isinstance(t, i.StrType) and t.pattern:         # a token's hex digits
        return st.from_regex(t.pattern, fullmatch=True)
    if isinstance(t, i.StrType):
        return st.text(min_size=t.min_length or 0, max_size=min(t.max_length or 20, 20))
    if isinstance(t, (i.BytesType, i.MemoryViewType)):   # a view decodes equal to bytes
        lo = t.min_length or 0
        return st.binary(min_size=lo, max_size=min(t.max_length or 40, max(lo, 40)))
    if isinstance(t, i.UnionType):
        return st.one_of(*(valid(x, plain) for x in t.types))
    if isinstance(t, (i.ListType, i.VarTupleType)):
        items = st.lists(valid(t.item_type, plain), max_size=min(t.max_length or 4, 4))
        return items if plain or isinstance(t, i.ListType) else items.map(tuple)
    if isinstance(t, i.TupleType):
        items = st.tuples(*(valid(x, plain) for x in t.item_types))
        return items.map(list) if plain else items
    if isinstance(t, i.DictType):
        return st.dictionaries(valid(t.key_type, plain), valid(t.value_type, plain), max_size=3)
    if isinstance(t, i.StructType):
        fields = st.fixed_dictionaries(struct_fields(t.cls, plain))
        return fields if plain else fields.map(lambda kw: t.cls(**kw))
    raise AssertionError(t)


def struct_fields(cls: type, plain: bool = False) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy for each field of the Struct `cls`."""
    return {f.name: valid(f.type, plain) for f in msgspec.inspect.type_info(cls).fields}


@pytest.mark.parametrize("cls", list(m.MESSAGES.values()), ids=list(m.MESSAGES))
def test_any_valid_message_round_trips_and_is_what_the_dict_protocol_wrote(cls: type) -> None:
    @settings(max_examples=60, deadline=None)
    @given(st.builds(cls, **struct_fields(cls)))
    def round_trip(msg: m.Msg) -> None:
        body = m.encode(msg)
        assert side_of(cls).decode(body) == msg
        assert body == msgpack.packb(as_dict(msg), use_bin_type=True)
        assert msgpack.unpackb(body, raw=False)["t"] == m.tag(cls)
    round_trip()


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from(sorted(m.MESSAGES)),
       side=st.sampled_from([m.HANDSHAKE, m.FROM_NODE, m.FROM_MASTER]),
       fields=st.dictionaries(st.text(max_size=12), values, max_size=8))
def test_anything_is_either_a_fitting_message_or_a_protocol_error(name: str, side: m.Side,
                                                                  fields: dict) -> None:
    cls = m.MESSAGES[name]
    body = msgpack.packb({**{k: None for k in cls.__struct_fields__}, **fields, "t": name})
    try:
        got = side.decode(body)
    except ProtocolError as exc:
        assert str(exc).startswith((name, f"{name!r}")), str(exc)
        return
    assert type(got) is cls and cls in side.classes
    assert side.decode(m.encode(got)) == got


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([m.HANDSHAKE, m.FROM_NODE, m.FROM_MASTER]))
def test_random_payloads_never_raise_anything_but_protocol_errors(body: bytes,
                                                                  side: m.Side) -> None:
    try:
        side.decode(body)
    except ProtocolError:
        pass


def test_the_classes_and_the_module_docstring_list_the_same_messages() -> None:
    doc = m.__doc__ or ""
    listed = set(re.findall(r"(?:node|master)\s+->\s+(?:node|master)\s+(\w+)", doc)) | \
        set(re.findall(r"^\s{22}(\w+)\s{2,}", doc, re.M))
    assert listed == set(m.MESSAGES)


# ---- the master's log of unauthenticated refusals -------------------------------------

def test_refusals_are_logged_burst_lines_a_host_a_window_then_counted(caplog) -> None:
    rl = RefusalLog()
    caplog.set_level("WARNING", logger="bpfs.master")
    for i in range(3 * RefusalLog.BURST):
        rl.warning(f"10.0.0.1:{1000 + i}", 0.0, "refused %s", f"10.0.0.1:{1000 + i}")
    rl.warning("10.0.0.2:5", 1.0, "refused %s", "10.0.0.2:5")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == RefusalLog.BURST + 2
    assert lines[RefusalLog.BURST].startswith("10.0.0.1: more than 10 refusals in 60 s")
    assert lines[-1] == "refused 10.0.0.2:5"
    caplog.clear()
    rl.warning("10.0.0.1:9", RefusalLog.WINDOW + 1, "refused %s", "10.0.0.1:9")
    assert [r.getMessage() for r in caplog.records] == [
        f"refused 10.0.0.1:9 (and {2 * RefusalLog.BURST} more refusals of 10.0.0.1 before "
        "this were not logged)"]


def test_the_refusal_log_remembers_a_bounded_number_of_hosts() -> None:
    rl = RefusalLog()
    for i in range(3 * RefusalLog.HOSTS):
        rl.warning(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:1", 0.0, "x")
    assert len(rl) == RefusalLog.HOSTS


def test_the_rate_log_keys_are_independent_and_a_later_window_tells_the_count(caplog):
    """The one rate limiter both daemons use (bpfs/ratelog.py): per key, per window."""
    caplog.set_level(logging.INFO, logger="bpfs.test")
    rl = RateLog(logging.getLogger("bpfs.test"), logging.INFO, "tries")
    for i in range(RateLog.BURST + 5):
        rl.log("a", 0.0, "a %d", i)
        rl.log("b", 0.0, "b %d", i)
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("a ") for line in lines) == RateLog.BURST
    assert sum(line.startswith("b ") for line in lines) == RateLog.BURST
    assert lines.count(f"a: more than {RateLog.BURST} tries in 60 s; counting the rest "
                       "without a line") == 1
    rl.log("a", RateLog.WINDOW, "a again")
    assert caplog.records[-1].getMessage() == "a again (and 5 more tries of a before this " \
                                               "were not logged)"


def test_an_image_decodes_as_a_view_of_its_frame_not_a_copy() -> None:
    """A small move's image (1 MB) crosses two hops in one message: its `dumped` at the
    master and its `restore` at the target are views of the frame they came in."""
    image = bytes(range(256)) * 4096
    restore = m.Restore(id=1, image=image, uid=0, gid=0, groups=(), io=("null",) * 3,
                        port=1, token=TOKEN)
    for msg, side in ((restore, m.FROM_MASTER), (m.Dumped(id=1, image=image), m.FROM_NODE)):
        body = bytearray(wire.pack(msg)[4:])
        got = side.decode(body)
        assert type(got.image) is memoryview and got.image == image
        assert got.image.obj is body                # the frame itself, no copy of it


def test_a_chunk_split_for_sending_is_the_payload_the_decoder_takes() -> None:
    """encode_split: the head (ending with the data's bin32 header), then the data from
    where it is; together a payload DIRECT decodes to the same chunk."""
    for data in (b"z", b"y" * 300, bytes(range(256)) * 4096):
        msg = m.Chunk(id=9, at=1 << 40, data=memoryview(data))
        head, tail = m.encode_split(msg, "data")
        assert tail.obj is data or bytes(tail) == data
        assert m.DIRECT.decode(head + bytes(tail)) == msg
    with pytest.raises(ValueError):
        m.encode_split(m.Part(id=1, data=b"x", total=3), "data")    # not its last field

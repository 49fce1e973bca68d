"""The message table (bpfs/wire/messages.py): what fits passes as it is, what does not is a
ProtocolError naming the message and the field; and what our own senders build fits.

Pure: no sockets. The same table is checked over real sockets against a real master and a
real node daemon in tests/hostile/test_hostile_peer.py.
"""

from __future__ import annotations

import errno
import logging
import math
import re

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfs.errors import ProtocolError
from bpfs.master.links import RefusalLog
from bpfs.ratelog import RateLog
from bpfs.node import facts as node_facts
from bpfs.wire import framing as wire, messages

FACTS = {"hostname": "n1", "cpus": 2, "arch": "x86_64", "kernel": "6.1.0",
         "load": [0.5, 0.25, 0.0], "mem_total": 2_000_000, "mem_available": 1_000_000,
         "uptime": 42.0}
TOKEN = "0123456789abcdef" * 2

# One message of each kind, as the master and the node send them.
GOOD = [
    ("node", {"t": "hello", "v": 1, "nonce": b"n" * 32}),
    ("master", {"t": "challenge", "v": 1, "nonce": b"n" * 32, "mac": b"m" * 32}),
    ("node", {"t": "auth", "mac": b"m" * 32}),
    ("master", {"t": "ok"}),
    ("master", {"t": "refused", "errno": errno.EBUSY, "message": "node 3 is taken"}),
    ("node", {"t": "register", "node": None, "facts": FACTS}),
    ("node", {"t": "register", "node": 65535, "facts": FACTS}),
    ("master", {"t": "welcome", "node": 3, "heartbeat": 1.0}),
    ("node", {"t": "state", "state": "up"}),
    ("node", {"t": "facts", "facts": node_facts.facts()}),
    ("master", {"t": "ctl", "cmd": "reboot"}),
    ("master", {"t": "restore", "id": 1, "image": b"\0" * 100, "uid": 1000, "gid": 100,
                "groups": [100, 27], "io": ["socket", "null", "file:/tmp/x"], "port": 4000,
                "token": TOKEN, "pid": 4242, "rank": 9_999_999}),
    ("node", {"t": "need", "id": 1, "hashes": ["sha256:" + "0" * 64]}),
    ("master", {"t": "files", "id": 1, "contents": {"sha256:" + "0" * 64: b"\x7fELF"}}),
    ("node", {"t": "restored", "id": 1, "pid": 4242}),
    ("node", {"t": "failed", "id": 1, "errno": errno.ENOENT, "message": "no such file"}),
    ("master", {"t": "signal", "pid": 4242, "sig": 64}),
    ("master", {"t": "signal", "pid": 4242, "sig": 20, "id": 7, "group": True}),
    ("node", {"t": "stopped", "pid": 4242, "sig": 20}),
    ("node", {"t": "continued", "pid": 4242}),
    ("node", {"t": "exited", "pid": 4242, "code": 255, "signal": None}),
    ("node", {"t": "exited", "pid": 4242, "code": None, "signal": 9}),
]


def test_every_message_of_the_table_has_an_example_here():
    assert {m["t"] for _, m in GOOD} == set(messages.MESSAGES)


@pytest.mark.parametrize("sender, msg", GOOD, ids=[f"{m['t']}-{i}" for i, (_, m) in enumerate(GOOD)])
def test_what_fits_passes_unchanged_through_the_wire(sender, msg):
    got = messages.check(wire.unpack(wire.pack(msg)[4:]), sender)
    assert got == {**{k: None for k in messages.MESSAGES[msg["t"]].fields.fields}, **msg}


def test_optional_fields_may_be_absent_and_unknown_fields_are_dropped():
    msg = {"t": "restore", "id": 1, "image": b"", "uid": 0, "gid": 0, "groups": [],
           "io": ["null"] * 3, "port": 0, "token": "", "cwd": "/tmp", 5: "x"}
    got = messages.check(msg, "master")
    assert got["pid"] is None and got["rank"] is None
    assert "cwd" not in got and 5 not in got


def test_numbers_become_floats_and_ints_stay_ints():
    got = messages.check({"t": "facts", "facts": {**FACTS, "load": [1, 2, 3], "uptime": 5}},
                         "node")
    assert got["facts"]["load"] == [1.0, 2.0, 3.0] and type(got["facts"]["uptime"]) is float
    assert type(messages.check({"t": "welcome", "node": 0, "heartbeat": 1}, "master")
                ["heartbeat"]) is float


BAD = [
    ({"t": "auth", "mac": 8_000_000_000}, "node", "auth.mac: expected 32 bytes, got int 8000000000"),
    ({"t": "auth", "mac": 2**63}, "node", "auth.mac: expected 32 bytes, got int 9223372036854775808"),
    ({"t": "auth", "mac": "x" * 32}, "node", "auth.mac: expected 32 bytes, got str of length 32"),
    ({"t": "auth", "mac": [1]}, "node", "auth.mac: expected 32 bytes, got list of length 1"),
    ({"t": "auth", "mac": {}}, "node", "auth.mac: expected 32 bytes, got dict of length 0"),
    ({"t": "auth", "mac": None}, "node", "auth.mac: expected 32 bytes, got nil"),
    ({"t": "auth"}, "node", "auth: missing field 'mac'"),
    ({"t": "hello", "v": True, "nonce": b"n" * 32}, "node", "hello.v: expected an integer"),
    ({"t": "register", "node": 65536, "facts": FACTS}, "node", "register.node: expected an integer in 0..65535"),
    ({"t": "register", "node": "7", "facts": FACTS}, "node", "register.node"),
    ({"t": "register", "node": None, "facts": {**FACTS, "cpus": -1}}, "node", "register.facts.cpus"),
    ({"t": "facts", "facts": {**FACTS, "load": [0.1, math.inf, 0]}}, "node", "facts.facts.load[1]: expected a number"),
    ({"t": "facts", "facts": {k: v for k, v in FACTS.items() if k != "arch"}}, "node",
     "facts.facts: missing field 'arch'"),
    ({"t": "facts", "facts": {**FACTS, "hostname": "h" * 257}}, "node", "facts.facts.hostname: expected a string of at most 256"),
    ({"t": "need", "id": 1, "hashes": ["x"] * 65537}, "node", "need.hashes: expected a list of at most 65536"),
    ({"t": "need", "id": -1, "hashes": []}, "node", "need.id"),
    ({"t": "exited", "pid": 0, "code": 0, "signal": None}, "node", "exited.pid: expected an integer in 1..4194304"),
    ({"t": "exited", "pid": 5, "code": 256, "signal": None}, "node", "exited.code"),
    ({"t": "exited", "pid": 5, "code": 0, "signal": 65}, "node", "exited.signal"),
    ({"t": "failed", "id": 1, "errno": 0, "message": "x"}, "node", "failed.errno"),
    ({"t": "restored", "id": 1.0, "pid": 5}, "node",
     "restored.id: expected an integer in 0..9223372036854775807, got float 1.0"),
    ({"t": "welcome", "node": 1, "heartbeat": 0}, "master", "welcome.heartbeat"),
    ({"t": "welcome", "node": 1, "heartbeat": math.nan}, "master", "welcome.heartbeat"),
    ({"t": "restore", "id": 1, "image": b"", "uid": 0, "gid": 0, "groups": [-1], "io": ["null"] * 3,
      "port": 0, "token": ""}, "master", "restore.groups[0]"),
    ({"t": "restore", "id": 1, "image": b"", "uid": 0, "gid": 0, "groups": [], "io": ["null"] * 2,
      "port": 0, "token": ""}, "master", "restore.io: expected a list of 3 items"),
    ({"t": "restore", "id": 1, "image": "text", "uid": 0, "gid": 0, "groups": [], "io": ["null"] * 3,
      "port": 0, "token": ""}, "master", "restore.image"),
    ({"t": "files", "id": 1, "contents": {b"k": b"v"}}, "master", "files.contents key: expected a string"),
    ({"t": "files", "id": 1, "contents": {"k": "v"}}, "master", "files.contents['k']: expected at most"),
    ({"t": "signal", "pid": 5, "sig": "KILL"}, "master", "signal.sig: expected an integer in 1..64, got str"),
    ({"t": "restore", "id": 1}, "node", "'restore' is the master's message; a node may not send it"),
    ({"t": "restored", "id": 1, "pid": 5}, "master", "'restored' is the node's message"),
    ({"t": "frobnicate"}, "node", "unknown message 'frobnicate'"),
    ({"t": "x" * 1000}, "node", "unknown message 'xxxxxxxx"),
    ({"t": 5}, "node", "not a message map"),
    ([1, 2], "node", "not a message map"),
]


@pytest.mark.parametrize("msg, sender, text", BAD, ids=[b[2][:40] for b in BAD])
def test_what_does_not_fit_names_the_message_and_the_field(msg, sender, text):
    with pytest.raises(ProtocolError) as info:
        messages.check(msg, sender)
    assert info.value.errno == errno.EPROTO
    assert str(info.value).startswith(text) or text in str(info.value), str(info.value)
    assert len(str(info.value)) < 160                # never the peer's data at length


def test_the_decoder_builds_nothing_larger_than_the_table_allows():
    for body in (b"\xdd" + (2**32 - 1).to_bytes(4, "big"),          # an array of 4G items
                 b"\xdf" + (2**32 - 1).to_bytes(4, "big"),          # a map of 4G entries
                 b"\xdd\x00\x01\x00\x01" + b"\xc0" * 65537,            # 65537 nils
                 b"\xc6\xff\xff\xff\xff",                           # a bin of 4 GiB
                 b"\x91" * 5000 + b"\xc0",                          # nested 5000 deep
                 b"\xd7\xff" + b"\0" * 8):                          # an extension type
        with pytest.raises(ProtocolError, match="undecodable"):
            wire.unpack(body)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from(sorted(messages.MESSAGES)), sender=st.sampled_from(["node", "master"]),
       fields=st.dictionaries(st.text(max_size=12), values, max_size=8))
def test_anything_is_either_a_fitting_message_or_a_protocol_error(name, sender, fields):
    schema = messages.MESSAGES[name]
    msg = {**{k: None for k in schema.fields.fields}, **fields, "t": name}
    try:
        got = messages.check(msg, sender)
    except ProtocolError as exc:
        assert str(exc).startswith((name, f"{name!r}"))
        return
    assert schema.sender == sender and set(got) == {"t", *schema.fields.fields}
    assert msgpack.unpackb(msgpack.packb(got), raw=False, strict_map_key=False) == got


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_payloads_never_raise_anything_but_protocol_errors(body):
    try:
        messages.check(wire.unpack(body), "node")
    except ProtocolError:
        pass


def test_the_table_and_the_module_docstring_list_the_same_messages():
    doc = messages.__doc__ or ""
    listed = set(re.findall(r"(?:node|master)\s+->\s+(?:node|master)\s+(\w+)", doc)) | \
        set(re.findall(r"^\s{22}(\w+)\s{2,}", doc, re.M))
    assert listed == set(messages.MESSAGES)


# ---- the master's log of unauthenticated refusals -------------------------------------

def test_refusals_are_logged_burst_lines_a_host_a_window_then_counted(caplog):
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


def test_the_refusal_log_remembers_a_bounded_number_of_hosts():
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

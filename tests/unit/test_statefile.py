"""The master's state file: round trip, atomic replace, corrupt files refused."""

from __future__ import annotations

import errno
import json
import os

import pytest
from hypothesis import given, strategies as st

from bpfs.errors import BpfsError
from bpfs.master import statefile
from bpfs.model import SavedNode

saved_nodes = st.lists(
    st.builds(SavedNode, st.integers(0, 65535), st.sampled_from([0, 0o1, 0o10, 0o100, 0o111, 0o101]),
              st.integers(0, 2**32 - 2), st.integers(0, 2**32 - 2),
              st.sampled_from([None, "unavailable", "error"])),
    unique_by=lambda n: n.number, max_size=20)


@given(saved_nodes)
def test_round_trip(nodes):
    assert statefile.loads(statefile.dumps(nodes)) == nodes


def test_save_load_and_missing(tmp_path):
    path = str(tmp_path / "sub" / "state")
    assert statefile.load(path) is None
    nodes = [SavedNode(0), SavedNode(3, 0o100, 1000, 100, "error")]
    statefile.save(path, nodes)
    assert statefile.load(path) == nodes
    assert os.stat(path).st_mode & 0o777 == 0o600
    statefile.save(path, nodes[:1])
    assert statefile.load(path) == nodes[:1]
    assert os.listdir(tmp_path / "sub") == ["state"]     # no temp file left


GOOD = {"format": "bpfs-state", "version": 1,
        "nodes": [{"number": 0, "mode": "0111", "uid": 0, "gid": 0, "admin": None}]}


def variant(**node) -> str:
    doc = json.loads(json.dumps(GOOD))
    doc["nodes"][0].update(node)
    return json.dumps(doc)


@pytest.mark.parametrize("text, needle", [
    ("", "not JSON"),
    ("{\"format\": \"bpfs-state\", \"version\": 1, \"nodes\": [", "not JSON"),
    ("[]", "not a bpfs-state file"),
    (json.dumps({**GOOD, "version": 99}), "version"),
    (json.dumps({**GOOD, "nodes": {}}), "not a list"),
    (variant(number=-1), "number"),
    (variant(number="3"), "number"),
    (variant(mode="0755"), "bits other than x"),
    (variant(mode="rwx"), "mode"),
    (variant(uid=None), "uid"),
    (variant(admin="down"), "admin"),
    (json.dumps({**GOOD, "nodes": GOOD["nodes"] * 2}), "twice"),
])
def test_corrupt_file_is_refused_with_a_clear_message(tmp_path, text, needle):
    path = tmp_path / "state"
    path.write_text(text)
    with pytest.raises(BpfsError) as info:
        statefile.load(str(path))
    assert info.value.errno == errno.EINVAL
    assert str(path) in info.value.message and needle in info.value.message


def test_binary_garbage_is_refused(tmp_path):
    path = tmp_path / "state"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BpfsError) as info:
        statefile.load(str(path))
    assert str(path) in info.value.message

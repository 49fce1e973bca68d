"""bpcp against a fake $MOUNT and the fake node of bpsh_fake (remote = here, in place)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bpfs.cli import bpcp
from tests.unit.bpsh_fake import Runner, mount  # noqa: F401  (fixture)


@pytest.fixture
def cp(tmp_path: Path, mount: Path) -> Runner:  # noqa: F811
    return Runner(tmp_path, mount)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_bytes(b"alpha\n")
    (d / "sub" / "b").write_bytes(os.urandom(3 << 20))
    os.chmod(d / "a", 0o750)
    os.utime(d / "a", (978307200, 978307200))
    return d


@pytest.mark.parametrize("word, split", [
    ("3:/tmp/x", ("3", "/tmp/x")), ("n3:x", ("n3", "x")), ("./a:b", (None, "./a:b")),
    ("/abs", (None, "/abs")), ("2:", ("2", ".")), ("plain", (None, "plain")),
])
def test_split_place(word, split):
    assert bpcp.split_place(word) == split


def test_to_node_and_back(cp, tmp_path, tree):
    data = (tree / "sub" / "b").read_bytes()
    r = cp(str(tree / "sub" / "b"), f"1:{tmp_path}/copy", prog="bpcp")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "copy").read_bytes() == data
    r = cp(f"2:{tmp_path}/copy", str(tmp_path / "back"), prog="bpcp")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back").read_bytes() == data


def test_into_a_remote_directory_and_preserve(cp, tmp_path, tree):
    (tmp_path / "dir").mkdir()
    r = cp("-p", str(tree / "a"), f"1:{tmp_path}/dir", prog="bpcp")
    assert r.returncode == 0, r.stderr
    st = os.stat(tmp_path / "dir" / "a")
    assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o750, 978307200)
    r = cp(str(tree / "a"), f"1:{tmp_path}/plain", prog="bpcp")
    assert int(os.stat(tmp_path / "plain").st_mtime) != 978307200


def test_recursive_both_ways_and_node_to_node(cp, tmp_path, tree):
    assert cp("-rp", str(tree), f"1:{tmp_path}/t1", prog="bpcp").returncode == 0
    assert (tmp_path / "t1" / "sub" / "b").read_bytes() == (tree / "sub" / "b").read_bytes()
    assert cp("-r", "-p", f"1:{tmp_path}/t1", str(tmp_path / "t2"), prog="bpcp").returncode == 0
    assert (tmp_path / "t2" / "a").read_bytes() == b"alpha\n"
    assert int(os.stat(tmp_path / "t2" / "a").st_mtime) == 978307200
    r = cp("-r", f"1:{tmp_path}/t2", f"2:{tmp_path}/t3", prog="bpcp")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t3" / "sub" / "b").read_bytes() == (tree / "sub" / "b").read_bytes()


def test_directory_needs_r(cp, tmp_path, tree):
    r = cp(str(tree), f"1:{tmp_path}/x", prog="bpcp")
    assert r.returncode == 1 and r.stderr == f"bpcp: {tree}: not a regular file\n".encode()
    r = cp(f"1:{tree}", str(tmp_path / "y"), prog="bpcp")
    assert r.returncode == 1 and b"not a regular file" in r.stderr


def test_several_sources_into_a_directory(cp, tmp_path, tree):
    (tmp_path / "many").mkdir()
    r = cp(str(tree / "a"), str(tree / "sub" / "b"), f"3:{tmp_path}/many", prog="bpcp")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "many")) == ["a", "b"]


def test_errors(cp, tmp_path):
    r = cp(str(tmp_path / "missing"), f"1:{tmp_path}/x", prog="bpcp")
    assert (r.returncode, r.stderr) == (1, f"bpcp: {tmp_path}/missing: No such file or "
                                           f"directory\n".encode())
    r = cp(f"1:{tmp_path}/missing", str(tmp_path / "x"), prog="bpcp")
    assert r.returncode == 1 and b"No such file or directory" in r.stderr
    r = cp(str(tmp_path), f"9:{tmp_path}/x", "-r", prog="bpcp")
    assert r.returncode == 1 and r.stderr == b"9: No such device\n"
    r = cp("x", prog="bpcp")
    assert r.returncode == 2
    r = cp("bad:x", "y", prog="bpcp")
    assert (r.returncode, r.stderr) == (1, b"bpcp: Invalid node number: bad\n")

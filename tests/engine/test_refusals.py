"""Credentials on the node, refused executables and images, libraries that differ on the node,
and the seize-at-execve path the bpsh issue uses."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
from typing import Iterator

import pytest

from bpfs.errors import BpfsError
from bpfs.migrate import dump, image
from bpfs.migrate.loopnode import LoopNode
from tests.engine.support import ENV, local, migrate, migrate_image, seized_at_exec

pytestmark = pytest.mark.timeout(60)


def _dumped(argv: list[str]) -> image.Image:
    pid = dump.launch(argv, ENV, "/")
    try:
        return dump.dump(pid)
    finally:
        dump.kill(pid)


def test_user_runs_as_that_user(node, users) -> None:
    alice = users["alice"]
    got = migrate(node, ["/usr/bin/id"], uid=alice.uid, gid=alice.gid, groups=alice.groups)
    ref = local(["/usr/bin/id"], user=alice)
    assert got.triple() == ref.triple()
    assert f"uid={alice.uid}(".encode() in got.stdout
    got = migrate(node, ["/bin/sh", "-c", "cat /proc/self/status | grep -E '^(Cap|Uid|Gid)'"],
                  uid=alice.uid, gid=alice.gid, groups=alice.groups)
    assert b"CapEff:\t0000000000000000" in got.stdout
    assert f"Uid:\t{alice.uid}\t{alice.uid}\t{alice.uid}\t{alice.uid}".encode() in got.stdout


def test_user_cwd_falls_back_when_not_accessible(node, users, tmp_path) -> None:
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    bob = users["bob"]
    got = migrate(node, ["/bin/pwd"], cwd=str(d), uid=bob.uid, gid=bob.gid, groups=bob.groups)
    assert got.stdout == b"/\n"


@pytest.fixture
def setid_copies(tmp_path) -> Iterator[dict[str, str]]:
    os.chmod(tmp_path, 0o755)
    out = {}
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755)):
        p = tmp_path / name
        shutil.copy("/usr/bin/true", p)
        os.chmod(p, mode)
        out[name] = str(p)
    p = tmp_path / "fcap"
    shutil.copy("/usr/bin/true", p)
    if shutil.which("setcap") and subprocess.run(["setcap", "cap_net_raw+ep", str(p)]).returncode == 0:
        out["fcap"] = str(p)
    yield out


@pytest.mark.parametrize("kind", ["suid", "sgid", "fcap"])
def test_setid_and_file_caps_refused(setid_copies, kind) -> None:
    if kind not in setid_copies:
        pytest.skip("setcap is not available")
    with pytest.raises(BpfsError) as info:
        _dumped([setid_copies[kind]])
    assert info.value.errno == errno.EPERM
    assert "cannot migrate" in info.value.message


def test_node_refuses_setid_file_too(node, tmp_path) -> None:
    """The node checks the file it would map as the executable, not only the master."""
    os.chmod(tmp_path, 0o755)
    prog = tmp_path / "later-suid"
    shutil.copy("/usr/bin/true", prog)
    img = _dumped([str(prog)])
    os.chmod(prog, 0o4755)  # same content, so the node's file is used by reference
    with pytest.raises(BpfsError) as info:
        migrate_image(node, image.dumps(img), img)
    assert info.value.errno == errno.EPERM


def test_corrupt_image_refused(node) -> None:
    img = _dumped(["/bin/true"])
    data = image.dumps(img)
    bad = [data[:len(data) // 2], b"\x00" + data[1:], data.replace(b"bpfs-image", b"bpfs-imagf")]
    overlapping = dataclasses.replace(img, regions=img.regions + [img.regions[0]])
    bad.append(image.dumps(overlapping))
    for b in bad:
        with pytest.raises(BpfsError) as info:
            migrate_image(node, b, img)
        assert info.value.errno == errno.EINVAL
        assert "corrupt image" in info.value.message
    # the node still works afterwards, and the PID was never taken
    assert migrate_image(node, data, img).code == 0


def test_kernel_or_cpu_mismatch_refused(node) -> None:
    img = _dumped(["/bin/true"])
    for host, code in ((dataclasses.replace(img.host, kernel="Linux 2.6.9 bproc"), errno.ENOEXEC),
                       (dataclasses.replace(img.host, cpu_flags=img.host.cpu_flags + ["qpu"]),
                        errno.EOPNOTSUPP)):
        other = dataclasses.replace(img, host=host)
        with pytest.raises(BpfsError) as info:
            migrate_image(node, image.dumps(other), other)
        assert info.value.errno == code


def test_pid_taken(node) -> None:
    img = dataclasses.replace(_dumped(["/bin/true"]), pid=1)
    with pytest.raises(BpfsError) as info:
        migrate_image(node, image.dumps(img), img)
    assert info.value.errno == errno.EEXIST


@pytest.fixture(scope="module")
def greet(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A program linked to libgreet.so, and a different libgreet.so for the node."""
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc is not available")
    d = tmp_path_factory.mktemp("greet")
    os.chmod(d, 0o755)
    (d / "lib").mkdir()
    (d / "node").mkdir()
    for where, word in (("lib", "master"), ("node", "node")):
        src = d / f"{where}.c"
        src.write_text(f'#include <stdio.h>\nvoid greet(void) {{ puts("{word} library"); }}\n')
        subprocess.run([gcc, "-shared", "-fPIC", str(src), "-o", str(d / where / "libgreet.so")],
                       check=True)
    main = d / "main.c"
    main.write_text("void greet(void);\nint main(void) { greet(); return 0; }\n")
    subprocess.run([gcc, str(main), "-o", str(d / "greet"), f"-L{d / 'lib'}", "-lgreet",
                    f"-Wl,-rpath,{d / 'lib'}"], check=True)
    yield {"prog": str(d / "greet"), "lib": str(d / "lib" / "libgreet.so"),
           "node_lib": str(d / "node" / "libgreet.so")}


def test_changed_library_is_sent_by_content(greet, tmp_path) -> None:
    argv = [greet["prog"]]
    with LoopNode(str(tmp_path / "cache")) as node:
        node.bind(greet["node_lib"], greet["lib"])  # the node's copy differs after the dump
        img = _dumped(argv)
        data = image.dumps(img)
        lib = next(f for f in img.files if f.path == greet["lib"])
        assert node.missing(data) == [lib.hash]
        with pytest.raises(BpfsError) as info:  # never run with the node's library
            migrate_image(node, data, img)
        assert info.value.errno == errno.ENOENT
        got = migrate_image(node, data, img, contents=dump.read_contents(img, [lib.hash]))
        assert got.stdout == b"master library\n"
        ghost = dump.launch(argv, ENV, "/")  # the file replaced on the master after the dump:
        try:                                 # read it through the ghost's mapping
            img3 = dump.dump(ghost)
            saved = greet["lib"] + ".saved"
            os.rename(greet["lib"], saved)
            shutil.copy(greet["node_lib"], greet["lib"])
            try:
                with pytest.raises(BpfsError) as info:
                    dump.read_contents(img3, [lib.hash])
                assert info.value.errno == errno.ESTALE
                assert dump.read_contents(img3, [lib.hash], pid=ghost) == {
                    lib.hash: open(saved, "rb").read()}
            finally:
                os.replace(saved, greet["lib"])
        finally:
            dump.kill(ghost)
        img2 = _dumped(argv)  # the second migration sends references only
        assert node.missing(image.dumps(img2)) == []
        assert migrate_image(node, image.dumps(img2), img2).stdout == b"master library\n"


def test_seized_at_execve(node) -> None:
    """A child that execs by itself (bpsh's case) is caught at its exec, dumped, left stopped."""
    with seized_at_exec(["/bin/echo", "seized"]) as (pid, img):
        assert img.pid == pid and img.argv == ["/bin/echo", "seized"]
        with open(f"/proc/{pid}/stat") as f:  # the ghost stays, stopped
            assert f.read().rsplit(")", 1)[1].split()[0] == "t"
        got = migrate_image(node, image.dumps(img), img)
        assert got.triple() == (b"seized\n", b"", 0)


def test_seized_without_exec_times_out() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            signal.pause()
        finally:
            os._exit(0)
    try:
        dump.seize_for_exec(pid)
        with pytest.raises(BpfsError) as info:
            dump.wait_exec_and_dump(pid, timeout=0.2)
        assert info.value.errno == errno.ETIMEDOUT
    finally:
        dump.kill(pid)

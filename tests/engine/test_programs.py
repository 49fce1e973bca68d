"""Real programs migrated between two processes of this machine, the restoring side in its own
PID + mount namespaces, compared byte for byte (stdout, stderr, exit status) with a local run
in the same kind of namespaces."""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from typing import Iterator

import pytest

from bpfs.migrate.loopnode import LoopNode
from tests.engine.support import ENV, local, migrate

pytestmark = pytest.mark.timeout(60)

VENV_PY = sys.executable  # the interpreter running the tests, whichever venv it is


@pytest.fixture(scope="module")
def text_file() -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="bpfs-input-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        for i in range(2000):
            f.write(f"line {(i * 7919) % 2000:05d} of the input, word{i % 13}\n")
    os.chmod(path, 0o644)
    try:
        yield path
    finally:
        os.unlink(path)


SIMPLE = [
    ["/bin/true"],
    ["/bin/false"],
    ["/bin/echo", "hello", "world"],
    ["/bin/ls", "-la", "/usr"],
    ["/bin/df", "-h"],
    ["/bin/date", "-u", "-d", "@0"],
    ["/bin/bash", "-c", "for i in 1 2 3 4 5; do echo \"n=$i\"; done; exit 7"],
    ["/bin/sh", "-c", "echo abc | tr a-z A-Z | rev; ls /nonexistent; exit 3"],
    ["/usr/bin/perl", "-e", "print join(',', map { $_ * $_ } 1..10), qq(\\n); warn qq(w\\n)"],
    ["/usr/bin/python3", "-c", "import sys, json; print(json.dumps({'a': [1, 2]})); "
                               "print('err', file=sys.stderr); sys.exit(5)"],
    [VENV_PY, "-c", "import sys, msgpack; print(sys.prefix, msgpack.packb([1]))"],
]


@pytest.mark.parametrize("argv", SIMPLE, ids=lambda a: " ".join(a)[:40])
def test_same_as_local(node, argv) -> None:
    """Byte for byte; `df` may race with other mounts on this machine, hence before/after."""
    before, got = local(argv), migrate(node, argv)
    assert got.triple() == before.triple() or got.triple() == local(argv).triple()


@pytest.mark.parametrize("prog", [["/bin/cat"], ["/usr/bin/wc"], ["/usr/bin/sort"],
                                  ["/usr/bin/sha256sum"]], ids=lambda a: a[0])
def test_filters_on_a_file(node, text_file, prog) -> None:
    for argv, stdin in ((prog + [text_file], "/dev/null"), (prog, text_file)):
        got = migrate(node, argv, stdin=stdin)
        assert got.triple() == local(argv, stdin=stdin).triple()
        assert got.code == 0 and got.stdout


def test_ls_root(node) -> None:
    """`ls -la /`: equal except the /proc line (each PID namespace mounts its own /proc, whose
    link count also sets the column width, so runs of spaces are compared as one).

    Other users of this machine change /tmp's time now and then, so the migrated output must
    equal a local run made just before or just after it.
    """
    argv = ["/bin/ls", "-la", "/"]
    strip = lambda r: (re.sub(rb" +", b" ", re.sub(rb"\n[^\n]* proc\n", b"\n", r.stdout)),  # noqa
                       r.stderr, r.code)
    before, got, after = local(argv), migrate(node, argv), local(argv)
    diff = "".join(difflib.unified_diff(before.stdout.decode().splitlines(True),
                                        got.stdout.decode().splitlines(True)))
    assert strip(got) in (strip(before), strip(after)), diff


def test_shell_pid_is_the_masters(node) -> None:
    got = migrate(node, ["/bin/sh", "-c", "echo $$; echo x | cat; sh -c 'echo $PPID'"])
    assert got.code == 0
    assert got.stdout == f"{got.pid}\nx\n{got.pid}\n".encode()


def test_cwd_kept_or_root(node, tmp_path) -> None:
    assert migrate(node, ["/bin/pwd"], cwd="/usr/share").stdout == b"/usr/share\n"
    d = tmp_path / "only-on-master"
    d.mkdir()
    with LoopNode() as other:
        other.bind("/var/empty" if os.path.isdir("/var/empty") else "/usr/share", str(tmp_path))
        assert migrate(other, ["/bin/pwd"], cwd=str(d)).stdout == b"/\n"


def test_environment_is_the_images(node) -> None:
    env = dict(ENV, BPROC_RANK="0000003", ODD="a b\tc")
    got = migrate(node, ["/usr/bin/env"], env=env)
    assert got.stdout == "".join(f"{k}={v}\n" for k, v in env.items()).encode()


def test_rlimits_travel(node) -> None:
    import resource
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (321, old[1]))
    try:
        got = migrate(node, ["/bin/sh", "-c", "ulimit -n"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    assert got.stdout == b"321\n"


def test_signal_dispositions_reset_and_fds_closed(node) -> None:
    """The master's ignored signals and open fds do not leak into the job."""
    import signal
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = os.open("/dev/null", os.O_RDONLY)  # inheritable
    os.set_inheritable(fd, True)
    try:
        got = migrate(node, ["/bin/sh", "-c", "grep SigIgn /proc/self/status; ls /proc/self/fd"])
    finally:
        os.close(fd)
        signal.signal(signal.SIGINT, old)
    assert got.stdout == b"SigIgn:\t0000000000000000\n0\n1\n2\n3\n"

"""bprsh's command line: ssh's and rsh's grammar, as launchers write it (no master needed)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from bpfs.cli.bpsh import rsh
from tests.unit.test_startup import ROOT


@pytest.mark.parametrize("argv, host, command", [
    (["n0", " orted", "-mca", "ess", '"env"'], "n0", ' orted -mca ess "env"'),       # Open MPI
    (["-x", "n1", '"/usr/bin/hydra_pmi_proxy"', "--control-port", "vm:1"], "n1",   # hydra
     '"/usr/bin/hydra_pmi_proxy" --control-port vm:1'),
    (["-T", "-q", "-o", "BatchMode=yes", "-oFoo=bar", "-p", "22", "-i", "k", "-F", "f",
      "-4", "-6", "-A", "-a", ".2", "ls", "-la"], ".2", "ls -la"),
    (["5", "-x", "-t", "echo", "-n", "hi"], "5", "echo -n hi"),                     # options after HOST
    (["-xT", "-p22", "master", "true"], "master", "true"),
    (["--", "n3", "-weird"], "n3", "-weird"),
])
def test_host_and_one_command_line(argv, host, command):
    args = rsh.parse_rsh(argv)
    assert (args.host, args.command) == (host, command)


def test_user_forms_and_stdin():
    assert rsh.parse_rsh(["alice@n1", "true"]).user == "alice"
    assert rsh.parse_rsh(["-l", "bob", "n1", "true"]).user == "bob"
    assert rsh.parse_rsh(["-oUser=carol", "n1", "true"]).user == "carol"
    assert rsh.parse_rsh(["-o", "User bob", "n1", "true"]).user == "bob"
    assert rsh.parse_rsh(["-n", "n1", "cat"]).stdin_null
    assert not rsh.parse_rsh(["n1", "cat", "-n"]).stdin_null


@pytest.mark.parametrize("argv, usage", [
    (["-L", "80:h:80", "n1", "true"], False), (["-N", "n1"], False), (["-f", "n1", "x"], False),
    (["-Z", "n1", "x"], True), (["n1", "-p"], True), (["--bogus", "n1", "x"], True),
])
def test_refusals(argv, usage):
    with pytest.raises(rsh.RshError) as e:
        rsh.parse_rsh(argv)
    assert isinstance(e.value, rsh.RshUsageError) == usage


def test_another_user_is_refused():
    me = pwd.getpwuid(os.getuid()).pw_name
    rsh.check_user(me)
    other = next(p.pw_name for p in pwd.getpwall() if p.pw_uid != os.getuid())
    with pytest.raises(rsh.RshError, match="run bprsh as"):
        rsh.check_user(other)


@pytest.mark.parametrize("argv, status, text", [
    (["--help"], 0, "usage: bprsh"), (["-V"], 0, "bprsh version"),
    (["-Z", "n1", "x"], 255, "invalid option"), (["n1"], 255, "no command given"),
    (["-L", "1:h:1", "n1", "x"], 255, "-L (port forwarding) is not supported"),
])
def test_exit_statuses(argv, status, text):
    r = subprocess.run([str(ROOT / "bin" / "bprsh"), *argv], capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, BPFS_PYTHON=sys.executable,
                                            BPROC_MOUNT="/nonexistent"))
    assert r.returncode == status and text in r.stdout + r.stderr, r


def test_a_local_host_runs_here():
    r = subprocess.run([str(ROOT / "bin" / "bprsh"), "localhost", "echo", "$((1+2))"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, BPFS_PYTHON=sys.executable))
    assert (r.returncode, r.stdout) == (0, "3\n"), r

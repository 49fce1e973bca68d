"""bpsh's start-up diet: what it must not import, and the small replacements that allow it.

Every bpsh run pays Python's start-up, and imports were more than half of it: `socket`,
`signal` and `selectors` (with `enum`, `functools`, `collections`), `re` and `shlex`,
`typing`, `dataclasses`. bpsh uses the C modules (`_socket`, `_signal`, `select.poll`)
and a hand-written quote and token check instead. These tests fail when such an import
comes back on bpsh's path, and check that each replacement agrees with what it replaces.
"""

from __future__ import annotations

import ast
import os
import re
import selectors
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from bpfs import nodeset
from bpfs.cli.bpsh import args as bpsh
from bpfs.cli.bpsh.poller import EVENT_READ, EVENT_WRITE, Poller
from bpfs.wire import execreq
from tests.unit.bpsh_fake import FAKE_NODE, mount  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# Never on bpsh's path: each costs from 0.3 to 4 ms of every run (with what it imports).
HEAVY = ("socket", "signal", "selectors", "enum", "functools", "collections", "re",
         "shlex", "typing", "dataclasses", "inspect", "ast", "struct", "click", "trio")
# Only for a NODESPEC that is not plain node numbers.
FOR_NODESPECS = ("bpfs.nodeset", "bpfs.formats")

# Run as the installed launcher runs it (python -I -S, the checkout first on sys.path);
# write the modules imported meanwhile, one a line, to argv[1].
PROBE = """
import sys
sys.path.insert(0, {root!r})
before = set(sys.modules)
import bpfs.cli.bpsh as b
report, argv = sys.argv[1], sys.argv[2:]
code = 0
if argv:
    b.EXEC_PREFIX[:] = [{py!r}, {fake!r}]
    code = b.main(argv)
with open(report, "w") as f:
    f.write("\\n".join(sorted(set(sys.modules) - before)))
sys.exit(code)
"""


def _imports(tmp_path: Path, *argv: str, env: dict | None = None) -> set[str]:
    fake = tmp_path / "fake_node.py"
    fake.write_text(FAKE_NODE)
    script, report = tmp_path / "probe.py", tmp_path / "imported"
    script.write_text(PROBE.format(root=str(ROOT), py=PY, fake=str(fake)))
    r = subprocess.run([PY, "-I", "-S", str(script), str(report), *argv], input=b"",
                       capture_output=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))
    assert r.returncode == 0, r.stderr
    return set(report.read_text().split())


def test_import_of_bpsh_is_light(tmp_path):
    imported = _imports(tmp_path)
    assert "bpfs.cli.bpsh" in imported
    assert imported.isdisjoint(HEAVY + FOR_NODESPECS), sorted(imported & {*HEAVY,
                                                                          *FOR_NODESPECS})


@pytest.mark.parametrize("argv", [["0", "true"], ["-p", "0,1", "echo", "hi"],
                                  ["-1", "true"], ["-n", "n2", "true"]])
def test_a_run_on_plain_node_numbers_stays_light(tmp_path, mount, argv):  # noqa: F811
    imported = _imports(tmp_path, *argv, env={"FAKE_MOUNT": str(mount),
                                              "BPROC_MOUNT": str(mount)})
    assert imported.isdisjoint(HEAVY + FOR_NODESPECS), sorted(imported & {*HEAVY,
                                                                          *FOR_NODESPECS})


def test_a_run_on_a_node_state_reads_the_node_list_still_light(tmp_path, mount):  # noqa: F811
    imported = _imports(tmp_path, "allup", "true", env={"FAKE_MOUNT": str(mount),
                                                        "BPROC_MOUNT": str(mount)})
    assert "bpfs.nodeset" in imported
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_a_multi_node_request_on_plain_numbers_stays_light(tmp_path):
    """The --nodes list is rendered by nodeset.compact (one grammar with NODESPEC), which
    costs bpsh nodeset itself (~0.3 ms) but not bpfs.formats nor anything heavy."""
    script = tmp_path / "probe.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import bpfs.cli.bpsh
before = set(sys.modules)
line = bpfs.wire.execreq.ExecMove(1, "a" * 32, 0, nodes=(0, 1, 2, 3, 7)).render()
assert line.endswith(" --nodes 0-3,7\\n"), line
print("\\n".join(sorted(set(sys.modules) - before)))
""")
    r = subprocess.run([PY, "-I", "-S", str(script)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["bpfs.nodeset"]


def test_checkout_launcher_runs_isolated():
    r = subprocess.run([str(ROOT / "bin" / "bpsh"), "--version"], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, BPFS_PYTHON=PY))
    assert r.returncode == 0 and r.stdout.startswith("bpsh version"), r.stderr


def test_bootstrap_writes_an_isolated_launcher(tmp_path):
    """bootstrap's write_bpsh_launcher, run on its own against this venv."""
    text = (ROOT / "bootstrap").read_text()
    func = text[text.index("write_bpsh_launcher() {"):]
    func = func[:func.index("\n}\n") + 3]
    target = tmp_path / "bpsh"
    subprocess.run(["sh", "-c", f'{func}\nwrite_bpsh_launcher "$1"', "sh", str(target)],
                   check=True, env=dict(os.environ, VENV=sys.prefix), timeout=30)
    lines = target.read_text().splitlines()
    assert lines[0] == f"#!{sys.prefix}/bin/python3 -ISOO"
    assert os.access(target, os.X_OK)
    site = ast.literal_eval(lines[3][len("sys.path.append("):-1])
    if not (Path(site) / "bpfs" / "cli" / "bpsh" / "__init__.py").exists():
        pytest.skip("bpfs is not installed in this venv")
    opt2 = Path(site) / "bpfs" / "cli" / "bpsh" / "__pycache__" / \
        f"__init__.{sys.implementation.cache_tag}.opt-2.pyc"
    assert opt2.exists(), "bootstrap compiles the -OO bytecode the launcher loads"
    r = subprocess.run([str(target), "--version"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("bpsh version"), r.stderr


# ---- the replacements agree with what they replace -----------------------------------

@given(st.text(max_size=20) | st.text(alphabet="ab'\" $-_@%+=:,./\\\n\t", max_size=12))
def test_quote_is_shlex_quote(word):
    assert execreq.quote(word) == shlex.quote(word)


def test_rendered_request_splits_back():
    req = execreq.ExecMove(4242, "ab" * 16, 0, "file:/tmp/it's here", "null", "socket",
                           nodes=(3, 1, 3))
    line = req.render()
    assert line == shlex.join(shlex.split(line)) + "\n"
    assert execreq.parse_execmove(execreq.split_ctl_words(line)[1:]) == req


_TOKEN = re.compile(r"[0-9a-f]{32}")


@given(st.text(alphabet="0123456789abcdefABCDEFg \n", min_size=30, max_size=34)
       | st.text(max_size=40))
def test_is_token_is_the_token_pattern(text):
    assert execreq.is_token(text) == bool(_TOKEN.fullmatch(text))


@given(st.text(alphabet="0123456789n.,-!amsterlupdow٣", max_size=12))
def test_plain_numbers_are_nodeset_only_numbers(text):
    assert bpsh.MASTER == nodeset.MASTER
    try:
        spec = nodeset.parse(text)
    except ValueError:
        spec = None
    if spec is not None and spec.only_numbers:
        assert bpsh._plain_numbers(text) == spec.resolve([], keep_unknown=True)
    else:
        assert bpsh._plain_numbers(text) is None


def _both(scenario):
    """Run `scenario(selector)` on selectors.PollSelector and on poller.Poller: same answers."""
    got = []
    for make in (selectors.PollSelector, Poller):
        a, b = socket.socketpair()
        sel = make()
        try:
            got.append(scenario(sel, a, b))
        finally:
            sel.close()
            a.close()
            b.close()
    assert got[0] == got[1]
    return got[1]


def _events(sel, timeout=0):
    ready = sel.select(timeout)
    if isinstance(sel, selectors.PollSelector):
        return sorted((key.data, ev) for key, ev in ready)
    return sorted(ready)


def test_poller_is_poll_selector():
    def ready(sel, a, b):
        sel.register(a, EVENT_READ | EVENT_WRITE, "a")
        sel.register(b.fileno(), EVENT_READ, "b")
        first = _events(sel)                            # a writable, b nothing
        a.send(b"x")
        second = _events(sel)                           # b readable too
        sel.modify(a, EVENT_READ, "a2")
        b.close()                                       # a: hang-up, b: closed fd
        third = _events(sel)
        return first, second, third

    first, second, third = _both(ready)
    assert first == [("a", EVENT_WRITE)]
    assert second == [("a", EVENT_WRITE), ("b", EVENT_READ)]
    assert ("a2", EVENT_READ) in third

    def errors(sel, a, b):
        out = []
        sel.register(a, EVENT_READ, None)
        for call in (lambda: sel.register(a, EVENT_READ, None),
                     lambda: sel.unregister(b),
                     lambda: sel.register(b, 0, None),
                     lambda: sel.register(b, 4, None)):
            try:
                call()
                out.append(None)
            except (KeyError, ValueError) as e:
                out.append(type(e))
        a.close()
        sel.unregister(a)                               # closed: found by identity
        out.append(_events(sel))
        return out

    assert _both(errors) == [KeyError, KeyError, ValueError, ValueError, []]


def test_bprsh_is_as_light_as_bpsh(tmp_path):
    """bprsh (bpfs.cli.bpsh.rsh) runs for every daemon a launcher starts: bpsh's diet too."""
    script = tmp_path / "probe.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
before = set(sys.modules)
import bpfs.cli.bpsh.rsh as r
r.parse_rsh(["-x", "-oBatchMode=yes", "n1", " orted", "-mca", "ess", '"env"'])
print("\\n".join(sorted(set(sys.modules) - before)))
""")
    r = subprocess.run([PY, "-I", "-S", str(script)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    imported = set(r.stdout.split())
    assert imported.isdisjoint(HEAVY + FOR_NODESPECS), sorted(imported & {*HEAVY,
                                                                          *FOR_NODESPECS})


def test_bootstrap_writes_the_bprsh_launcher_the_same_way(tmp_path):
    """write_bpsh_launcher TARGET bpfs.cli.bpsh.rsh: bprsh's launcher, as lean as bpsh's."""
    text = (ROOT / "bootstrap").read_text()
    func = text[text.index("write_bpsh_launcher() {"):]
    func = func[:func.index("\n}\n") + 3]
    target = tmp_path / "bprsh"
    subprocess.run(["sh", "-c", f'{func}\nwrite_bpsh_launcher "$1" bpfs.cli.bpsh.rsh', "sh",
                    str(target)], check=True, env=dict(os.environ, VENV=sys.prefix), timeout=30)
    lines = target.read_text().splitlines()
    assert lines[0] == f"#!{sys.prefix}/bin/python3 -ISOO"
    assert lines[4] == "from bpfs.cli.bpsh.rsh import console"
    site = ast.literal_eval(lines[3][len("sys.path.append("):-1])
    if not (Path(site) / "bpfs" / "cli" / "bpsh" / "rsh.py").exists():
        pytest.skip("this venv's bpfs has no bprsh yet (./bootstrap install puts it there)")
    r = subprocess.run([str(target), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("bprsh version"), r.stderr

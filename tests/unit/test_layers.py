"""The import contracts of pyproject.toml ([tool.importlinter]: layers, no circles, who may
speak FUSE and the wire's encodings, bpsh's lean start-up), checked by import-linter on the
checkout itself, not on the conftest copy: the contract is about the source tree. Beside
them, every module has a layer and none is over 600 lines. docs/architecture.md explains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.mark.timeout(60)
def test_every_import_contract_is_kept():
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_every_module_of_bpfs_has_a_layer():
    """A new module or package in bpfs/ is placed in the layers contract, else nothing
    would check what it imports or who imports it."""
    import pkgutil
    import tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    named = {name.strip().strip("()") for layer in layers for name in layer.split("|")}
    present = {f"bpfs.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "bpfs")])}
    assert present - named == set()


def test_no_module_is_over_600_lines():
    """Small modules with names that say what they hold: a module that grows past 600 lines
    is split by concern (docs/architecture.md), its design text moved to docs/."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in (ROOT / "bpfs").rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > 600} == {}

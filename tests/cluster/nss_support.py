"""The NSS module of this checkout, installed the way `./bootstrap install` installs it.

`install_nss` runs bootstrap's own install_nss function (extracted from the script, as
tests/unit/test_startup.py does for the launcher) on nss/libnss_bproc.c of this checkout:
built into the system's library directory and `bproc` added to the hosts line of
/etc/nsswitch.conf, once. So a fresh clone's `./bootstrap test` tests the module it has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bootstrap_function(name: str) -> str:
    text = (ROOT / "bootstrap").read_text()
    func = text[text.index(f"{name}() {{"):]
    return func[:func.index("\n}\n") + 3]


def install_nss() -> None:
    """Build and install the checkout's libnss_bproc.so.2 (skip if it cannot be built)."""
    if os.geteuid() != 0:
        pytest.skip("installing an NSS module needs root")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing (./bootstrap installs it)")
    script = f'here={str(ROOT)!r}\n{bootstrap_function("install_nss")}\ninstall_nss\n'
    r = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def hosts_env(env: dict, state_dir: str) -> dict:
    """`env` with BPFS_HOSTS naming the hosts file of the cluster in `state_dir`."""
    return dict(env, BPFS_HOSTS=os.path.join(state_dir, "hosts"))

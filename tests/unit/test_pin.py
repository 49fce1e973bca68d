"""bpfs.pin: parsing /proc, and pins of real processes (children of the test, always reaped)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from bpfs.errors import BpfsError
from bpfs.pin import CRED_KEYS, Pin, parse_creds, parse_start

STAT = (b"1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 "
        b"987654 1000 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n")
STATUS = b"""Name:\tx
Umask:\t0022
State:\tS (sleeping)
Uid:\t1001\t1001\t1001\t1001
Gid:\t100\t100\t100\t100
Groups:\t100 27 
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
"""


def test_start_time_is_counted_from_the_last_parenthesis() -> None:
    assert parse_start(STAT) == 987654            # the command name holds ") ("
    with pytest.raises(ValueError):
        parse_start(b"1234 (x) S 1 2 3\n")
    with pytest.raises(ValueError):
        parse_start(b"no parenthesis at all")


def test_credentials_are_the_lines_that_name_a_principal() -> None:
    creds = parse_creds(STATUS)
    assert creds == ("1001 1001 1001 1001", "100 100 100 100", "100 27",
                     "0000000000000000", "0000000000000000")
    assert len(creds) == len(CRED_KEYS)
    with pytest.raises(ValueError):
        parse_creds(STATUS.replace(b"CapEff", b"CapXxx"))


def test_a_task_name_cannot_supply_a_credential() -> None:
    """Lines end at "\\n" only (bpfs.procstatus): a name holding another line-break
    character (\\x1c, \\x85, U+2028) stays one field, whatever follows it in the name."""
    for brk in ("\x1c", "\x85", "\u2028"):
        fake = f"Name:\tx{brk}Uid:\t0\t0\t0\t0\n".encode()
        status = fake + STATUS.split(b"\n", 1)[1]
        assert parse_creds(status)[0] == "1001 1001 1001 1001"
        with pytest.raises(ValueError):
            parse_creds(status.replace(b"\nUid:", b"\nXid:"))


def _child(code: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    return p


def _errno(fn) -> int:
    with pytest.raises(BpfsError) as exc:
        fn()
    return exc.value.errno


def test_a_pin_holds_while_its_process_lives_and_not_after() -> None:
    p = _child("import sys; print('ready', flush=True); sys.stdin.read()")
    try:
        pin = Pin.take(p.pid, os.getuid(), os.getgid())
        pin.check()
        assert pin.alive() and pin.groups == frozenset(os.getgroups())
        p.stdin.close()
        deadline = time.monotonic() + 5
        while pin.alive():                      # a zombie has ended already
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _errno(pin.check) == errno.ESRCH
        p.wait()
        assert _errno(pin.check) == errno.ESRCH
        pin.close()
        pin.close()                             # twice is fine
        assert _errno(pin.check) == errno.ESRCH and not pin.alive()
    finally:
        p.kill()
        p.wait()
    assert _errno(lambda: Pin.take(p.pid)) == errno.ESRCH
    assert _errno(lambda: Pin.take(0)) == errno.ESRCH


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
def test_a_pinned_process_that_changes_its_ids_is_no_longer_the_same() -> None:
    p = _child("import os, sys; print('ready', flush=True); sys.stdin.readline(); "
               "os.setresuid(0, 65534, 0); print('done', flush=True); sys.stdin.read()")
    try:
        pin = Pin.take(p.pid)
        pin.check()
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"done\n"
        assert _errno(pin.check) == errno.EPERM
        pin.close()
    finally:
        p.kill()
        p.wait()


def test_the_credentials_at_open_must_be_the_requests() -> None:
    assert _errno(lambda: Pin.take(os.getpid(), os.getuid() + 1, os.getgid())) == errno.EPERM


def test_a_thread_is_pinned_on_its_own() -> None:
    tids: list[int] = []
    done = threading.Event()
    t = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), done.wait()))
    t.start()
    try:
        while not tids:
            time.sleep(0.001)
        pin = Pin.take(tids[0])
        pin.check()
    finally:
        done.set()
        t.join()
    deadline = time.monotonic() + 5
    while pin.alive():                          # the thread ended, the process lives on
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _errno(pin.check) == errno.ESRCH
    pin.close()


def _pidfds() -> int:
    """This process's pidfds (other threads of the test run open other fds meanwhile)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "pidfd" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def test_closed_pins_leave_no_descriptor() -> None:
    before = _pidfds()
    for _ in range(200):
        Pin.take(os.getpid()).close()
    assert _pidfds() == before

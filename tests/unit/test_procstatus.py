"""bpfs.procstatus: /proc/TID/status split into fields, for real tasks and odd names."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, strategies as st

from bpfs import procstatus
from bpfs.fs import procfs as fs_procfs

STATUS = b"Name:\tsh\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1001\t1001\t1001\t1001\n" \
         b"Groups:\t27 100 \nSigBlk:\t0000000000010000\n"


def test_fields_are_split_at_the_first_colon_and_stripped():
    assert procstatus.parse(STATUS) == {
        "Name": "sh", "Umask": "0022", "State": "S (sleeping)", "Uid": "1001\t1001\t1001\t1001",
        "Groups": "27 100", "SigBlk": "0000000000010000"}
    assert procstatus.parse(b"Name:\ta:b: c\n") == {"Name": "a:b: c"}


def test_lines_without_a_colon_and_empty_input():
    assert procstatus.parse(b"") == {}
    assert procstatus.parse(b"junk\n\nGroups:\n") == {"Groups": ""}


def test_only_newline_ends_a_line():
    """Characters str.splitlines takes for line breaks stay inside the name."""
    for brk in ("\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\r", "\x0b", "\x0c"):
        fields = procstatus.parse(f"Name:\tx{brk}Fake: 1\nUid:\t0\n".encode())
        assert fields == {"Name": f"x{brk}Fake: 1", "Uid": "0"}, repr(brk)


def test_bytes_that_are_not_utf8_are_replaced():
    assert procstatus.parse(b"Name:\t\xff\xfeab\nPid:\t7\n") == {"Name": "\ufffd\ufffdab",
                                                                 "Pid": "7"}


def test_the_last_of_a_repeated_name_wins():
    assert procstatus.parse(b"Uid:\t1\nUid:\t2\n") == {"Uid": "2"}


@given(st.binary(max_size=300))
def test_any_bytes_parse_to_one_line_fields(data):
    for key, value in procstatus.parse(data).items():
        assert "\n" not in key and ":" not in key and "\n" not in value
        assert value == value.strip()


def _old_migrate_parser(text: str) -> dict[str, str]:
    """bpfs.migrate.procfs.parse_status as it was before procstatus replaced it."""
    out = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        out[key] = val.strip()
    return out


_key = st.text(st.characters(blacklist_characters=":\n", blacklist_categories=("Cs",)),
               min_size=1, max_size=12)
_value = st.text(st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), max_size=20)


@given(st.lists(st.tuples(_key, _value), max_size=10))
def test_the_same_fields_as_the_parsers_it_replaces(pairs):
    """Where no line break other than NL occurs (every real status file but those of
    tasks with such names), the fields are those the old parsers found."""
    pairs = [(k, v) for k, v in pairs if k.splitlines() == [k]]
    text = "".join(f"{k}:\t{v}\n" for k, v in pairs)
    assert procstatus.parse(text.encode()) == _old_migrate_parser(text)


def test_real_tasks_as_the_parsers_it_replaces():
    tids = [int(n) for n in os.listdir("/proc") if n.isdigit()][:200]
    compared = 0
    for tid in tids:
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                data = f.read()
        except OSError:
            continue                                # ended meanwhile
        text = data.decode("utf-8", "replace")
        if text.splitlines() != text.split("\n")[:-1]:
            continue                                # a name with an odd line break
        assert procstatus.parse(data) == _old_migrate_parser(text)
        compared += 1
    assert compared > 0


def test_a_stopped_task_as_the_fs_parser_reads_it():
    p = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(p.pid, signal.SIGSTOP)
        while procstatus.read(p.pid)["State"][0] != "T":
            time.sleep(0.01)
        ours, theirs = procstatus.read(p.pid), fs_procfs._status(p.pid)
        assert ours.pop("SigQ") and theirs.pop("SigQ")     # queued signals of the whole user
        assert ours == theirs
    finally:
        p.kill()
        p.wait()


def test_read_this_process_and_one_of_its_threads():
    me = procstatus.read(os.getpid())
    assert me["Pid"] == me["Tgid"] == str(os.getpid())
    assert me["Uid"].split() == [str(os.getuid())] * 2 + [str(os.geteuid())] * 2
    assert int(me["Umask"], 8) == _umask()
    got = {}
    ready, done = threading.Event(), threading.Event()

    def thread() -> None:
        got["tid"] = threading.get_native_id()
        ready.set()
        done.wait(10)

    t = threading.Thread(target=thread)
    t.start()
    try:
        ready.wait(10)
        fields = procstatus.read(got["tid"])
    finally:
        done.set()
        t.join()
    assert fields["Pid"] == str(got["tid"]) and fields["Tgid"] == str(os.getpid())


def test_an_odd_name_adds_no_field():
    """A real task named with a \\x1c (not escaped by the kernel) keeps its own fields."""
    name = "x\x1cFake: 1"
    p = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                          "open('/proc/self/comm', 'w').write(sys.argv[1])\n"
                          "print(flush=True)\ntime.sleep(30)", name], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"\n"
        fields = procstatus.read(p.pid)
        assert fields["Name"] == name
        assert "Fake" not in fields
        assert fields["Pid"] == str(p.pid)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_a_task_that_is_gone_raises_oserror():
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(OSError) as info:
        procstatus.read(p.pid)
    assert info.value.errno in (errno.ENOENT, errno.ESRCH)
    with pytest.raises(OSError):
        procstatus.read(0)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old

"""The names file libnss_bproc reads (bpfs/hostsfile.py): its text, and how it is replaced."""

from __future__ import annotations

import os
import threading

from bpfs import hostsfile


def test_master_first_then_each_node_with_an_address_in_order():
    text = hostsfile.render_hosts("10.0.0.1", [(3, "10.0.0.13"), (0, "10.0.0.10"), (1, "")])
    assert text.splitlines() == [hostsfile.HEADER.strip(), "10.0.0.1 master",
                                 "10.0.0.10 n0 .0", "10.0.0.13 n3 .3"]


def test_written_whole_world_readable_and_replaced_atomically(tmp_path):
    path = str(tmp_path / "run" / "bpfs" / "hosts")
    old = os.umask(0o077)
    try:
        hostsfile.write_atomically(path, "a\n")
    finally:
        os.umask(old)
    assert open(path).read() == "a\n" and os.stat(path).st_mode & 0o777 == 0o644
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(open(path).read())
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            hostsfile.write_atomically(path, ("x" * 5000 + "\n") if i % 2 else "a\n")
    finally:
        stop.set()
        t.join()
    assert seen <= {"a\n", "x" * 5000 + "\n"}                 # never half a file
    assert [p for p in os.listdir(os.path.dirname(path)) if p != "hosts"] == []
    hostsfile.remove(path)
    hostsfile.remove(path)                                     # gone already: no error
    assert not os.path.exists(path)

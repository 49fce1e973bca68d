"""The cluster model: states, ACL rules, registration, events, procs table."""

from __future__ import annotations

import errno
import signal

import pytest

from bpfs.errors import BpfsError
from bpfs.formats import Facts
from bpfs.model import Caller, Cluster, EventLog, Proc, SavedNode
from bpfs.output import OutputRing, ProcOutput

ROOT = Caller(0, 0)
ALICE = Caller(1000, 1000, frozenset({100, 2000}))
BOB = Caller(1001, 1001)


def errno_of(fn, *args) -> int:
    with pytest.raises(BpfsError) as info:
        fn(*args)
    return info.value.errno


def up_cluster(n: int = 3) -> Cluster:
    c = Cluster(n, clock=lambda: 1000.0)
    for i in range(n):
        assert c.attach(i, f"10.0.0.{i}", Facts(), 0.0) == i
        c.reported_state(i, "up", 0.0)
    return c


def test_configured_nodes_start_down_0111_root():
    c = Cluster(4)
    assert [n.number for n in c.nodes()] == [0, 1, 2, 3]
    assert all((n.state, n.mode, n.uid, n.gid) == ("down", 0o111, 0, 0) for n in c.nodes())
    assert errno_of(c.node, 4) == errno.ENOENT


def test_boot_up_down_sequence_and_events():
    c = Cluster(1, clock=lambda: 5.0)
    cur = c.events.cursor()
    c.attach(None, "1.2.3.4", Facts(hostname="n0"), 0.0)
    assert c.node(0).state == "boot"
    c.reported_state(0, "up", 0.0)
    assert c.node(0).state == "up"
    c.detach(0)
    assert c.node(0).state == "down"
    events, cur = c.events.since(cur)
    assert [(e.kind, e.id, e.what, e.detail) for e in events] == [
        ("node", 0, "state", "boot"), ("node", 0, "state", "up"), ("node", 0, "state", "down")]
    assert c.events.since(cur) == ([], cur)


def test_attach_numbers_of_configured_nodes():
    c = Cluster(2)
    assert c.attach(None, "a", Facts(), 0) == 0
    assert c.attach(None, "b", Facts(), 0) == 1
    assert errno_of(c.attach, None, "c", Facts(), 0) == errno.EBUSY    # all connected
    assert errno_of(c.attach, 1, "c", Facts(), 0) == errno.EBUSY
    for beyond in (2, 7, 99, 65535):
        assert errno_of(c.attach, beyond, "d", Facts(), 0) == errno.ENODEV
    assert errno_of(c.attach, -1, "e", Facts(), 0) == errno.EINVAL
    assert errno_of(c.attach, 10**9, "e", Facts(), 0) == errno.EINVAL
    c.detach(1)
    assert c.attach(None, "f", Facts(), 0) == 1          # lowest free
    assert [n.number for n in c.nodes()] == [0, 1] and c.revision == 0


def test_attach_numbers_when_numbering_is_open():
    c = Cluster(0)
    assert c.attach(None, "a", Facts(), 0) == 0
    assert c.attach(None, "b", Facts(), 0) == 1
    assert c.attach(7, "d", Facts(), 0) == 7             # asked for
    assert c.attach(None, "c", Facts(), 0) == 8          # past the end
    assert errno_of(c.attach, 7, "e", Facts(), 0) == errno.EBUSY
    assert errno_of(c.attach, -1, "e", Facts(), 0) == errno.EINVAL
    assert errno_of(c.attach, 65536, "e", Facts(), 0) == errno.EINVAL
    c.detach(1)
    assert c.attach(None, "f", Facts(), 0) == 1          # lowest free
    assert c.saved() == [] and c.revision == 0          # nothing anyone set: nothing to keep
    c.chmod(7, 0o100, ROOT)
    assert c.saved() == [SavedNode(7, 0o100)] and c.revision == 1


def test_restore_ignores_numbers_beyond_the_configured_nodes():
    c = Cluster(2)
    assert c.restore([SavedNode(1, 0o100), SavedNode(5, 0o101), SavedNode(9)]) == [5, 9]
    assert [n.number for n in c.nodes()] == [0, 1] and c.node(1).mode == 0o100
    d = Cluster(0)
    assert d.restore([SavedNode(5, 0o101)]) == []
    assert [n.number for n in d.nodes()] == [5]


def test_stale_nodes():
    c = up_cluster(2)
    c.heartbeat(0, None, 10.0)
    assert c.stale(12.0, 5.0) == [1]
    assert c.stale(16.0, 5.0) == [0, 1]


def test_chmod_masks_to_x_bits():
    c = up_cluster()
    c.chmod(0, 0o755, ROOT)
    assert c.node(0).mode == 0o111
    c.chmod(0, 0o4701, ROOT)
    assert c.node(0).mode == 0o101


def test_chmod_by_owner_or_root_only():
    c = up_cluster()
    assert errno_of(c.chmod, 0, 0o100, ALICE) == errno.EPERM
    c.chown(0, ALICE.uid, None, ROOT)
    c.chmod(0, 0o100, ALICE)
    assert c.node(0).mode == 0o100
    assert errno_of(c.chmod, 0, 0o111, BOB) == errno.EPERM


def test_chown_root_only():
    c = up_cluster()
    assert errno_of(c.chown, 0, ALICE.uid, None, ALICE) == errno.EPERM
    c.chown(0, ALICE.uid, ALICE.gid, ROOT)
    assert (c.node(0).uid, c.node(0).gid) == (1000, 1000)
    assert errno_of(c.chown, 0, BOB.uid, None, ALICE) == errno.EPERM
    c.chown(0, ALICE.uid, None, ALICE)                   # to oneself: allowed, no change


def test_chgrp_by_owner_to_own_groups_only():
    c = up_cluster()
    c.chown(0, ALICE.uid, None, ROOT)
    c.chown(0, None, 2000, ALICE)                        # supplementary group
    assert c.node(0).gid == 2000
    c.chown(0, None, ALICE.gid, ALICE)                   # primary group
    assert errno_of(c.chown, 0, None, 4242, ALICE) == errno.EPERM   # foreign group
    assert errno_of(c.chown, 0, None, 100, BOB) == errno.EPERM      # not the owner
    c.chown(0, None, 4242, ROOT)
    assert c.node(0).gid == 4242


def test_acl_changes_on_down_node_are_ebusy_after_permission():
    c = Cluster(1)
    assert errno_of(c.chmod, 0, 0o100, ROOT) == errno.EBUSY
    assert errno_of(c.chown, 0, 5, 5, ROOT) == errno.EBUSY
    assert errno_of(c.chmod, 0, 0o100, ALICE) == errno.EPERM


def test_acl_events():
    c = up_cluster()
    cur = c.events.cursor()
    c.chmod(1, 0o101, ROOT)
    c.chmod(1, 0o101, ROOT)                              # no change, no event
    c.chown(1, 1000, 100, ROOT)
    events, _ = c.events.since(cur)
    assert [(e.id, e.what, e.detail) for e in events] == [(1, "mode", "0101"), (1, "owner", "1000 100")]


@pytest.mark.parametrize("mode,uid,gid,groups,expect", [
    (0o100, 1000, 1, (), True),      # owner x
    (0o011, 1000, 1, (), False),     # owner class decides even if group/other have x
    (0o010, 1001, 100, (), True),    # group x by gid
    (0o010, 1001, 1, (100,), True),  # group x by supplementary group
    (0o001, 1001, 100, (), False),   # group class decides
    (0o001, 1001, 1, (), True),      # other
    (0o000, 0, 0, (), True),         # root
])
def test_may_run(mode, uid, gid, groups, expect):
    c = up_cluster()
    c.chown(0, 1000, 100, ROOT)
    c.chmod(0, mode, ROOT)
    assert c.may_run(0, uid, gid, groups) is expect


def test_may_run_needs_up_even_for_root():
    c = up_cluster()
    c.set_admin_state(0, "unavailable", ROOT)
    assert not c.may_run(0, 0, 0)
    c.detach(1)
    assert not c.may_run(1, 0, 0)
    assert not c.may_run(99, 0, 0)
    assert errno_of(c.check_run, 1, ROOT) == errno.EHOSTDOWN
    c.chmod(2, 0o100, ROOT)
    assert errno_of(c.check_run, 2, BOB) == errno.EACCES
    c.check_run(2, ROOT)


def test_admin_state_rules():
    c = up_cluster()
    assert errno_of(c.set_admin_state, 0, "error", ALICE) == errno.EPERM
    with pytest.raises(BpfsError) as info:
        c.set_admin_state(0, "down", ROOT)
    assert info.value.errno == errno.EINVAL and "up, unavailable, error" in info.value.message
    c.detach(1)
    assert errno_of(c.set_admin_state, 1, "error", ROOT) == errno.EHOSTDOWN
    c.set_admin_state(0, "unavailable", ROOT)
    assert c.node(0).state == "unavailable"
    c.set_admin_state(0, "up", ROOT)
    assert c.node(0).state == "up"


def test_admin_state_survives_reconnect():
    c = up_cluster()
    c.set_admin_state(0, "error", ROOT)
    c.detach(0)
    assert c.node(0).state == "down"
    c.attach(0, "x", Facts(), 1.0)
    assert c.node(0).state == "boot"
    c.reported_state(0, "up", 1.0)
    assert c.node(0).state == "error"


def test_power_commands():
    c = up_cluster()
    assert errno_of(c.check_power, 0, "reboot", ALICE) == errno.EPERM
    c.check_power(0, "reboot", ROOT)
    c.mark_power(0, "reboot")
    assert c.node(0).state == "reboot"
    c.detach(0)
    assert c.node(0).state == "down"
    assert errno_of(c.check_power, 0, "halt", ROOT) == errno.EHOSTDOWN
    c.attach(0, "x", Facts(), 1.0)
    c.reported_state(0, "up", 1.0)
    assert c.node(0).state == "up"
    assert errno_of(c.reported_state, 0, "sideways", 1.0) == errno.EINVAL


def test_event_ring_bounded_and_lagging_reader_skips():
    log = EventLog(capacity=4, clock=lambda: 1.0)
    cur = log.cursor()
    for i in range(10):
        log.append("node", i, "state", "up")
    events, cur2 = log.since(cur)
    assert [e.id for e in events] == [6, 7, 8, 9] and cur2 == 10
    woken = []
    log.subscribe(lambda: woken.append(1))
    log.append("proc", 1, "exit", "0")
    assert woken == [1]


def test_procs_table():
    c = up_cluster()
    c.add_proc(Proc(42, 1, 1000, 100, "sleep", 1.0, gen=3))
    c.add_proc(Proc(7, 1, 0, 0, "x", 1.0, state="exited", exit="0"))
    assert c.procs_on(1) == [42]
    assert c.proc(42, 3).cmd == "sleep"
    assert errno_of(c.proc, 42, 4) == errno.ESRCH
    c.remove_proc(42)
    assert errno_of(c.proc, 42) == errno.ESRCH


def test_migrated_process_life_events_and_signal_permission():
    c = up_cluster()
    cursor = c.events.cursor()
    a = c.start_proc(42, 1, 1000, 100, "sleep 9", 5.0)
    b = c.start_proc(43, 1, 1000, 100, "x", 5.0)
    assert a.gen != b.gen and c.proc(42, a.gen) is a
    alice, bob = Caller(1000, 100), Caller(1001, 100, frozenset({100}))
    assert c.check_signal(42, alice) is a and c.check_signal(42, ROOT) is a
    assert errno_of(c.check_signal, 42, bob) == errno.EPERM
    assert errno_of(c.check_signal, 99, ROOT) == errno.ESRCH
    c.signalled(42, signal.SIGSTOP)
    assert a.state == "stopped"
    c.signalled(42, signal.SIGCONT)
    c.exited(42, None, signal.SIGSEGV)
    c.exited(42, 0, None)                       # only the first report counts
    c.signalled(42, signal.SIGTERM)             # nor do signals after the end
    assert (a.state, a.exit) == ("exited", "signal 11")
    assert errno_of(c.check_signal, 42, ROOT) == errno.ESRCH
    assert c.procs_on(1) == [43]
    c.exited(43, 3, None)
    got = [(e.id, e.what, e.detail) for e in c.events.since(cursor)[0]]
    assert got == [(42, "start", "1"), (43, "start", "1"), (42, "signal", "19"),
                   (42, "signal", "18"), (42, "exit", "signal 11"), (43, "exit", "3")]


def test_saved_and_restore_round_trip():
    c = up_cluster(2)
    c.chmod(0, 0o100, ROOT)
    c.chown(1, 1000, 100, ROOT)
    c.set_admin_state(1, "unavailable", ROOT)
    saved = c.saved()
    d = Cluster(2)
    d.restore(saved)
    assert d.saved() == saved
    assert d.node(1).state == "down"
    assert d.saved()[1] == SavedNode(1, 0o111, 1000, 100, "unavailable")


def test_starting_process_runs_or_fails_and_is_removed():
    c = up_cluster()
    cursor = c.events.cursor()
    a = c.start_proc(42, 1, 1000, 100, "sleep 9", 5.0, state="starting")
    assert c.procs_on(1) == [42] and c.check_signal(42, ROOT) is a
    c.proc_running(42)
    assert a.state == "running"
    c.start_failed(42, errno.EHOSTDOWN)          # it ran: not a failed start
    assert c.proc(42) is a
    b = c.start_proc(43, 1, 1000, 100, "x", 5.0, state="starting")
    c.start_failed(43, errno.ENOEXEC, gen=b.gen + 1)     # another generation: ignored
    c.start_failed(43, errno.ENOEXEC, gen=b.gen)
    assert 43 not in c.procs and b.exit == "failed ENOEXEC"
    got = [(e.id, e.what, e.detail) for e in c.events.since(cursor)[0]]
    assert got == [(42, "start", "1"), (43, "start", "1"), (43, "exit", "failed ENOEXEC")]
    c.remove_proc(42, gen=a.gen + 1)
    assert 42 in c.procs
    c.remove_proc(42, gen=a.gen)
    assert 42 not in c.procs


def test_output_ring_keeps_the_newest_bytes_and_readers_skip_what_was_dropped():
    r = OutputRing(capacity=8)
    r.append(b"abcdef")
    assert r.read(0, 4) == (b"abcd", 4) and r.read(4, 100) == (b"ef", 6)
    r.append(b"ghijk")                           # 11 bytes received, 8 kept
    assert (r.first, r.end) == (3, 11)
    assert r.read(0, 100) == (b"defghijk", 11)   # a reader behind skips d..: from 3
    r.append(b"0123456789")                      # bigger than the ring
    assert (r.first, r.end) == (13, 21) and r.read(11, 3) == (b"234", 16)
    assert not r.at_eof(21)
    r.closed = True
    assert r.at_eof(21) and not r.at_eof(20)


def test_proc_output_is_at_eof_once_the_process_ended_and_its_link_is_over():
    woken = []
    c = up_cluster()
    c.subscribe(lambda: woken.append(1))
    out = ProcOutput(capacity=64, notify=c.output_changed)
    p = c.start_proc(42, 1, 0, 0, "x", 1.0, state="starting", output=out)
    c.proc_running(42)
    out.append("stdout", b"hi\n")
    out.link_over("stdout")                      # closed its stdout, still running
    assert not out.streams["stdout"].closed
    c.exited(42, 3, None)
    assert out.streams["stdout"].closed and not out.streams["stderr"].closed
    out.link_over("stderr")
    assert out.streams["stderr"].closed and p.output is out
    assert not out.all_read
    out.streams["stdout"].eof_read = out.streams["stderr"].eof_read = True
    assert out.all_read and woken
    out2 = ProcOutput(capacity=64)
    c.start_proc(43, 1, 0, 0, "y", 1.0, state="starting", output=out2)
    c.start_failed(43, errno.EIO)
    assert all(r.closed for r in out2.streams.values())

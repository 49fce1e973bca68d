"""Remote usage without a cluster: the stat line, the node's samples and message, what
the model takes from a node (only its own processes), and the master's refresh on read."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from bpfs import formats, usage
from bpfs.fs.ops import BpfsOperations
from bpfs.master.usage import UsageService
from bpfs.model import Cluster, Proc
from bpfs.node import usage as node_usage
from bpfs.usage import Sample, Usage, parse_stat, render_stat, stat_int
from bpfs.wire import messages as m
from tests.unit.test_fs_ops import ROOT, FakePin, path_ino, read_all, readdir_reply
from tests.unit.test_ctl import FakeServices, services

pytestmark = pytest.mark.timeout(30)

HZ = os.sysconf("SC_CLK_TCK")


def sample(pid: int = 42, mid: int = 0, utime: int = 100, age: int = 400, **kw) -> Sample:
    fields = dict(pid=pid, id=mid, state="R", comm="spin", utime=utime, stime=0, cutime=0,
                  cstime=0, minflt=10, majflt=1, cminflt=0, cmajflt=0, nice=0, threads=1,
                  age=age, vsize=8 << 20, rss=1 << 20)
    fields.update(kw)
    return Sample(**fields)


# ---- the stat line ------------------------------------------------------------------

def test_the_stat_line_has_procs_52_fields_where_ps_reads_them() -> None:
    u = Usage(state="S", comm="a b) (c", utime=1.5, stime=0.25, cutime=2, cstime=0,
              minflt=7, majflt=3, cminflt=5, cmajflt=1, nice=-5, threads=4, vsize=1 << 30,
              rss=3 * 4096, started=1000.0 + 12.5)
    text = render_stat(4242, u, (100, 200, 300, 34816, 200), 100, 1000.0)
    assert text.endswith("\n") and text.count("\n") == 1
    comm, rest = parse_stat(text)
    assert comm == "a b) (c" and len(rest) == 50 and rest[0] == "S"
    got = {n: stat_int(rest, n) for n in range(4, 25)}
    assert got == {4: 100, 5: 200, 6: 300, 7: 34816, 8: 200, 9: 0, 10: 7, 11: 5, 12: 3, 13: 1,
                   14: 150, 15: 25, 16: 200, 17: 0, 18: 15, 19: -5, 20: 4, 21: 0, 22: 1250,
                   23: 1 << 30, 24: 3}
    assert stat_int(rest, 38) == 17


def test_the_stat_line_parses_like_the_kernels() -> None:
    text = open(f"/proc/{os.getpid()}/stat").read()
    comm, rest = parse_stat(text)
    assert comm == open(f"/proc/{os.getpid()}/comm").read().strip()
    assert stat_int(rest, 20) >= 1 and rest[0] in "RSD"
    for bad in ("", "42", "42 (x", "x (y) R 1", "42 (y) R 1 2 3"):
        with pytest.raises(ValueError):
            parse_stat(bad)


def test_psutil_reads_the_stat_line_as_a_real_ones(tmp_path) -> None:
    """psutil's own /proc reader, pointed at a directory holding our line as 77/stat."""
    pslinux = pytest.importorskip("psutil._pslinux")
    u = Usage(state="T", comm="spin", utime=3.0, stime=1.0, threads=2, nice=5, rss=8192)
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "stat").write_text(render_stat(77, u, (1, 77, 77, 0, -1), HZ, 0.0))
    proc = pslinux.Process(77)
    proc._procfs_path = str(tmp_path)
    times = proc.cpu_times()
    assert (times.user, times.system, proc.status(), proc.ppid()) == (3.0, 1.0, "stopped", 1)
    assert proc.name() == "spin"


# ---- status keys --------------------------------------------------------------------

def test_status_shows_dashes_before_a_report_and_round_trips_after() -> None:
    p = formats.ProcStatus(42, 1, "running", 0, 0, "spin", 1.0)
    text = formats.render_proc_status(p)
    assert "utime: -\n" in text and "rss_kb: -\n" in text
    assert formats.parse_proc_status(text) == p
    u = Usage(state="R", utime=12.25, stime=0.5, rss=5 << 20, vsize=9 << 20, minflt=3,
              majflt=1, nice=3, threads=2, cpu_percent=97.5, sampled=1700000000.125)
    back = formats.parse_proc_status(formats.render_proc_status(
        formats.ProcStatus(42, 1, "running", 0, 0, "spin", 1.0, usage=u)))
    assert back.usage is not None
    assert (back.usage.utime, back.usage.rss, back.usage.vsize, back.usage.cpu_percent,
            back.usage.nice, back.usage.threads, back.usage.state) == (
        12.25, 5 << 20, 9 << 20, 97.5, 3, 2, "R")


def test_cpu_time_is_written_as_ps_does() -> None:
    assert usage.cpu_time(0) == "00:00:00"
    assert usage.cpu_time(3725.9) == "01:02:05"
    assert usage.cpu_time(2 * 86400 + 61) == "2-00:01:01"


# ---- the model: a node speaks only for its own processes -------------------------------

def cluster_with(*procs: Proc) -> Cluster:
    c = Cluster(2, clock=lambda: 5000.0)
    for p in procs:
        c.add_proc(p)
    return c


def test_the_first_report_gives_lifetime_cpu_and_the_start_then_the_interval() -> None:
    c = cluster_with(Proc(42, 1, 0, 0, "spin", 1.0, mid=7))
    assert c.record_usage(1, 100, 50.0, [sample(mid=7, utime=100, age=400)], 1.0) == 1
    u = c.procs[42].usage
    assert u is not None and u.utime == 1.0 and u.cpu_percent == 25.0 and u.started == 4996.0
    c.record_usage(1, 100, 52.0, [sample(mid=7, utime=290, age=600)], 3.0)
    u = c.procs[42].usage
    assert u.cpu_percent == 95.0 and u.started == 4996.0 and c.procs[42].usage_at == 3.0
    c.record_usage(1, 100, 52.0, [sample(mid=7, utime=290, age=600)], 4.0)   # the same again
    assert c.procs[42].usage.cpu_percent == 95.0


def test_a_node_cannot_report_what_it_does_not_hold() -> None:
    c = cluster_with(Proc(42, 1, 0, 0, "mine", 1.0, mid=7), Proc(43, 0, 0, 0, "other", 1.0),
                     Proc(44, 1, 0, 0, "done", 1.0, state="exited"),
                     Proc(45, 1, 0, 0, "reused", 1.0, mid=9),
                     Proc(46, 1, 0, 0, "new", 1.0, state="starting"))
    taken = c.record_usage(1, 100, 1.0, [sample(43), sample(44), sample(45, mid=8),
                                         sample(46), sample(999), sample(42, mid=7)], 1.0)
    assert taken == 1
    assert [p.pid for p in c.procs.values() if p.usage is not None] == [42]


# ---- the node: its samples and its message ------------------------------------------

def test_the_node_samples_its_processes_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(8 << 20); "
                              "print(flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()                     # its memory is there
        at, got = node_usage.read_samples([(child.pid, 3), (4194304, 4), (os.getpid(), 0)])
        assert at > 0 and [s.pid for s in got] == [child.pid, os.getpid()]
        s = got[0]
        assert (s.id, s.state in "RS", s.threads, s.nice) == (3, True, 1, 0)
        assert s.vsize > s.rss > 0 and s.age >= 0 and s.comm.startswith("python")
        msg = m.FROM_NODE.decode(m.encode(node_usage.message(at, got)))
        assert isinstance(msg, m.Usage) and [p.pid for p in msg.procs] == [child.pid, os.getpid()]
        assert msg.hz == HZ and msg.procs[0].rss == s.rss
    finally:
        child.kill()
        child.wait()


def test_the_nodes_sample_is_clamped_to_the_grammar() -> None:
    """Whatever a stat line says (a kernel's odd day), the node's message fits."""
    fields = ["Rx", "1", "1", "1", "0", "-1", "0", "5", "0", "1", "0", "7", "3", "-1", "-2",
              "20", "-40", str(1 << 30), "0", "100", "4096", "1"] + ["0"] * 28
    text = f"42 ({'c' * 100}) " + " ".join(fields) + "\n"
    t = usage.sample_of(42, 3, text, 10.0, 100, 4096)
    msg = m.FROM_NODE.decode(m.encode(node_usage.message(1.0, [m.ProcUsage(*t)])))
    p = msg.procs[0]
    assert (p.state, len(p.comm), p.nice, p.threads, p.cutime, p.cstime, p.age) == (
        "R", 64, -20, 1 << 22, 0, 0, 900)
    assert (p.utime, p.stime, p.minflt, p.majflt, p.rss) == (7, 3, 5, 1, 4096)


# ---- the master: fresh figures on a read ----------------------------------------------

class Sent:
    def __init__(self) -> None:
        self.msgs: list[tuple[int, m.Msg]] = []

    async def __call__(self, node: int, msg: m.Msg) -> None:
        self.msgs.append((node, msg))


def report(svc: UsageService, node: int, *samples: Sample, at: float = 1.0) -> None:
    svc.on_usage(node, m.Usage(hz=100, at=at, procs=[
        m.ProcUsage(*(getattr(s, f) for f in m.ProcUsage.__struct_fields__)) for s in samples]))


async def test_a_read_of_old_figures_asks_the_node_once_and_waits_for_its_report() -> None:
    c = cluster_with(Proc(42, 1, 0, 0, "a", 1.0), Proc(43, 1, 0, 0, "b", 1.0))
    sent = Sent()
    svc = UsageService(c, sent, interval=2.0, max_age=0.5, wait=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await svc.fresh(42)                         # the node never reported: no ask
        assert sent.msgs == []
        report(svc, 1, sample(42), sample(43))
        await svc.fresh(42)                         # fresh enough: no ask
        assert sent.msgs == []
        await trio.sleep(0.6)
        waited: list[float] = []

        async def reader(pid: int) -> None:
            t = trio.current_time()
            await svc.fresh(pid)
            waited.append(trio.current_time() - t)
        nursery.start_soon(reader, 42)
        nursery.start_soon(reader, 43)
        await trio.sleep(0.1)
        assert [type(x) for _, x in sent.msgs] == [m.Sample]      # one ask for both readers
        report(svc, 1, sample(42, utime=150), sample(43), at=2.0)
        await trio.sleep(0.05)
        assert len(waited) == 2 and max(waited) < 0.5
        assert c.procs[42].usage.utime == 1.5
        nursery.cancel_scope.cancel()


async def test_a_node_that_does_not_answer_delays_one_wait_then_none() -> None:
    c = cluster_with(Proc(42, 1, 0, 0, "a", 1.0))
    sent = Sent()
    svc = UsageService(c, sent, interval=5.0, max_age=0.5, wait=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        report(svc, 1, sample(42))
        await trio.sleep(0.6)
        t = trio.current_time()
        await svc.fresh(42)
        assert 0.25 < trio.current_time() - t < 0.5
        for _ in range(5):
            t = trio.current_time()
            await svc.fresh(42)
            assert trio.current_time() - t < 0.05
        assert len(sent.msgs) == 1
        svc.node_lost(1)
        await svc.fresh(42)                          # no longer reporting: never asked
        assert len(sent.msgs) == 1
        nursery.cancel_scope.cancel()


# ---- the files ----------------------------------------------------------------------------

class UsageServices(FakeServices):
    """The ctl tests' fake services, and the master's fresh_usage, recorded."""
    asked: list[int]

    async def fresh_usage(self, pid: int) -> None:
        self.asked.append(pid)


async def test_stat_and_status_ask_for_fresh_figures_and_have_size_0() -> None:
    s = services(2, 3)
    s.__class__ = UsageServices
    s.asked = []
    s.cluster.add_proc(Proc(4242, 1, 1000, 1000, "sleep 100", 1.0, gen=1))
    ops = BpfsOperations(s, take_pin=FakePin, readdir_reply=readdir_reply)
    comm, rest = parse_stat(await read_all(ops, "/procs/4242/stat"))
    assert (comm, rest[0], len(rest)) == ("sleep", "R", 50)
    await read_all(ops, "/procs/4242/status")
    await read_all(ops, "/procs/4242/node")
    assert s.asked == [4242, 4242]
    for name in ("stat", "status"):
        attr = await ops.getattr(await path_ino(ops, f"/procs/4242/{name}"), ROOT)
        assert attr.st_size == 0 and attr.st_uid == 1000


def test_a_bad_sample_from_a_node_is_a_value_error_not_a_crash() -> None:
    with pytest.raises(ValueError):
        usage.sample_of(1, 0, "1 (x) R 1 2", 1.0, 100, 4096)
    with pytest.raises(ValueError):
        usage.sample_of(1, 0, "garbage", 1.0, 100, 4096)

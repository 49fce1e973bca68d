"""/proc/PID/limits parsed as the dump reads it (bpfs.migrate.procfs.parse_limits)."""

from __future__ import annotations

import resource

from bpfs.migrate import procfs

SAMPLE = """\
Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             unlimited            unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             96367                96367                processes 
Max open files            77                   99                   files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       96367                96367                signals   
Max msgqueue size         819200               819200               bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
"""
INF = procfs.RLIM_INFINITY


def test_every_limit_in_rlimit_order_with_unlimited_as_infinity() -> None:
    got = procfs.parse_limits(SAMPLE)
    assert [res for res, _, _ in got] == list(range(16))
    assert got[resource.RLIMIT_NOFILE] == (resource.RLIMIT_NOFILE, 77, 99)
    assert got[resource.RLIMIT_STACK] == (resource.RLIMIT_STACK, 8388608, INF)
    assert got[resource.RLIMIT_CORE] == (resource.RLIMIT_CORE, 0, INF)
    assert got[13] == (13, 0, 0)  # no units column


def test_unknown_or_short_lines_are_skipped() -> None:
    text = SAMPLE.splitlines()[0] + "\nMax frobs    1    2    x\nMax open files  5\n"
    assert procfs.parse_limits(text) == []


def test_the_same_as_getrlimit_for_this_process() -> None:
    with open("/proc/self/limits") as f:
        got = procfs.parse_limits(f.read())
    inf = lambda v: INF if v == resource.RLIM_INFINITY else v  # noqa: E731
    assert got == [(r, *map(inf, resource.getrlimit(r))) for r in range(16)]

"""bpfs/node/movethreads.py: a move's thread is kept for the next move."""

from __future__ import annotations

import threading

import pytest

from bpfs.node import movethreads
from bpfs.node.movethreads import MoveThreads

pytestmark = pytest.mark.timeout(30)


def _in_thread(threads: MoveThreads, clean: bool = True) -> int:
    """Run one job (that says whether it left its thread `clean`); the ident of the
    thread that ran it."""
    got: list[int] = []
    done = threading.Event()

    def job(x: int) -> bool:
        got.append(threading.get_ident() + 0 * x)
        done.set()
        return clean
    threads.run(job, 1)
    assert done.wait(10)
    return got[0]


def test_one_move_after_another_runs_in_the_same_thread() -> None:
    threads = MoveThreads()
    first = _in_thread(threads)
    for _ in range(5):
        while not threads._idle:            # its thread back in the pool
            threading.Event().wait(0.001)
        assert _in_thread(threads) == first
    assert threads.started == 1


def test_moves_at_once_get_threads_of_their_own() -> None:
    threads = MoveThreads()
    release, seen = threading.Event(), set()
    started = threading.Barrier(3)

    def job() -> bool:
        seen.add(threading.get_ident())
        started.wait(10)
        release.wait(10)
        return True
    for _ in range(2):
        threads.run(job)
    started.wait(10)                        # both run at the same time
    release.set()
    assert len(seen) == 2 and threads.started == 2


def test_a_thread_that_may_still_trace_is_not_kept(caplog) -> None:
    """A move that did not end clean (its process died under it, a bug that raised): its
    thread ends, and the kernel lets go of what it traced."""
    threads = MoveThreads()
    _in_thread(threads, clean=False)
    done = threading.Event()

    def bad() -> bool:
        done.set()
        raise RuntimeError("bug")
    for _ in range(100):                    # its thread gone from the pool
        if not threads._idle:
            break
        threading.Event().wait(0.01)
    threads.run(bad)
    assert done.wait(10)
    for _ in range(500):                    # logged once it raised
        if "a move's thread failed" in caplog.text:
            break
        threading.Event().wait(0.01)
    else:
        raise AssertionError("the error was not logged")
    _in_thread(threads)
    assert threads.started == 3             # neither of the first two served again


def test_an_idle_thread_ends_after_its_timeout(monkeypatch) -> None:
    monkeypatch.setattr(movethreads, "IDLE_TIMEOUT", 0.05)
    threads = MoveThreads()
    _in_thread(threads)
    for _ in range(1000):
        if not threads._idle:
            break
        threading.Event().wait(0.01)
    assert not threads._idle                # gone: the next move starts a thread
    _in_thread(threads)
    assert threads.started == 2

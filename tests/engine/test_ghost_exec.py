"""An exec in a parked ghost (Tracer.exec_in), then its capture: what the master does when a
process on a node execs a program to run on another node. Real processes, real ptrace (the
rig: tests/engine/ghostrig.py).
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from typing import Iterator

import pytest

from bpfs.migrate import dump, procfs
from bpfs.migrate.errors import MigrateError
from tests.engine.ghostrig import SLEEP, TRUE, Rig, asleep, proc_state, until
from tests.engine.test_ghost import status_of
from tests.engine.test_ghost_fork import errno_of, fd_count, read, zombies_of

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]

ECHO = shutil.which("echo") or "/bin/echo"
ENV = [b"A=1", b"B=two words"]


def cwd_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def fds_of(pid: int) -> list[str]:
    return sorted(os.listdir(f"/proc/{pid}/fd"))


def maps_of(pid: int) -> bytes:
    return read(pid, "maps")


def entry_of(pid: int) -> int:
    return procfs.parse_auxv(read(pid, "auxv"))[procfs.AT_ENTRY]


def parent_and_child(rig: Rig, **req) -> tuple[int, int]:
    """A ghost (bpsh's child) and its forked child ghost (a process forked on a node)."""
    pid, _ = rig.ghost([SLEEP, "100"], **req)
    return pid, rig.tracer.fork(pid).result(5)


def looks_unchanged(pid: int, before: tuple) -> bool:
    return (cwd_of(pid), read(pid, "comm"), read(pid, "cmdline"), maps_of(pid),
            fds_of(pid)) == before and asleep(pid)


def snapshot(pid: int) -> tuple:
    return cwd_of(pid), read(pid, "comm"), read(pid, "cmdline"), maps_of(pid), fds_of(pid)


@pytest.fixture
def root_only() -> Iterator[str]:
    """A copy of /bin/true that only root may run (mode 0700)."""
    d = tempfile.mkdtemp(prefix="bpfs-exec-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "secret")
    shutil.copy(TRUE, path)
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_forked_ghost_execs_and_is_captured_at_the_new_entry(rig: Rig) -> None:
    pid, child = parent_and_child(rig, cwd="/tmp")
    argv = [b"echo", b"hello", b"a b"]
    rig.tracer.exec_in(child, ECHO.encode(), argv, ENV, b"/usr").result(5)
    assert child not in rig.tracer.ghosts()
    img = rig.tracer.capture(child, 5).result(10)
    assert img.argv == ["echo", "hello", "a b"] and img.cwd == "/usr"
    assert img.exe_path == os.path.realpath(ECHO) and img.pid == child
    assert img.registers().rip == entry_of(child)          # the new program's entry point
    assert asleep(child) and rig.tracer.ghosts() == sorted([pid, child])
    assert status_of(child)["PPid"] == str(pid)            # still its parent's child
    assert read(child, "environ") == b"\0".join(ENV) + b"\0"
    assert read(child, "cmdline") == b"\0".join(argv) + b"\0"
    assert read(child, "comm") == b"echo\n" and cwd_of(child) == "/usr"
    assert cwd_of(pid) == "/tmp"                          # the parent is untouched
    os.kill(child, signal.SIGUSR1)                        # a ghost again
    rig.rec.wait(lambda: (child, signal.SIGUSR1) in rig.rec.signals)
    rig.tracer.finish(child, exit_code=5).result(5)
    assert rig.tracer.reap(pid, child).result(5) == 5 << 8
    assert zombies_of(pid) == [] and rig.rec.signals == [(child, signal.SIGUSR1)]


def test_a_failed_exec_leaves_the_ghost_as_it_was(rig: Rig) -> None:
    pid, child = parent_and_child(rig, cwd="/tmp")
    rig.tracer.rename(child, [b"sh", b"-c", b"x"]).result(5)  # a mapping of its own
    before = snapshot(child)
    fifo = os.path.join(tempfile.mkdtemp(prefix="bpfs-exec-"), "fifo")
    os.mkfifo(fifo, 0o755)                                # must not hang the tracer
    try:
        for path, err in ((b"/nonexistent/program", errno.ENOENT),
                          (b"/etc/passwd", errno.EACCES), (b"/tmp", errno.EACCES),
                          (fifo.encode(), errno.EACCES)):
            assert errno_of(rig.tracer.exec_in(child, path, [b"x"], ENV, b"/usr")) == err
            assert looks_unchanged(child, before) and child in rig.tracer.ghosts()
    finally:
        shutil.rmtree(os.path.dirname(fifo))
    os.kill(child, signal.SIGUSR2)                        # still a ghost
    rig.rec.wait(lambda: (child, signal.SIGUSR2) in rig.rec.signals)
    rig.tracer.exec_in(child, ECHO.encode(), [b"echo"], [], b"/usr").result(5)
    img = rig.tracer.capture(child, 5).result(10)
    assert img.argv == ["echo"] and img.cwd == "/usr"
    rig.tracer.finish(child, exit_code=0).result(5)
    assert rig.tracer.reap(pid, child).result(5) == 0


def test_a_step_that_fails_puts_everything_back(rig: Rig,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from bpfs.migrate import ghost_exec
    pid, child = parent_and_child(rig, cwd="/tmp")
    before = snapshot(child)
    monkeypatch.setattr(ghost_exec, "SYS_OPENAT", 1000)    # no such call: ENOSYS
    assert errno_of(rig.tracer.exec_in(child, ECHO.encode(), [b"e"], [], b"/usr")
                    ) == errno.ENOSYS
    monkeypatch.undo()
    assert looks_unchanged(child, before)
    monkeypatch.setattr(ghost_exec, "MAX_TRIES", 0)        # as if signals overtook it
    assert errno_of(rig.tracer.exec_in(child, ECHO.encode(), [b"e"], [], b"/usr")
                    ) == errno.EINTR
    monkeypatch.undo()
    assert looks_unchanged(child, before) and rig.tracer.ghosts() == sorted([pid, child])
    rig.tracer.exec_in(child, ECHO.encode(), [b"e"], [], b"/usr").result(5)
    assert rig.tracer.capture(child, 5).result(10).argv == ["e"]


def test_a_users_ghost_execs_as_that_user(rig: Rig, users, root_only: str) -> None:
    bob = users["bob"]
    pid, child = parent_and_child(rig, uid=bob.uid, gid=bob.gid)
    before = snapshot(child)
    assert errno_of(rig.tracer.exec_in(child, root_only.encode(), [b"secret"], [], b"/")
                    ) == errno.EACCES
    assert looks_unchanged(child, before)
    os.chmod(os.path.dirname(root_only), 0o700)           # a cwd bob may not enter: "/"
    rig.tracer.exec_in(child, ECHO.encode(), [b"echo"], [],
                       os.path.dirname(root_only).encode()).result(5)
    img = rig.tracer.capture(child, 5).result(10)
    assert (img.uid, img.gid, img.cwd) == (bob.uid, bob.gid, "/")
    rig.tracer.finish(child, exit_code=0).result(5)
    assert rig.tracer.reap(pid, child).result(5) == 0


def test_a_set_user_id_program_is_refused_by_capture(rig: Rig, users) -> None:
    su = "/usr/bin/passwd"
    if not os.path.exists(su) or not os.stat(su).st_mode & 0o4000:
        pytest.skip("no set-user-ID program to try")
    bob = users["bob"]
    pid, child = parent_and_child(rig, uid=bob.uid, gid=bob.gid)
    rig.tracer.exec_in(child, su.encode(), [b"passwd", b"--status"], [], b"/").result(5)
    # the tracer is privileged: the kernel honours the set-user-ID bit; capture refuses it
    assert status_of(child)["Uid"].split()[:2] == [str(bob.uid), "0"]
    with pytest.raises(MigrateError) as exc:
        rig.tracer.capture(child, 5).result(10)
    assert exc.value.errno == errno.EPERM
    assert proc_state(child) == "t" and child not in rig.tracer.ghosts()
    rig.tracer.finish(child, exit_code=255).result(5)    # it never ran
    assert rig.tracer.reap(pid, child).result(5) == 255 << 8


def test_a_missing_cwd_runs_from_root(rig: Rig) -> None:
    pid, child = parent_and_child(rig, cwd="/tmp")
    rig.tracer.exec_in(child, ECHO.encode(), [b"echo"], [], b"/nonexistent/dir").result(5)
    assert rig.tracer.capture(child, 5).result(10).cwd == "/"
    rig.tracer.kill(child).result(5)


def test_refusals(rig: Rig) -> None:
    pid, child = parent_and_child(rig)
    ex = rig.tracer.exec_in
    assert errno_of(ex(2**22 + 1, b"/bin/true", [b"true"], [], b"/")) == errno.ESRCH
    assert errno_of(ex(os.getpid(), b"/bin/true", [b"true"], [], b"/")) == errno.ESRCH
    seized = rig.bpsh.spawn([TRUE])                       # seized, no ghost yet
    rig.tracer.seize(seized).result(5)
    assert errno_of(ex(seized, b"/bin/true", [b"true"], [], b"/")) == errno.ESRCH
    rig.tracer.kill(seized).result(5)
    before = snapshot(child)
    for path, argv, envp, cwd in ((b"/bin/true", [], [], b"/"),
                                  (b"/bin/true", [b"a\0b"], [], b"/"),
                                  (b"/bin/true", ["text"], [], b"/"),
                                  (b"/bin/true", [b"true"], [b"A=\0"], b"/"),
                                  (b"", [b"true"], [], b"/"),
                                  ("/bin/true", [b"true"], [], b"/"),
                                  (b"/bin/true", [b"true"], [], b"/\0x"),
                                  (b"/bin/true", b"true", [], b"/")):
        assert errno_of(ex(child, path, argv, envp, cwd)) == errno.EINVAL
    big = [b"x" * 100_000] * 21                            # 2.1 MB
    assert errno_of(ex(child, b"/bin/true", big, [], b"/")) == errno.E2BIG
    assert errno_of(ex(child, b"/bin/true", [b"x" * 200_000], [], b"/")) == errno.E2BIG  # kernel's
    rig.tracer.set_stopped(child, True).result(5)
    assert until(lambda: proc_state(child) == "t")
    assert errno_of(ex(child, b"/bin/true", [b"true"], [], b"/")) == errno.EBUSY
    rig.tracer.set_stopped(child, False).result(5)
    assert asleep(child) and looks_unchanged(child, before)
    assert rig.rec.signals == [] and rig.tracer.ghosts() == sorted([pid, child])


def test_signals_after_the_exec_go_to_the_program_a_childs_sigchld_nowhere(rig: Rig
                                                                             ) -> None:
    """Between exec_in and capture the process is the new program, stopped at its exec: a
    signal then is neither reported nor lost (it is in the image, for the node); the
    SIGCHLD of one of its child ghosts is dropped."""
    pid, child = parent_and_child(rig)
    grandchild = rig.tracer.fork(child).result(5)
    rig.tracer.exec_in(child, ECHO.encode(), [b"echo"], [], b"/").result(5)
    os.kill(child, signal.SIGUSR1)
    rig.tracer.finish(grandchild, exit_code=1).result(5)  # SIGCHLD to the exec'd process
    img = rig.tracer.capture(child, 5).result(10)
    assert img.pending == [signal.SIGUSR1] and rig.rec.signals == []
    assert rig.tracer.reap(child, grandchild).result(5) == 1 << 8   # still its child
    rig.tracer.finish(child, exit_code=0).result(5)
    assert rig.tracer.reap(pid, child).result(5) == 0


def test_finish_or_kill_before_capture(rig: Rig) -> None:
    pid, child = parent_and_child(rig)
    other, third = rig.tracer.fork(pid).result(5), rig.tracer.fork(pid).result(5)
    for c in (child, other, third):
        rig.tracer.exec_in(c, ECHO.encode(), [b"echo"], [], b"/").result(5)
    rig.tracer.finish(child, exit_code=3).result(5)
    rig.tracer.kill(other).result(5)
    rig.tracer.finish(third, signal=signal.SIGTERM).result(5)
    assert rig.tracer.reap(pid, child).result(5) == 3 << 8
    assert os.WTERMSIG(rig.tracer.reap(pid, other).result(5)) == signal.SIGKILL
    assert os.WTERMSIG(rig.tracer.reap(pid, third).result(5)) == signal.SIGTERM
    assert rig.rec.signals == []
    assert list(rig.tracer._ghosts.tracees) == [pid]


def test_killing_the_ghost_while_it_execs(rig: Rig) -> None:
    """SIGKILL at any moment of an exec_in: ESRCH (or the exec took, and then capture is
    ESRCH), its end reported once, nothing left behind."""
    pid, _ = rig.ghost([SLEEP, "100"])
    for i in range(30):
        child = rig.tracer.fork(pid).result(5)
        fut = rig.tracer.exec_in(child, ECHO.encode(), [b"echo"], ENV, b"/usr")
        time.sleep(i * 0.00003)
        os.kill(child, signal.SIGKILL)
        try:
            fut.result(5)
        except MigrateError as exc:
            assert exc.errno == errno.ESRCH
        rig.rec.wait(lambda: child in rig.rec.exits)
        assert errno_of(rig.tracer.capture(child, 1)) == errno.ESRCH
        assert os.WTERMSIG(rig.tracer.reap(pid, child).result(5)) == signal.SIGKILL
    assert list(rig.tracer._ghosts.tracees) == [pid] and zombies_of(pid) == []
    assert rig.tracer.ghosts() == [pid] and asleep(pid)


def test_signals_during_exec_in_are_reported_or_kept_for_the_program(rig: Rig) -> None:
    """A signal before the exec is the ghost's (reported, for its real process); after it,
    the new program's (in the image). Every one sent lands in one place or the other."""
    pid, _ = rig.ghost([SLEEP, "100"])
    for _ in range(20):
        child = rig.tracer.fork(pid).result(5)
        done = threading.Event()

        def hammer() -> None:
            while not done.is_set():
                os.kill(child, signal.SIGUSR1)
                time.sleep(0.00005)
        th = threading.Thread(target=hammer)
        th.start()
        try:
            rig.tracer.exec_in(child, ECHO.encode(), [b"echo"], [], b"/").result(5)
        finally:
            done.set()
            th.join()
        os.kill(child, signal.SIGUSR2)
        img = rig.tracer.capture(child, 5).result(10)
        assert signal.SIGUSR2 in img.pending and set(img.pending) <= {signal.SIGUSR1,
                                                                       signal.SIGUSR2}
        assert {s for p, s in rig.rec.signals if p == child} <= {signal.SIGUSR1}
        rig.tracer.finish(child, exit_code=0).result(5)
        assert rig.tracer.reap(pid, child).result(5) == 0
    assert {p for p, _ in rig.rec.signals} <= set(rig.rec.exits) and asleep(pid)


@pytest.mark.timeout(180)
def test_two_hundred_execs_leave_nothing_behind(rig: Rig) -> None:
    """fork, exec_in, capture, finish, reap 200 times: no fd, zombie or tracer record left;
    and what exec_in + capture cost, submit -> result (docs/ghosts.md)."""
    pid, _ = rig.ghost([SLEEP, "100"])
    ghosts = rig.tracer._ghosts

    def cycle(i: int) -> tuple[float, float]:
        child = rig.tracer.fork(pid).result(5)
        t0 = time.perf_counter()
        rig.tracer.exec_in(child, TRUE.encode(), [b"true", b"%d" % i], ENV, b"/").result(5)
        t1 = time.perf_counter()
        rig.tracer.capture(child, 5).result(10)
        t2 = time.perf_counter()
        rig.tracer.finish(child, exit_code=i % 256).result(5)
        assert rig.tracer.reap(pid, child).result(5) == (i % 256) << 8
        return t1 - t0, t2 - t0
    cycle(0)                                              # warm up (the dump's hashes)
    gc.collect()                    # earlier tests' pipes, closed when collected, not ours
    fds, ghost_fds = fd_count(), fds_of(pid)
    times = [cycle(i) for i in range(1, 201)]
    rig.rec.wait(lambda: len(rig.rec.exits) == 201)
    gc.collect()
    assert zombies_of(pid) == [] and rig.tracer.ghosts() == [pid]
    assert list(ghosts.tracees) == [pid] and ghosts.tracees[pid].children == {}
    assert list(ghosts.park_rss) == [pid] and dump._held == {}
    assert fd_count() == fds and fds_of(pid) == ghost_fds and rig.rec.signals == []
    execs, both = [t[0] for t in times], [t[1] for t in times]
    print(f"\nexec_in median {statistics.median(execs) * 1e3:.2f} ms (90th "
          f"{sorted(execs)[180] * 1e3:.2f}); exec_in + capture median "
          f"{statistics.median(both) * 1e3:.2f} ms (90th {sorted(both)[180] * 1e3:.2f})")

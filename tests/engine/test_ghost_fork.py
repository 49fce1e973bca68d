"""A ghost's children (Tracer.fork, reap) and its new command line (Tracer.rename): what the
master does when a process forks, ends, is reaped or execs on a node. Real processes, real
ptrace (the rig: tests/engine/ghostrig.py).
"""

from __future__ import annotations

import errno
import os
import signal
import statistics
import subprocess
import threading
import time

import pytest

from bpfs.migrate import ghost_park as gp
from bpfs.migrate import seccomp
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.tracee import STEP_SIGNAL
from tests.engine.ghostrig import SLEEP, TRUE, Rig, asleep, gone, proc_state, until
from tests.engine.test_ghost import CAP_SYS_RESOURCE, drop_cap_in_this_thread, status_of

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]


def errno_of(fut) -> int:
    with pytest.raises(MigrateError) as exc:
        fut.result(5)
    return exc.value.errno


def ids(pid: int) -> tuple[str, ...]:
    """(ppid, uid line, gid line, pgid, sid) of `pid`."""
    st = status_of(pid)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return st["PPid"], st["Uid"], st["Gid"], fields[2], fields[3]


def read(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def ps_args(pid: int) -> str:
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True,
                          text=True, check=True).stdout.strip()


def zombies_of(pid: int) -> list[int]:
    """The children of `pid` (zombies included), from /proc/PID/task/*/children."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def end_and_reap(rig: Rig, parent: int, child: int, code: int) -> int:
    rig.tracer.finish(child, exit_code=code).result(5)
    return rig.tracer.reap(parent, child).result(5)


# ---- fork ----

def test_a_forked_ghost_is_a_child_of_its_ghost(rig: Rig, users) -> None:
    bob = users["bob"]
    pid, _ = rig.ghost([SLEEP, "100", "x y"], uid=bob.uid, gid=bob.gid)
    child = rig.tracer.fork(pid).result(5)
    assert asleep(child) and rig.tracer.ghosts() == sorted([pid, child])
    ppid, *rest = ids(child)
    assert ppid == str(pid) and rest == list(ids(pid)[1:])
    assert status_of(child)["Uid"].split()[0] == str(bob.uid)
    assert status_of(child)["TracerPid"] == status_of(pid)["TracerPid"]
    for name in ("cmdline", "comm", "environ"):
        assert read(child, name) == read(pid, name)
    with open(f"/proc/{child}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[35]) == signal.SIGCHLD  # exit_signal
    grandchild = rig.tracer.fork(child).result(5)   # a child's child
    assert ids(grandchild)[0] == str(child)
    assert rig.rec.signals == [] and rig.rec.exits == {}


def test_signals_to_a_forked_ghost_are_reported_with_its_pid(rig: Rig) -> None:
    pid, _ = rig.ghost([TRUE])          # /bin/true would exit at once if it ran
    child = rig.tracer.fork(pid).result(5)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        os.kill(child, sig)
        rig.rec.wait(lambda: (child, sig) in rig.rec.signals)
    assert rig.rec.signals == [(child, s) for s in (signal.SIGINT, signal.SIGTERM,
                                                     signal.SIGUSR1)]
    assert asleep(child) and asleep(pid)
    rig.tracer.kill(child).result(5)
    rig.rec.wait(lambda: child in rig.rec.exits)
    assert os.WTERMSIG(rig.tracer.reap(pid, child).result(5)) == signal.SIGKILL


def test_finish_then_reap_gives_the_status_and_leaves_no_zombie(rig: Rig) -> None:
    pid, _ = rig.ghost([SLEEP, "100"])
    child = rig.tracer.fork(pid).result(5)
    assert errno_of(rig.tracer.reap(pid, child)) == errno.EBUSY   # not ended yet
    rig.tracer.finish(child, exit_code=3).result(5)
    assert proc_state(child) == "Z" and zombies_of(pid) == [child]
    assert rig.tracer.reap(pid, child).result(5) == 3 << 8
    assert gone(child) and zombies_of(pid) == []
    assert rig.rec.exits == {child: 3 << 8}
    assert errno_of(rig.tracer.reap(pid, child)) == errno.ECHILD  # reaped already
    other = rig.tracer.fork(pid).result(5)
    rig.tracer.finish(other, signal=signal.SIGTERM).result(5)
    status = rig.tracer.reap(pid, other).result(5)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert asleep(pid) and rig.tracer.ghosts() == [pid] and rig.rec.signals == []
    rig.tracer.finish(pid, exit_code=0).result(5)
    assert rig.bpsh.status(pid) == 0


def test_a_reaped_child_is_reaped_by_its_parent_ghost_at_its_end(rig: Rig) -> None:
    """fork(reaped=True), a process forked on a node: once it has ended, however, the
    parent ghost reaps it by itself (in the stop of the SIGCHLD it gets), with nothing
    reported; a later reap finds nothing (ECHILD)."""
    pid, _ = rig.ghost([SLEEP, "100"])
    codes = {}
    for code in (3, 0, 255):
        child = rig.tracer.fork(pid, reaped=True).result(5)
        codes[child] = code << 8
        rig.tracer.finish(child, exit_code=code).result(5)
        assert until(lambda: zombies_of(pid) == [])
    killed = rig.tracer.fork(pid, reaped=True).result(5)
    rig.tracer.finish(killed, signal=signal.SIGTERM).result(5)
    assert until(lambda: zombies_of(pid) == [])
    assert errno_of(rig.tracer.reap(pid, killed)) == errno.ECHILD
    assert {c: s for c, s in rig.rec.exits.items() if c != killed} == codes
    assert os.WTERMSIG(rig.rec.exits[killed]) == signal.SIGTERM
    # many at once: their SIGCHLDs coalesce, every one is reaped all the same
    many = [rig.tracer.fork(pid, reaped=True).result(5) for _ in range(20)]
    for c in many:
        rig.tracer.finish(c, exit_code=1)
    assert until(lambda: zombies_of(pid) == [])
    time.sleep(0.1)
    assert rig.rec.signals == [] and asleep(pid) and rig.tracer.ghosts() == [pid]
    assert rig.tracer._ghosts.tracees[pid].children == {}


def test_a_reaped_child_of_a_stopped_ghost_is_reaped_and_it_stays_stopped(
        rig: Rig) -> None:
    pid, _ = rig.ghost([SLEEP, "100"])
    ghost = rig.tracer._ghosts.tracees[pid]
    child = rig.tracer.fork(pid, reaped=True).result(5)
    rig.tracer.set_stopped(pid, True, signal.SIGTSTP).result(5)
    assert until(lambda: proc_state(pid) == "t" and ghost.stopped)
    rig.tracer.finish(child, exit_code=4).result(5)
    assert until(lambda: zombies_of(pid) == [])
    time.sleep(0.05)
    assert proc_state(pid) == "t" and ghost.stopped
    rig.tracer.set_stopped(pid, False).result(5)
    assert asleep(pid) and rig.rec.signals == [] and rig.rec.exits == {child: 4 << 8}


def test_finish_soon_ends_a_ghost_at_its_signals_stop(rig: Rig) -> None:
    """finish_soon (no doorbell): the ghost ends with the exit code or signal asked, the
    STEP_SIGNAL that woke it is neither reported nor delivered; a user's STEP_SIGNAL is
    reported as any signal."""
    pid, _ = rig.ghost([SLEEP, "100"])
    a = rig.tracer.fork(pid, reaped=True).result(5)
    b = rig.tracer.fork(pid, reaped=True).result(5)
    rig.tracer.finish_soon(a, exit_code=9).result(5)
    rig.tracer.finish_soon(b, signal=signal.SIGTERM).result(5)
    assert until(lambda: zombies_of(pid) == [])
    assert rig.rec.exits[a] == 9 << 8 and os.WTERMSIG(rig.rec.exits[b]) == signal.SIGTERM
    c = rig.tracer.fork(pid, reaped=True).result(5)
    subprocess.run(["kill", f"-{STEP_SIGNAL}", str(c)], check=True)      # a user's
    rig.rec.wait(lambda: rig.rec.signals)
    assert rig.rec.signals == [(c, STEP_SIGNAL)] and asleep(c)
    assert errno_of(rig.tracer.finish_soon(c, exit_code=300)) == errno.EINVAL
    assert asleep(c) and rig.tracer.finish_soon(c, exit_code=0).result(5) is None
    assert rig.rec.exits[c] == 0 and rig.rec.signals == [(c, STEP_SIGNAL)]


def test_finish_soon_of_a_stopped_or_busy_ghost(rig: Rig) -> None:
    """A ghost held in a job-control stop cannot take STEP_SIGNAL's stop: its finish is
    done from the queue; one halted for a step (a fork of its own) meanwhile, after the
    step; many at once, each. A pid that is no parked ghost: as finish does."""
    pid, _ = rig.ghost([SLEEP, "100"])
    ghost = rig.tracer._ghosts.tracees[pid]
    child = rig.tracer.fork(pid, reaped=True).result(5)
    rig.tracer.set_stopped(child, True, signal.SIGTSTP).result(5)
    assert until(lambda: proc_state(child) == "t")
    rig.tracer.finish_soon(child, exit_code=5).result(5)
    assert rig.rec.exits[child] == 5 << 8
    for _ in range(20):
        busy = rig.tracer.fork(pid, reaped=True).result(5)
        more = rig.tracer.fork(busy, reaped=True)        # busy is halted for it, or
        done = rig.tracer.finish_soon(busy, exit_code=6)  # ends first (then ESRCH)
        done.result(5)
        assert rig.rec.exits[busy] == 6 << 8
        if more.exception(5) is None:
            rig.tracer.kill(more.result()).result(5)
        else:
            assert more.exception().errno == errno.ESRCH
    many = [rig.tracer.fork(pid, reaped=True).result(5) for _ in range(30)]
    for f in [rig.tracer.finish_soon(c, exit_code=i) for i, c in enumerate(many)]:
        f.result(5)
    assert [rig.rec.exits[c] for c in many] == [i << 8 for i in range(30)]
    assert until(lambda: zombies_of(pid) == [])
    assert [p for p, sig in rig.rec.signals if p != child or sig == STEP_SIGNAL] == []
    assert errno_of(rig.tracer.finish_soon(999999, exit_code=0)) == errno.ESRCH
    assert asleep(pid) and ghost.children == {}


def test_finish_soon_of_a_child_its_parent_reaps_ends_it_as_its_process_ended(
        rig: Rig) -> None:
    """A child ghost its parent reaps itself (a process forked on a node) ends with the
    process's own end, not a SIGKILL that would be cheaper: a pidfd of it taken on the
    master reads exit code 7 and SIGTERM after its parent has reaped it (Linux 6.15)."""
    pid, _ = rig.ghost([SLEEP, "100"])
    a, b = rig.tracer.fork(pid, reaped=True).result(5), rig.tracer.fork(pid, True).result(5)
    fds = [os.pidfd_open(a), os.pidfd_open(b)]
    try:
        rig.tracer.finish_soon(a, exit_code=7).result(5)
        rig.tracer.finish_soon(b, signal=signal.SIGTERM).result(5)
        assert until(lambda: zombies_of(pid) == [])
        assert until(lambda: None not in [seccomp.exit_status(fd) for fd in fds])
        assert [seccomp.exit_status(fd) for fd in fds] == [7 << 8, signal.SIGTERM]
    finally:
        for fd in fds:
            os.close(fd)
    assert rig.rec.exits[a] == 7 << 8 and rig.rec.exits[b] == signal.SIGTERM
    assert rig.rec.signals == [] and asleep(pid)


def test_a_request_queued_behind_a_busy_thread_waits_for_its_stop(rig: Rig,
                                                                   monkeypatch) -> None:
    """fork_soon or finish_soon while the thread is busy: its STEP_SIGNAL's stop waits,
    unseen, and the queue's copy of the request comes first; it waits for that stop and
    is done there, with no halt of the ghost."""
    pid, _ = rig.ghost([SLEEP, "100"])
    other, _ = rig.ghost([SLEEP, "100"])
    halts: list[int] = []
    real = gp.halt
    monkeypatch.setattr(gp, "halt", lambda p, sigs: (halts.append(p), real(p, sigs))[1])
    futs = []

    def busy() -> None:
        asker = threading.Thread(target=lambda: futs.extend(
            [rig.tracer.fork_soon(pid), rig.tracer.finish_soon(other, exit_code=4)]))
        asker.start()
        asker.join()
        time.sleep(0.05)        # both ghosts are in their STEP_SIGNAL's stop by now
    rig.tracer.submit(busy).result(5)
    child = futs[0].result(5)
    assert futs[1].result(5) is None and os.WEXITSTATUS(rig.bpsh.status(other)) == 4
    assert halts == [] and asleep(child) and asleep(pid) and rig.rec.signals == []
    t = rig.tracer._ghosts.tracees[pid]
    assert t.steps_sent == t.steps_met == 1


def test_fork_soon_makes_the_child_in_the_parents_signal_stop(rig: Rig) -> None:
    """fork_soon (no doorbell, no halt): a child ghost of the parent, asleep, its pid as
    fork's; many in a row, some while the parent is halted for another step or held in
    a job-control stop; nothing reported; every child reaped once finished."""
    pid, _ = rig.ghost([SLEEP, "100"])
    ghost = rig.tracer._ghosts.tracees[pid]
    kids = [rig.tracer.fork_soon(pid).result(5) for _ in range(20)]
    assert all(asleep(k) and ids(k)[0] == str(pid) for k in kids)
    together = [rig.tracer.fork_soon(pid) for _ in range(10)] + [rig.tracer.fork(pid, True)]
    kids += [f.result(5) for f in together]
    rig.tracer.set_stopped(pid, True, signal.SIGTSTP).result(5)
    assert until(lambda: proc_state(pid) == "t" and ghost.stopped)
    kids.append(rig.tracer.fork_soon(pid).result(5))
    assert until(lambda: proc_state(pid) == "t" and ghost.stopped)
    rig.tracer.set_stopped(pid, False).result(5)
    assert asleep(pid) and len(set(kids)) == len(kids) == 32
    for f in [rig.tracer.finish_soon(k, exit_code=2) for k in kids]:
        f.result(5)
    assert until(lambda: zombies_of(pid) == []) and rig.rec.signals == []
    assert errno_of(rig.tracer.fork_soon(999999)) == errno.ESRCH


def test_a_childs_sigchld_is_not_reported_but_a_users_is(rig: Rig) -> None:
    pid, _ = rig.ghost([SLEEP, "100"])
    children = [rig.tracer.fork(pid).result(5) for _ in range(3)]
    rig.tracer.set_stopped(children[0], True, signal.SIGTSTP).result(5)   # CLD_STOPPED
    assert until(lambda: proc_state(children[0]) == "t")
    rig.tracer.set_stopped(children[0], False).result(5)                  # CLD_CONTINUED
    assert asleep(children[0])
    for c in children:
        rig.tracer.finish(c, exit_code=1).result(5)                       # CLD_EXITED
    time.sleep(0.1)
    os.kill(pid, signal.SIGCHLD)                                          # the user's
    rig.rec.wait(lambda: rig.rec.signals)
    time.sleep(0.1)
    assert rig.rec.signals == [(pid, signal.SIGCHLD)]
    for c in children:   # reaps race with nothing now; SIGCHLDs during a reap: below
        assert rig.tracer.reap(pid, c).result(5) == 1 << 8


def test_sigchld_that_comes_while_the_parent_is_halted_is_not_reported(rig: Rig) -> None:
    """A child's end and its reap come together from the node: the SIGCHLD reaches the
    parent ghost while it is halted for a fork, a reap or its own end."""
    pid, _ = rig.ghost([SLEEP, "100"])
    for _ in range(50):
        a, b = rig.tracer.fork(pid).result(5), rig.tracer.fork(pid).result(5)
        fin = rig.tracer.finish(a, exit_code=2)
        more = rig.tracer.fork(pid)
        fin.result(5)
        assert rig.tracer.reap(pid, a).result(5) == 2 << 8
        rig.tracer.kill(b)
        c = more.result(5)
        rig.rec.wait(lambda: b in rig.rec.exits)
        rig.tracer.reap(pid, b).result(5)
        rig.tracer.finish(c, exit_code=0).result(5)
        rig.tracer.reap(pid, c).result(5)
    rig.tracer.finish(pid, exit_code=4).result(5)
    assert os.WEXITSTATUS(rig.bpsh.status(pid)) == 4
    assert [s for s in rig.rec.signals] == []


def test_an_orphan_ghost_needs_nothing_from_us(rig: Rig) -> None:
    """The parent ghost ends first: its child ghost is re-parented by the kernel (to init
    or a subreaper), and ends as any ghost; reap through the dead parent is ESRCH."""
    pid, _ = rig.ghost([SLEEP, "100"])
    child = rig.tracer.fork(pid).result(5)
    rig.tracer.finish(pid, exit_code=0).result(5)
    assert rig.bpsh.status(pid) == 0
    assert ids(child)[0] != str(pid) and asleep(child)
    os.kill(child, signal.SIGUSR1)
    rig.rec.wait(lambda: (child, signal.SIGUSR1) in rig.rec.signals)
    assert errno_of(rig.tracer.reap(pid, child)) == errno.ESRCH
    rig.tracer.finish(child, exit_code=7).result(5)
    rig.rec.wait(lambda: child in rig.rec.exits)
    assert rig.rec.exits[child] == 7 << 8
    assert until(lambda: gone(child))            # its new parent reaped it
    assert rig.tracer.ghosts() == [] and rig.tracer._ghosts.tracees == {}


def test_fork_is_refused_for_what_is_no_parked_ghost(rig: Rig) -> None:
    assert errno_of(rig.tracer.fork(2**22 + 1)) == errno.ESRCH
    seized = rig.bpsh.spawn([TRUE])   # seized, never exec'd: no ghost yet
    rig.tracer.seize(seized).result(5)
    assert errno_of(rig.tracer.fork(seized)) == errno.ESRCH
    assert errno_of(rig.tracer.fork(os.getpid())) == errno.ESRCH
    pid, _ = rig.ghost([TRUE])
    assert errno_of(rig.tracer.reap(pid, seized)) == errno.ECHILD
    assert errno_of(rig.tracer.reap(seized, pid)) == errno.ESRCH
    rig.tracer.kill(seized).result(5)
    assert rig.tracer.ghosts() == [pid] and asleep(pid) and rig.rec.signals == []


def test_a_fork_that_fails_puts_the_ghost_back_to_sleep(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from bpfs.migrate import ghost_park
    pid, _ = rig.ghost([SLEEP, "100"])
    monkeypatch.setattr(ghost_park, "FORK_FLAGS", 0x10000)   # CLONE_THREAD alone: EINVAL
    assert errno_of(rig.tracer.fork(pid)) == errno.EINVAL
    monkeypatch.undo()
    assert rig.tracer.ghosts() == [pid] and asleep(pid)
    child = rig.tracer.fork(pid).result(5)
    assert ids(child)[0] == str(pid)


def test_killing_the_parent_while_it_forks(rig: Rig) -> None:
    """SIGKILL at any moment of a fork: ESRCH, and no child is left behind."""
    for i in range(20):
        pid, _ = rig.ghost([TRUE])
        fut = rig.tracer.fork(pid)
        time.sleep(i * 0.00002)
        os.kill(pid, signal.SIGKILL)
        try:
            child = fut.result(5)
        except MigrateError as exc:
            assert exc.errno == errno.ESRCH
        else:
            rig.tracer.kill(child).result(5)
        rig.rec.wait(lambda: pid in rig.rec.exits)
        assert until(lambda: rig.tracer.ghosts() == [])
    # a child killed last may still have its end on the way to the tracer thread
    assert until(lambda: rig.tracer._ghosts.tracees == {})


def test_a_stopped_ghost_stays_stopped_through_fork_reap_rename_clone(rig: Rig) -> None:
    """A ghost held in a job-control stop (its real process was stopped: `set_stopped`) is
    halted out of it for a step and put back into it; a stop of ours still on its way when
    the step begins is neither reported nor lost."""
    pid, _ = rig.ghost([SLEEP, "100"])
    ghost = rig.tracer._ghosts.tracees[pid]
    rig.tracer.set_stopped(pid, True, signal.SIGTSTP).result(5)
    assert until(lambda: proc_state(pid) == "t" and ghost.stopped)
    child = rig.tracer.fork(pid).result(5)
    rig.tracer.finish(child, exit_code=1).result(5)
    assert rig.tracer.reap(pid, child).result(5) == 1 << 8
    rig.tracer.rename(pid, [b"stopped"]).result(5)
    [copy] = rig.tracer.clone(pid, 1).result(5)
    assert asleep(copy)
    time.sleep(0.05)
    assert proc_state(pid) == "t" and ghost.stopped
    rig.tracer.set_stopped(pid, False).result(5)
    assert asleep(pid)
    for _ in range(20):   # the stop and the fork come together
        rig.tracer.set_stopped(pid, True, signal.SIGTSTP)
        child = rig.tracer.fork(pid).result(5)
        assert until(lambda: proc_state(pid) == "t" and ghost.stopped)
        assert ghost.stop_sent == 0 and not ghost.stopping
        rig.tracer.set_stopped(pid, False)
        rig.tracer.kill(child).result(5)
        rig.tracer.reap(pid, child).result(5)
        assert until(lambda: proc_state(pid) == "S" and not ghost.stopped)
    assert rig.rec.signals == [] and zombies_of(pid) == []


# ---- rename ----

def test_rename_shows_the_new_argv(rig: Rig) -> None:
    pid, _ = rig.ghost([SLEEP, "100"])
    auxv = read(pid, "auxv")
    rig.tracer.rename(pid, [b"/usr/bin/some-long-program-name", b"-x", b"a b", b""]).result(5)
    assert read(pid, "cmdline") == b"/usr/bin/some-long-program-name\0-x\0a b\0\0"
    assert read(pid, "comm") == b"some-long-progr\n"
    assert ps_args(pid) == "/usr/bin/some-long-program-name -x a b"
    assert read(pid, "auxv") == auxv and asleep(pid)
    with open(f"/proc/{pid}/maps") as f:
        before = len(f.readlines())
    rig.tracer.rename(pid, [b"cc"]).result(5)      # the first rename's mapping is gone
    with open(f"/proc/{pid}/maps") as f:
        assert len(f.readlines()) <= before
    assert (read(pid, "cmdline"), read(pid, "comm")) == (b"cc\0", b"cc\n")
    child = rig.tracer.fork(pid).result(5)         # a child inherits it
    assert read(child, "cmdline") == b"cc\0"
    rig.tracer.rename(child, [b"ld", b"-o", b"x"]).result(5)
    assert (ps_args(child), ps_args(pid)) == ("ld -o x", "cc")
    os.kill(pid, signal.SIGUSR2)                   # still a ghost
    rig.rec.wait(lambda: (pid, signal.SIGUSR2) in rig.rec.signals)
    rig.tracer.finish(pid, exit_code=9).result(5)
    assert os.WEXITSTATUS(rig.bpsh.status(pid)) == 9


def test_a_users_ghost_is_renamed_by_a_master_without_cap_sys_resource(rig: Rig,
                                                                       users) -> None:
    bob = users["bob"]
    rig.tracer.submit(drop_cap_in_this_thread, CAP_SYS_RESOURCE).result(5)
    pid, _ = rig.ghost([SLEEP, "100"], uid=bob.uid, gid=bob.gid)
    argv = [b"/bin/echo", b"hello", b"world"] + [b"w%d" % i for i in range(2000)]
    rig.tracer.rename(pid, argv).result(5)
    assert read(pid, "cmdline") == b"\0".join(argv) + b"\0"
    assert read(pid, "comm") == b"echo\n"
    assert ps_args(pid).startswith("/bin/echo hello world w0 w1")
    assert rig.rec.signals == [] and asleep(pid)


def test_rename_refuses_a_bad_argv(rig: Rig) -> None:
    pid, _ = rig.ghost([SLEEP, "100"])
    for argv in ([], [b"a\0b"], ["text"], [b"x" * (128 * 1024)]):
        assert errno_of(rig.tracer.rename(pid, argv)) == errno.EINVAL
    assert errno_of(rig.tracer.rename(2**22 + 1, [b"x"])) == errno.ESRCH
    assert read(pid, "cmdline") == b"/bin/sleep\x00100\x00" and asleep(pid)


# ---- cost ----

def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def timed(fut_of, *args, **kw) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fut_of(*args, **kw).result(5)
    return out, time.perf_counter() - t0


@pytest.mark.timeout(120)
def test_a_thousand_forks_leave_nothing_behind(rig: Rig) -> None:
    """fork, finish, reap 1,000 times: no zombie, ghost, fd or tracer record left; and what
    each costs, submit -> result (docs/ghosts.md)."""
    pid, _ = rig.ghost([SLEEP, "100"])
    ghosts = rig.tracer._ghosts
    end_and_reap(rig, pid, rig.tracer.fork(pid).result(5), 0)   # warm up
    fds = fd_count()
    times: dict[str, list[float]] = {"fork": [], "finish": [], "reap": [], "rename": []}
    for i in range(1000):
        child, dt = timed(rig.tracer.fork, pid)
        times["fork"].append(dt)
        times["finish"].append(timed(rig.tracer.finish, child, exit_code=i % 256)[1])
        status, dt = timed(rig.tracer.reap, pid, child)
        times["reap"].append(dt)
        assert status == (i % 256) << 8
        if i % 10 == 0:
            times["rename"].append(timed(rig.tracer.rename, pid, [b"prog", b"%d" % i])[1])
    rig.rec.wait(lambda: len(rig.rec.exits) == 1001)
    assert zombies_of(pid) == [] and rig.tracer.ghosts() == [pid]
    assert list(ghosts.tracees) == [pid] and ghosts.tracees[pid].children == {}
    assert list(ghosts.park_rss) == [pid] and fd_count() == fds
    assert rig.rec.signals == [] and asleep(pid) and read(pid, "cmdline") == b"prog\0990\0"
    with open(f"/proc/{pid}/maps") as f:
        assert len(f.readlines()) <= 6   # one rename's mapping at a time
    print("\nsubmit -> result, median (90th percentile): " + ", ".join(
        f"{name} {statistics.median(ts) * 1e3:.3f} ms ({sorted(ts)[len(ts) * 9 // 10] * 1e3:.3f})"
        for name, ts in times.items()))
    # a bound that only a fault would break (a stuck tracer, a poll in the path), not a
    # speed target: that one is bench/pidspace.py's. 2.2 ms was seen on a loaded machine,
    # 0.3-0.5 ms quiet.
    assert statistics.median(times["fork"]) < 0.05


def test_fork_time_from_many_threads(rig: Rig) -> None:
    """Forks submitted by several threads at once (a master with many nodes): each one's
    submit -> result time, and the throughput of the tracer thread."""
    pid, _ = rig.ghost([SLEEP, "100"])
    times: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(100):
            t0 = time.perf_counter()
            child = rig.tracer.fork(pid).result(5)
            with lock:
                times.append(time.perf_counter() - t0)
            end_and_reap(rig, pid, child, 0)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    print(f"\n4 threads x 100 fork+finish+reap: {wall * 1e3:.0f} ms, fork median "
          f"{statistics.median(times) * 1e3:.3f} ms")
    assert len(times) == 400 and rig.tracer.ghosts() == [pid] and zombies_of(pid) == []

def test_a_shells_loop_of_forks_and_ends_leaves_nothing_behind(rig: Rig) -> None:
    """The master's pattern for a node's loop: fork_soon of the next child, and the end
    of the last one, asked together, the end often while the tracer thread still parks
    that child; 500 times: no zombie, tracer record,
    request or fd left, nothing reported, every end told as asked."""
    pid, _ = rig.ghost([SLEEP, "100"])
    ghosts = rig.tracer._ghosts
    fds = fd_count()
    prev = rig.tracer.fork_soon(pid).result(5)
    ends = []
    for i in range(500):
        nxt = rig.tracer.fork_soon(pid)
        ends.append((prev, rig.tracer.finish_soon(prev, exit_code=i % 256)))
        prev = nxt.result(5)
    ends.append((prev, rig.tracer.finish_soon(prev, exit_code=500 % 256)))
    for i, (child, f) in enumerate(ends):
        assert f.result(5) is None
    rig.rec.wait(lambda: len(rig.rec.exits) == 501)
    assert [rig.rec.exits[c] for c, _ in ends] == [(i % 256) << 8 for i in range(501)]
    # (the zombie goes inside the parent's wait4, its record right after it returns)
    assert until(lambda: zombies_of(pid) == [] and ghosts.tracees[pid].children == {})
    assert list(ghosts.tracees) == [pid] and rig.tracer.ghosts() == [pid]
    assert ghosts.ends == {} and not any(ghosts.forks.values())
    assert rig.rec.signals == [] and asleep(pid) and fd_count() <= fds   # (none of ours)

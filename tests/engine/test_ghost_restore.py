"""Back into the ghost (Tracer.restore_in): a process comes back to the master and runs in
its ghost, same PID, same parent, its end its parent's. Real processes, real ptrace (the
rig: tests/engine/ghostrig.py). Images at an entry point here; a process that had run, and
the cost: test_ghost_restore_moved.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

from bpfs.migrate import ghost_restore, procfs
from tests.engine.ghostrig import SLEEP, Rig, asleep, gone, proc_state, until
from tests.engine.test_ghost import CAP_SYS_RESOURCE, drop_cap_in_this_thread, status_of
from tests.engine.test_ghost_fork import errno_of, read

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="ghosts need root (ptrace)")]

ECHO = shutil.which("echo") or "/bin/echo"
SH = "/bin/sh"

class Pipe:
    """A pipe whose ends are closed at the end of the test."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def close_w(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def close(self) -> None:
        self.close_w()
        os.close(self.r)

    def line(self, timeout: float = 10) -> bytes:
        out = b""
        deadline = time.monotonic() + timeout
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                break
            out += os.read(self.r, 1)
        return out

    def rest(self) -> bytes:
        """To EOF (the write end closed here first)."""
        self.close_w()
        out = bytearray()
        while chunk := os.read(self.r, 65536):
            out += chunk
        return bytes(out)


@pytest.fixture
def pipes() -> Iterator[list[Pipe]]:
    made: list[Pipe] = []
    try:
        yield made
    finally:
        for p in made:
            p.close()


def pipe(pipes: list[Pipe]) -> Pipe:
    p = Pipe()
    pipes.append(p)
    return p


def ps(pid: int) -> tuple[str, str]:
    out = subprocess.run(["ps", "-o", "comm=", "-o", "args=", "-p", str(pid)],
                         capture_output=True, text=True, check=True).stdout.split(None, 1)
    return out[0], out[1].strip()


def limits_of(pid: int) -> dict[int, tuple[int, int]]:
    """(soft, hard) by resource, from /proc (prlimit() would need CAP_SYS_RESOURCE)."""
    return {r: (s, h) for r, s, h in procfs.parse_limits(read(pid, "limits").decode())}


def unchanged(pid: int, before: tuple) -> bool:
    return snapshot(pid) == before and asleep(pid)


def snapshot(pid: int) -> tuple:
    return (read(pid, "maps"), read(pid, "cmdline"), read(pid, "comm"),
            sorted(os.listdir(f"/proc/{pid}/fd")), status_of(pid)["SigCgt"])


# ---- a program runs in its ghost ----

def test_echo_runs_in_its_ghost_and_its_parent_sees_its_end(rig: Rig, pipes) -> None:
    pid, img = rig.ghost([ECHO, "hello", "world"])
    out = pipe(pipes)
    rig.tracer.restore_in(pid, img, {1: out.w}).result(10)
    assert out.rest() == b"hello world\n"
    assert rig.bpsh.status(pid) == 0
    assert rig.tracer.ghosts() == [] and rig.rec.exits == {} and rig.rec.signals == []


def test_a_restored_process_is_a_normal_process(rig: Rig) -> None:
    """Its name, command line, dispositions and cwd are the image's (the ghost was renamed,
    ignored SIGTERM and SIGHUP, and sat in another cwd); PID, parent, group, the ghost's."""
    pid, img = rig.ghost([SLEEP, "30"], cwd="/tmp", ignore=[signal.SIGTERM, signal.SIGHUP])
    ppid, pgid = status_of(pid)["PPid"], os.getpgid(pid)
    fds = sorted(os.listdir(f"/proc/{pid}/fd"))
    rig.tracer.rename(pid, [b"other", b"name"]).result(5)
    img = dataclasses.replace(img, cwd="/usr", sigactions=[
        s for s in img.sigactions if s[0] != signal.SIGTERM])
    rig.tracer.restore_in(pid, img).result(10)
    st = status_of(pid)
    assert st["TracerPid"] == "0" and st["PPid"] == ppid and os.getpgid(pid) == pgid
    assert ps(pid) == ("sleep", "/bin/sleep 30")
    assert read(pid, "comm") == b"sleep\n" and read(pid, "cmdline") == b"/bin/sleep\x0030\0"
    assert os.readlink(f"/proc/{pid}/cwd") == "/usr" and asleep(pid)
    assert int(st["SigIgn"], 16) == 1 << (signal.SIGHUP - 1)
    assert sorted(os.listdir(f"/proc/{pid}/fd")) == fds      # nothing left of the channel
    assert rig.tracer.ghosts() == []
    os.kill(pid, signal.SIGTERM)                  # not a ghost: nothing is intercepted
    status = rig.bpsh.status(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert rig.rec.signals == [] and rig.rec.exits == {}


def test_another_processes_image_with_other_vdso_addresses(rig: Rig) -> None:
    """The image of another process (its own ASLR: vdso, stack, libraries elsewhere) runs
    in the ghost: vvar/vdso moved to the image's addresses; the ghost's exe link stays
    (a new one would need CAP_CHECKPOINT_RESTORE)."""
    pid, _ = rig.ghost([ECHO, "never"])
    other, img = rig.ghost([SLEEP, "30"])
    vdso = lambda p: [ln for ln in read(p, "maps").splitlines() if b"[vdso]" in ln]  # noqa
    assert vdso(pid) != vdso(other)
    rig.tracer.restore_in(pid, img).result(10)
    assert asleep(pid) and vdso(pid) == vdso(other)
    assert ps(pid) == ("sleep", "/bin/sleep 30")
    assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath(ECHO)
    os.kill(pid, signal.SIGTERM)
    assert os.WTERMSIG(rig.bpsh.status(pid)) == signal.SIGTERM
    rig.tracer.kill(other).result(5)


def test_a_copy_of_a_ghost(rig: Rig, pipes) -> None:
    """A copy made by `clone` (vexecmove's ranks) comes back as any ghost; its original
    stays a ghost."""
    pid, img = rig.ghost([ECHO, "rank"])
    copy = rig.tracer.clone(pid, 1).result(5)[0]
    out = pipe(pipes)
    rig.tracer.restore_in(copy, img, {1: out.w}).result(10)
    assert out.rest() == b"rank\n" and rig.bpsh.status(copy) == 0
    assert rig.tracer.ghosts() == [pid] and asleep(pid)
    rig.tracer.finish(pid, exit_code=0).result(5)
    assert rig.bpsh.status(pid) == 0


def test_a_python_program(rig: Rig, pipes) -> None:
    code = "import sys, json; print('py', sum(range(10)), json.dumps(sys.argv[1:])); sys.exit(5)"
    pid, img = rig.ghost([sys.executable, "-c", code, "a b", "c"])
    out = pipe(pipes)
    rig.tracer.restore_in(pid, img, {1: out.w, 2: out.w}).result(10)
    assert out.rest() == b'py 45 ["a b", "c"]\n'
    assert rig.bpsh.status(pid) == 5 << 8


def test_a_users_ghost_under_a_tracer_without_cap_sys_resource(rig: Rig, users, pipes
                                                                ) -> None:
    bob = users["bob"]
    rig.tracer.submit(drop_cap_in_this_thread, CAP_SYS_RESOURCE).result(5)
    pid, img = rig.ghost([SH, "-c", "id -u; echo $0 $1", "x", "y"], uid=bob.uid,
                         gid=bob.gid)
    out = pipe(pipes)
    rig.tracer.restore_in(pid, img, {1: out.w}).result(10)
    assert out.rest() == f"{bob.uid}\nx y\n".encode()
    assert rig.bpsh.status(pid) == 0


def test_an_execute_only_program_of_a_user(rig: Rig, users) -> None:
    """Mode 0711: bob may run it, not read it; the tracer, not bob, opens it for the
    mapping, and the process stays not dumpable (its /proc files root's)."""
    bob = users["bob"]
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        prog = os.path.join(d, "sleep")
        shutil.copy(SLEEP, prog)
        os.chmod(prog, 0o711)
        pid, img = rig.ghost([prog, "30"], uid=bob.uid, gid=bob.gid)
        assert not img.dumpable
        rig.tracer.restore_in(pid, img).result(10)
        assert asleep(pid) and status_of(pid)["TracerPid"] == "0"
        assert status_of(pid)["Uid"].split()[0] == str(bob.uid)
        assert os.stat(f"/proc/{pid}/mem").st_uid == 0   # not dumpable
        os.kill(pid, signal.SIGTERM)
        assert os.WTERMSIG(rig.bpsh.status(pid)) == signal.SIGTERM


def test_pending_signals_and_mask(rig: Rig) -> None:
    """The image's pending signals are pending again (a blocked one stays pending, a
    SIGSTOP stops it), its mask is its mask."""
    pid, img = rig.ghost([SLEEP, "30"])
    usr2 = 1 << (signal.SIGUSR2 - 1)
    rig.tracer.restore_in(pid, dataclasses.replace(
        img, pending=[signal.SIGUSR2, signal.SIGSTOP], sigmask=usr2)).result(10)
    assert until(lambda: proc_state(pid) == "T")
    st = status_of(pid)
    assert int(st["SigBlk"], 16) == usr2 and st["TracerPid"] == "0"
    assert (int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)) == usr2
    os.kill(pid, signal.SIGCONT)
    assert asleep(pid)
    os.kill(pid, signal.SIGKILL)
    assert os.WTERMSIG(rig.bpsh.status(pid)) == signal.SIGKILL


def test_limits_nice_and_a_cwd_that_is_not_here(rig: Rig, users) -> None:
    """A limit lowered on the node comes back lowered; one above the ghost's hard limit is
    clamped (raising it would need CAP_SYS_RESOURCE); a higher nice is taken, a lower one
    is not (a user may not); a cwd the master lacks leaves the ghost's."""
    bob = users["bob"]
    pid, img = rig.ghost([SLEEP, "30"], uid=bob.uid, gid=bob.gid, cwd="/tmp")
    have = {r: (s, h) for r, s, h in img.rlimits}
    mq = resource.RLIMIT_MSGQUEUE
    assert have[resource.RLIMIT_NOFILE][1] > 200 and have[mq][1] < 2**40
    limits = [(r, s, h) for r, s, h in img.rlimits if r not in (resource.RLIMIT_NOFILE, mq)]
    limits += [(resource.RLIMIT_NOFILE, 100, 200), (mq, 2**40, 2**40)]
    rig.tracer.restore_in(pid, dataclasses.replace(
        img, rlimits=limits, nice=7, cwd="/nonexistent")).result(10)
    assert limits_of(pid)[resource.RLIMIT_NOFILE] == (100, 200)
    assert limits_of(pid)[mq] == (have[mq][1], have[mq][1])
    assert os.getpriority(os.PRIO_PROCESS, pid) == 7
    assert os.readlink(f"/proc/{pid}/cwd") == "/tmp"
    os.kill(pid, signal.SIGKILL)
    rig.bpsh.status(pid)
    pid, img = rig.ghost([SLEEP, "30"], uid=bob.uid, gid=bob.gid)
    os.setpriority(os.PRIO_PROCESS, pid, 3)
    rig.tracer.restore_in(pid, dataclasses.replace(img, nice=-5)).result(10)
    assert os.getpriority(os.PRIO_PROCESS, pid) == 3
    os.kill(pid, signal.SIGKILL)
    rig.bpsh.status(pid)


def test_fds_are_installed_at_their_numbers(rig: Rig, pipes) -> None:
    """fd 1 replaced, two more installed at numbers the received copies land on
    (swapped: each target is the other's temporary number)."""
    probe, img = rig.ghost([SH, "-c", "x"])
    first = 3 + len(img.files)            # where the received copies land: 0-2 are taken
    rig.tracer.kill(probe).result(5)
    assert first + 1 <= 9
    one, a, b = pipe(pipes), pipe(pipes), pipe(pipes)
    fds = {1: one.w, first + 1: a.w, first: b.w, 2: one.w}
    script = f"echo one; echo A >&{first + 1}; echo B >&{first}; echo err >&2"
    pid, img = rig.ghost([SH, "-c", script])
    rig.tracer.restore_in(pid, img, fds).result(10)
    assert one.rest() == b"one\nerr\n" and a.rest() == b"A\n" and b.rest() == b"B\n"
    assert rig.bpsh.status(pid) == 0


def test_a_restored_parent_waits_for_its_child_ghost(rig: Rig, pipes) -> None:
    """A process forked on a node (its child ghost stays) comes back: it is the child's
    parent, and its wait gets the child's end."""
    code = "import os; pid, st = os.wait(); print(pid, st, flush=True)"
    pid, img = rig.ghost([sys.executable, "-c", code], env={"LC_ALL": "C"})
    child = rig.tracer.fork(pid).result(5)
    out = pipe(pipes)
    rig.tracer.restore_in(pid, img, {1: out.w}).result(10)
    assert rig.tracer.ghosts() == [child] and status_of(child)["PPid"] == str(pid)
    assert until(lambda: proc_state(pid) == "S")
    rig.tracer.finish(child, exit_code=3).result(5)
    assert out.rest() == f"{child} {3 << 8}\n".encode()
    assert rig.bpsh.status(pid) == 0 and gone(child)
    assert errno_of(rig.tracer.reap(pid, child)) == errno.ESRCH


# ---- refusals: the ghost stays a ghost ----

def test_an_image_of_another_user_is_refused(rig: Rig, users) -> None:
    pid, img = rig.ghost([SLEEP, "30"])
    before = snapshot(pid)
    bob = users["bob"]
    for other in (dataclasses.replace(img, uid=bob.uid), dataclasses.replace(img, gid=bob.gid)):
        assert errno_of(rig.tracer.restore_in(pid, other)) == errno.EPERM
        assert unchanged(pid, before) and rig.tracer.ghosts() == [pid]
    os.kill(pid, signal.SIGUSR1)                  # still a ghost
    rig.rec.wait(lambda: (pid, signal.SIGUSR1) in rig.rec.signals)
    rig.tracer.kill(pid).result(5)
    assert os.WTERMSIG(rig.bpsh.status(pid)) == signal.SIGKILL


def test_a_file_changed_since_is_estale(rig: Rig) -> None:
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        prog = os.path.join(d, "echo")
        shutil.copy(ECHO, prog)
        pid, img = rig.ghost([prog, "x"])
        before = snapshot(pid)
        with open(prog + ".new", "wb") as f:
            f.write(open(ECHO, "rb").read() + b"\0")
        os.chmod(prog + ".new", 0o755)
        os.rename(prog + ".new", prog)            # the path names other content now
        assert errno_of(rig.tracer.restore_in(pid, img)) == errno.ESTALE
        assert unchanged(pid, before)
        os.unlink(prog)
        assert errno_of(rig.tracer.restore_in(pid, img)) == errno.ESTALE
        assert unchanged(pid, before) and rig.tracer.ghosts() == [pid]
        rig.tracer.finish(pid, exit_code=3).result(5)
        assert rig.bpsh.status(pid) == 3 << 8


def test_a_file_the_user_may_not_run_here_is_eacces_and_undone(rig: Rig, users,
                                                                pipes) -> None:
    """The check in the ghost comes after the files went in: they are closed again and
    the scratch area unmapped; then, allowed, the same image restores."""
    bob = users["bob"]
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        prog = os.path.join(d, "echo")
        shutil.copy(ECHO, prog)
        pid, img = rig.ghost([prog, "ok"], uid=bob.uid, gid=bob.gid)
        before = snapshot(pid)
        os.chmod(prog, 0o700)
        assert errno_of(rig.tracer.restore_in(pid, img)) == errno.EACCES
        assert unchanged(pid, before)
        os.chmod(prog, 0o755)
        out = pipe(pipes)
        rig.tracer.restore_in(pid, img, {1: out.w}).result(10)
        assert out.rest() == b"ok\n" and rig.bpsh.status(pid) == 0


def test_limits_that_refuse_the_image_leave_the_ghost(rig: Rig) -> None:
    """The ghost's own limits: an address space too small (checked before it is touched:
    ENOMEM), too few fds for the files (the socket pair or the files refused in it:
    EMFILE, what came in closed again)."""
    pid, img = rig.ghost([sys.executable, "-c", "pass"], env={"LC_ALL": "C"})
    before = snapshot(pid)
    hard_as = resource.prlimit(pid, resource.RLIMIT_AS)[1]
    hard_nofile = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_AS, (8 << 20, hard_as))      # root's own: allowed
    assert errno_of(rig.tracer.restore_in(pid, img)) == errno.ENOMEM
    resource.prlimit(pid, resource.RLIMIT_AS, (hard_as, hard_as))
    for nofile in (4, 6):              # no room for the pair; no room for the files
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (nofile, hard_nofile))
        assert errno_of(rig.tracer.restore_in(pid, img)) == errno.EMFILE
        assert unchanged(pid, before) and rig.tracer.ghosts() == [pid]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, hard_nofile))
    rig.tracer.restore_in(pid, img).result(10)
    assert os.WEXITSTATUS(rig.bpsh.status(pid)) == 0


def test_bad_arguments_and_states(rig: Rig, pipes) -> None:
    pid, img = rig.ghost([SLEEP, "30"])
    before = snapshot(pid)
    ri = rig.tracer.restore_in
    assert errno_of(ri(2**22 + 1, img)) == errno.ESRCH
    assert errno_of(ri(pid, "not an image")) == errno.EINVAL
    assert errno_of(ri(pid, img, {1: "x"})) == errno.EINVAL
    assert errno_of(ri(pid, img, {-1: 1})) == errno.EINVAL
    assert errno_of(ri(pid, img, [1, 2])) == errno.EINVAL
    out = pipe(pipes)
    out.close_w()
    w, out.w = os.pipe()[1], -1
    os.close(w)
    assert errno_of(ri(pid, img, {1: w})) == errno.EBADF
    assert unchanged(pid, before)
    rig.tracer.set_stopped(pid, True).result(5)
    # in its group-stop (held with PTRACE_LISTEN: "t"); a loaded machine may take a while
    assert until(lambda: proc_state(pid) in ("t", "T"), timeout=15), proc_state(pid)
    assert errno_of(ri(pid, img)) == errno.EBUSY      # job-control stop: EBUSY
    rig.tracer.set_stopped(pid, False).result(5)
    assert asleep(pid)
    rig.tracer.restore_in(pid, img).result(10)
    assert rig.tracer.ghosts() == [] and status_of(pid)["TracerPid"] == "0"
    os.kill(pid, signal.SIGKILL)
    assert os.WTERMSIG(rig.bpsh.status(pid)) == signal.SIGKILL


def test_a_failure_past_the_point_of_no_return_kills_it(rig: Rig,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    pid, img = rig.ghost([SLEEP, "30"])
    real = ghost_restore.rebuild.process_state

    def broken(a, image):
        real(a, image)
        a.call("close", 99999)                   # EBADF in batch A
    monkeypatch.setattr(ghost_restore.rebuild, "process_state", broken)
    assert errno_of(rig.tracer.restore_in(pid, img)) == errno.EBADF
    status = rig.bpsh.status(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    rig.rec.wait(lambda: pid in rig.rec.exits)
    assert rig.tracer.ghosts() == [] and gone(pid)

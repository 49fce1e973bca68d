"""Running processes dumped where they are and restored on a loop node (bpfs.migrate.running):
state and output go on, open files from their offsets, sleeps again; what cannot move is
refused EBUSY and the process runs on as if nothing happened."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import tempfile
import time

import pytest
from hypothesis import given, settings, strategies as st

from bpfs.errors import BpfsError
from bpfs.migrate import dump, running
from bpfs.migrate import ptrace as pt
from bpfs.migrate.running import image_registers
from tests.engine.running_rig import PY, counted, counter, dump_stopped, restore, started

pytestmark = pytest.mark.timeout(30)


def test_a_python_program_goes_on_counting_after_its_move(node, tmp_path) -> None:
    out = str(tmp_path / "out")
    with started(counter(25, 0.02), out) as prog:
        prog.wait_lines(5)
        img = dump_stopped(prog.pid)
        running.discard(prog.pid)
        before = len(prog.lines())
    assert img.open_files == []
    rep = restore(node, img, out)
    assert rep["status"] == 0
    lines = open(out).read().splitlines()
    assert counted(lines, 25) and 5 <= before < 25


def test_a_c_program_asleep_in_nanosleep_sleeps_again_on_the_node(node, tmp_path) -> None:
    """/bin/sleep's relative nanosleep is run again from its start (documented)."""
    out = str(tmp_path / "out")
    with started(["/bin/sleep", "0.4"], out) as prog:
        time.sleep(0.1)
        img = dump_stopped(prog.pid)
        running.discard(prog.pid)
    regs = img.registers()
    assert regs.rax == regs.orig_rax == 230      # clock_nanosleep, to run again
    t0 = time.monotonic()
    assert restore(node, img, out)["status"] == 0
    assert 0.35 < time.monotonic() - t0 < 5


READER = ("import os, sys, time\n"
          "src = os.open(sys.argv[1], os.O_RDONLY)\n"
          "os.set_inheritable(src, True)\n"
          "log = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND)\n"
          "copy = os.open(sys.argv[3], os.O_WRONLY | os.O_CLOEXEC)\n"
          "while rec := os.read(src, 8):\n"
          "    os.write(log, rec)\n"
          "    os.write(copy, rec)\n"
          "    print(rec.decode().strip(), flush=True)\n"
          "    time.sleep(0.01)\n"
          "print('uid', os.getuid(), flush=True)\n")


def _reader_files(d: str) -> tuple[str, str, str]:
    src, log, copy = (os.path.join(d, n) for n in ("src", "log", "copy"))
    with open(src, "w") as f:
        f.write("".join(f"{i:07d}\n" for i in range(1, 41)))
    with open(log, "w") as f:
        f.write("log start\n")
    open(copy, "w").close()
    return src, log, copy


def test_open_files_go_on_from_their_offsets(node, tmp_path) -> None:
    """A file read 8 bytes at a time, one appended to, one written at its offset."""
    src, log, copy = _reader_files(str(tmp_path))
    out = str(tmp_path / "out")
    with started([PY, "-S", "-c", READER, src, log, copy], out) as prog:
        prog.wait_lines(5)
        img = dump_stopped(prog.pid)
        running.discard(prog.pid)
    done = len(open(out).read().splitlines())
    fds = {f.fd: f for f in img.open_files}
    assert [fds[3].path, fds[4].path, fds[5].path] == [src, log, copy]
    assert fds[3].offset == fds[5].offset == 8 * done
    assert fds[4].flags & os.O_APPEND and fds[5].flags & os.O_CLOEXEC
    assert not fds[3].flags & os.O_CLOEXEC
    assert restore(node, img, out)["status"] == 0
    records = "".join(f"{i:07d}\n" for i in range(1, 41))
    assert open(out).read() == records + "uid 0\n"
    assert open(log).read() == "log start\n" + records
    assert open(copy).read() == records


def test_a_directory_and_dev_null_travel_a_deleted_file_does_not(tmp_path) -> None:
    prog_text = ("import os, sys, time\n"
                 "os.open('/dev/null', os.O_RDWR)\n"
                 "os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
                 "fd = os.open(sys.argv[1] + '/gone', os.O_RDWR | os.O_CREAT)\n"
                 "print('ready', flush=True)\n"
                 "os.unlink(sys.argv[1] + '/gone') if sys.argv[2] == 'unlink' else None\n"
                 "time.sleep(20)\n")
    for how in ("keep", "unlink"):
        out = str(tmp_path / f"out-{how}")
        with started([PY, "-S", "-c", prog_text, str(tmp_path), how], out) as prog:
            prog.wait_lines(1)
            time.sleep(0.05)
            if how == "keep":
                img = dump_stopped(prog.pid)
                assert [(f.fd, f.path) for f in img.open_files] == [
                    (3, "/dev/null"), (4, str(tmp_path)), (5, str(tmp_path / "gone"))]
                assert img.open_files[1].flags & os.O_DIRECTORY
            else:
                with pytest.raises(BpfsError) as err:
                    dump_stopped(prog.pid)
                assert err.value.errno == errno.EBUSY
                assert "fd 5 is a deleted file" in err.value.message


def test_stdio_files_travel_when_they_are_not_links(node, tmp_path) -> None:
    """fds 0-2 that are files (not the caller's links) are carried and replace those given."""
    out = str(tmp_path / "out")
    with started(counter(20, 0.02), out) as prog:
        prog.wait_lines(3)
        img = dump_stopped(prog.pid, links=frozenset())
        running.discard(prog.pid)
    assert [(f.fd, f.path) for f in img.open_files] == [(0, "/dev/null"), (1, out), (2, out)]
    other = str(tmp_path / "other")
    open(other, "w").close()
    assert restore(node, img, other)["status"] == 0
    assert counted(open(out).read().splitlines(), 20) and open(other).read() == ""


def test_a_job_stopped_by_sigstop_is_refused_and_stays_stopped(tmp_path) -> None:
    with started(counter(20, 0.02), str(tmp_path / "out")) as prog:
        prog.wait_lines(2)
        os.kill(prog.pid, signal.SIGSTOP)
        _wait_state(prog.pid, "T")
        with pytest.raises(BpfsError) as err:
            dump_stopped(prog.pid)
        assert err.value.errno == errno.EBUSY and "stopped by job control (SIGSTOP)" in \
            err.value.message
        running.release(prog.pid)
        time.sleep(0.1)
        assert _state(prog.pid) == "T"
        os.kill(prog.pid, signal.SIGCONT)
        assert prog.end() == 0 and counted(prog.lines(), 20)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: str) -> None:
    deadline = time.monotonic() + 5
    while _state(pid) != want:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _refused_and_runs_on(prog) -> str:
    """The dump is refused EBUSY; released, the program counts on to its end. The message."""
    with pytest.raises(BpfsError) as err:
        dump_stopped(prog.pid)
    assert err.value.errno == errno.EBUSY, err.value.message
    running.release(prog.pid)
    assert prog.end() == 0
    assert counted(prog.lines(), 20)
    return err.value.message


THREADED = ("import threading, time, sys\n"
            "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "sys.argv = sys.argv[1:]\n"
            "exec(sys.argv[0])\n")


def test_threads_are_refused_and_the_process_runs_on(tmp_path) -> None:
    from tests.engine.running_rig import COUNTER
    out = str(tmp_path / "out")
    with started([PY, "-S", "-c", THREADED, COUNTER, "20", "0.02"], out) as prog:
        prog.wait_lines(3)
        assert "has 2 threads" in _refused_and_runs_on(prog)


def test_a_pipe_is_refused_naming_it_and_the_process_runs_on(tmp_path) -> None:
    from tests.engine.running_rig import COUNTER
    piped = "import os, sys\nr, w = os.pipe()\nsys.argv = sys.argv[1:]\nexec(sys.argv[0])\n"
    out = str(tmp_path / "out")
    with started([PY, "-S", "-c", piped, COUNTER, "20", "0.02"], out) as prog:
        prog.wait_lines(3)
        message = _refused_and_runs_on(prog)
        assert message.startswith("fd 3 is a pipe (pipe:[") and message.endswith(
            "]): it cannot move")


def test_release_alone_changes_nothing(tmp_path) -> None:
    """A dump then a release (a move that failed): the count goes on unchanged, registers
    and all; a sleep stopped in its middle still ends on time (the kernel's restart)."""
    out = str(tmp_path / "out")
    with started(counter(20, 0.02), out) as prog:
        prog.wait_lines(4)
        running.seize_running(prog.pid)
        running.stop(prog.pid)
        regs = pt.getregs(prog.pid)
        running.dump_running(prog.pid, {0, 1, 2})
        assert bytes(pt.getregs(prog.pid)) == bytes(regs)
        running.release(prog.pid)
        assert prog.end() == 0 and counted(prog.lines(), 20)
    with started(["/bin/sleep", "0.5"], str(tmp_path / "sleep")) as prog:
        t0 = time.monotonic()
        time.sleep(0.1)
        running.seize_running(prog.pid)
        running.stop(prog.pid)
        running.dump_running(prog.pid, {0, 1, 2})
        time.sleep(0.2)
        running.release(prog.pid)
        assert prog.end() == 0
        assert 0.45 < time.monotonic() - t0 < 0.75     # not 0.8: the sleep kept its end


def test_signals_sent_while_stopped_are_delivered_after_release(tmp_path) -> None:
    out = str(tmp_path / "out")
    with started(counter(20, 0.02), out) as prog:
        prog.wait_lines(3)
        running.seize_running(prog.pid)
        running.stop(prog.pid)
        os.kill(prog.pid, signal.SIGUSR1)
        running.dump_running(prog.pid, {0, 1, 2})
        os.kill(prog.pid, signal.SIGUSR1)
        running.release(prog.pid)
        assert prog.end() == 0
        assert prog.lines().count("usr1") == 1 and counted(prog.lines(), 20)


def test_signals_sent_while_stopped_travel_in_the_image(node, tmp_path) -> None:
    out = str(tmp_path / "out")
    with started(counter(20, 0.02), out) as prog:
        prog.wait_lines(3)
        running.seize_running(prog.pid)
        running.stop(prog.pid)
        os.kill(prog.pid, signal.SIGUSR1)
        img = running.dump_running(prog.pid, {0, 1, 2})
        running.discard(prog.pid)
    assert signal.SIGUSR1 in img.pending
    assert restore(node, img, out)["status"] == 0
    lines = open(out).read().splitlines()
    assert lines.count("usr1") == 1 and counted(lines, 20)


SEIZER = ("import ctypes, sys, time\n"
          "assert ctypes.CDLL(None).ptrace(0x4206, int(sys.argv[1]), 0, 0) == 0\n"
          "print('seized', flush=True)\n"
          "time.sleep(30)\n")


def test_a_process_traced_already_is_refused_and_a_gone_one_is_esrch(tmp_path) -> None:
    with started(counter(200, 0.02), str(tmp_path / "out")) as prog:
        other = subprocess.Popen([PY, "-S", "-c", SEIZER, str(prog.pid)],
                                 stdout=subprocess.PIPE)
        try:
            assert other.stdout.readline() == b"seized\n"
            with pytest.raises(BpfsError) as err:
                running.seize_running(prog.pid)
            assert err.value.errno == errno.EBUSY
            assert f"is traced by process {other.pid}" in err.value.message
        finally:
            other.kill()
            other.wait()
            other.stdout.close()
        running.seize_running(prog.pid)   # its tracer gone, it is free again
        running.release(prog.pid)
        n = len(prog.lines())
        prog.wait_lines(n + 2)            # and counts on
    with pytest.raises(BpfsError) as err:
        running.seize_running(prog.pid)
    assert err.value.errno == errno.ESRCH


@pytest.fixture
def alices_dir(users):
    d = tempfile.mkdtemp(prefix="bpfs-running-")
    os.chmod(d, 0o700)
    os.chown(d, users["alice"].uid, users["alice"].gid)
    try:
        yield d
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def test_a_users_process_restores_as_that_user_and_opens_files_as_her(node, users,
                                                                     alices_dir) -> None:
    alice, bob = users["alice"], users["bob"]
    src, log, copy = _reader_files(alices_dir)
    out = os.path.join(alices_dir, "out")
    open(out, "w").close()
    for path in (src, log, copy, out):
        os.chown(path, alice.uid, alice.gid)
        os.chmod(path, 0o600)
    with started([PY, "-S", "-c", READER, src, log, copy], out, user=alice) as prog:
        prog.wait_lines(5)
        img = dump_stopped(prog.pid)
        running.discard(prog.pid)
    assert (img.uid, img.gid) == (alice.uid, alice.gid)
    with pytest.raises(BpfsError) as err:
        restore(node, img, out, user=bob)
    assert err.value.errno == errno.EACCES
    assert "opening " in err.value.message and alices_dir in err.value.message
    os.rename(copy, copy + ".moved")
    with pytest.raises(BpfsError) as err:
        restore(node, img, out, user=alice)
    assert err.value.errno == errno.ENOENT and f"opening {copy} as fd 5" in err.value.message
    os.rename(copy + ".moved", copy)
    assert restore(node, img, out, user=alice)["status"] == 0
    records = "".join(f"{i:07d}\n" for i in range(1, 41))
    assert open(out).read() == records + f"uid {alice.uid}\n"
    assert open(copy).read() == records
    assert os.stat(log).st_uid == alice.uid


# ---- the registers an image resumes with (no process needed) ----

def _regs(rax: int, orig_rax: int, rip: int = 0x401002) -> pt.Regs:
    r = pt.Regs()
    r.rax, r.orig_rax, r.rip, r.rdi = rax % 2**64, orig_rax % 2**64, rip, 7
    return r


@pytest.mark.parametrize("code", [512, 513, 514, 516])
def test_an_interrupted_syscall_runs_again_from_its_start(code: int) -> None:
    got = image_registers(_regs(-code, 230))
    assert (got.rax, got.rip, got.rdi) == (230, 0x401000, 7)


def test_a_restarted_syscall_whose_number_is_lost_returns_eintr() -> None:
    got = image_registers(_regs(-516, 219))
    assert (got.rax, got.rip) == (2**64 - errno.EINTR, 0x401002)


@pytest.mark.parametrize("rax, orig", [(-512, -1), (5, 0), (-errno.EINTR, 7), (0, 230)])
def test_other_stops_resume_as_they_are(rax: int, orig: int) -> None:
    regs = _regs(rax, orig)
    assert bytes(image_registers(regs)) == bytes(regs)


# ---- the dump's zero-block scan against the plain one ----

def _buffer(data: bytes) -> mmap.mmap:
    """`data` in an mmap with a page of slack, as ptrace.populated makes (gh-105235)."""
    buf = mmap.mmap(-1, len(data) + mmap.PAGESIZE)
    buf[:len(data)] = data
    return buf


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 7, 128, 129, 4096, 9000]),
                          st.booleans()), min_size=1, max_size=12), st.integers(0, 2))
def test_the_zero_scan_finds_what_the_block_loop_finds(parts, lead_pages: int) -> None:
    body = b"".join((b"\0" if zero else b"\x5a") * n for n, zero in parts)
    data = bytes(lead_pages * 4096) + body
    data += bytes(-len(data) % 4096)
    buf = _buffer(b"\x01" * 4096 + data)   # a page of another run before it
    try:
        got = [(a, bytes(d)) for a, d in dump.nonzero(buf, 4096, len(data), 0x7000)]
        assert got == dump.sparse(0x7000, data, None)
        small = bytearray(b"\x01" * 4096 + data)   # a small read's buffer: compared in place
        assert [(a, bytes(d)) for a, d in dump.nonzero(small, 4096, len(data), 0x7000)] == got
        base = bytes(len(data))[:len(data) // 3] + data[len(data) // 3:]
        assert dump.differing(0x7000, data, base) == dump.sparse(0x7000, data, base)
    finally:
        buf.close()


def test_a_second_dump_takes_the_files_original_bytes_kept_from_the_first(node, tmp_path
                                                                          ) -> None:
    """The file bytes under a private mapping's written pages are read once per file
    content (dump._originals): a second dump of the same process sifts against the kept
    copy, finds the same pages, and its restore goes on counting."""
    out = str(tmp_path / "out")
    dump._originals.clear()
    dump._kept[0] = 0
    with started(counter(25, 0.02), out) as prog:
        prog.wait_lines(5)
        first = dump_stopped(prog.pid)
        assert dump._originals and dump._kept[0] == sum(map(len, dump._originals.values()))
        kept = dict(dump._originals)
        second = running.dump_running(prog.pid, frozenset({0, 1, 2}))
        assert dump._originals == kept                  # nothing read again
        running.discard(prog.pid)

    def file_pages(img) -> list:
        return [(a, bytes(d)) for r in img.regions if r.kind == "file" for a, d in r.pages]
    assert file_pages(second) == file_pages(first) != []
    assert restore(node, second, out)["status"] == 0
    assert counted(open(out).read().splitlines(), 25)

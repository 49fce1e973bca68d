#!/usr/bin/env python3
"""Moving a running process through the cluster: `move N` on procs/P/ctl, end to end.

    sudo /opt/bpfs/venv/bin/python bench/move.py [--sizes 1,100,1024] [--runs 3] [--pingpong 100]

Brings up an embedded cluster of this checkout (3 nodes) on a temporary mount and measures,
in one sitting, for a process holding 1 MB, 100 MB and 1 GB of touched, non-zero memory
(a small C program built here with gcc: malloc + a fill with a pattern that has no zero
byte, so no page of it is the zero page):

  * master -> node (a plain master process, started by this script, becomes a ghost: a
    stdio relay is started for it), node -> node, node -> master (runs on the master
    again), and master -> node once more (h->n: its links kept, no relay), each `--runs`
    times, a new process each time:
      write   the ctl write's time (it returns when the move is done)
      runs    from just before the write to the moment the process itself sees it runs on
              the target (it polls its hostname every 0.2 ms and stamps the change with
              CLOCK_REALTIME, the machine's one clock)
  * (a) the same program's exec-time migration: `bpsh N holder SIZE`, from bpsh's start to
    the program's first line on the node (it runs there), and to its `ready` (its memory
    filled there again: what restarting it elsewhere costs);
  * (b) the physical floor: the same number of bytes from one process to another over a
    local socket (AF_UNIX socketpair; TCP on loopback), received into fresh memory, as a
    move's receiver must;
  * a ping-pong: one process (1 MB) moved between nodes 1 and 2 `--pingpong` times, its
    state checked each time: the counter it keeps in memory goes 1, 2, 3 ... with its
    output (no line lost or twice), and the checksum of its memory is unchanged.

At the end every holder is told (SIGUSR1) to check its whole memory against the pattern and
exit with 0 if it is intact. Goals (issue 15): 1 MB <= 10 ms, 100 MB <= 150 ms, 1 GB <= 1.5 s.
Not a test: prints figures; exit status 0 unless something failed. Always brings the
cluster down.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUNNER = ("import sys; from importlib import import_module as m; sys.argv[0] = {name!r}; "
          "sys.exit(m({module!r}).main())")
MODULES = {"bpfs": "bpfs.cli.bpfs_main", "bpsh": "bpfs.cli.bpsh"}
GOALS_MS = {1: 10, 100: 150, 1024: 1500}

# start PID            at once (the exec-time migration's "it runs")
# ready SUM            its memory filled (SUM: a checksum of it)
# at HOST T_NS SEQ SUM each time it finds itself on another host: when (CLOCK_REALTIME),
#                      SEQ (a counter in its memory, +1 each time), SUM (of its memory)
# ok | bad             at SIGUSR1: the whole memory checked against the pattern; exits 0 | 1
HOLDER = r"""
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
static volatile sig_atomic_t check;
static void on_usr1(int s) { (void)s; check = 1; }
static unsigned char at(size_t i) { return (unsigned char)((0x5a ^ (i >> 12) ^ (i * 7)) | 1); }
static uint64_t sum(const unsigned char *m, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i += 64) s = s * 31 + m[i];
    return s;
}
int main(int argc, char **argv) {
    size_t n = strtoull(argv[1], 0, 10) << 20;
    printf("start %d\n", getpid()); fflush(stdout);
    unsigned char *mem = malloc(n);
    for (size_t i = 0; i < n; i++) mem[i] = at(i);
    signal(SIGUSR1, on_usr1);
    struct utsname u; uname(&u);
    char host[65]; strcpy(host, u.nodename);
    unsigned long seq = 0;
    printf("ready %llu\n", (unsigned long long)sum(mem, n)); fflush(stdout);
    while (!check) {
        uname(&u);
        if (strcmp(u.nodename, host) != 0) {
            struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
            strcpy(host, u.nodename);
            seq++;
            printf("at %s %lld %lu ", host, (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, seq);
            fflush(stdout);
            printf("%llu\n", (unsigned long long)sum(mem, n)); fflush(stdout);
        }
        usleep(200);
    }
    for (size_t i = 0; i < n; i++)
        if (mem[i] != at(i)) { puts("bad"); return 1; }
    puts("ok");
    return 0;
}
"""

FLOOR = """
import os, socket, sys, time
n, kind = int(sys.argv[1]), sys.argv[2]
if kind == "unix":
    a, b = socket.socketpair()
else:
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    a = socket.create_connection(ls.getsockname()); b, _ = ls.accept(); ls.close()
src = bytearray(b"\\x5b" * n)                # touched before the clock starts
t0 = time.perf_counter()
if os.fork() == 0:
    b.close(); a.sendall(src); a.close(); os._exit(0)
a.close()
dst = bytearray(n); view = memoryview(dst); got = 0
while got < n:
    k = b.recv_into(view[got:], min(n - got, 4 << 20))
    if not k: break
    got += k
t1 = time.perf_counter(); os.wait()
assert got == n and dst[n - 1] == 0x5b
print(t1 - t0)
"""


def cmd(name: str) -> list[str]:
    return [PY, "-c", RUNNER.format(name=name, module=MODULES[name])]


class Bench:
    def __init__(self, nodes: int) -> None:
        self.base = tempfile.mkdtemp(prefix="bpfs-bench-move-")
        os.chmod(self.base, 0o755)
        self.mount = os.path.join(self.base, "mnt")
        self.state = os.path.join(self.base, "state")
        os.mkdir(self.mount)
        os.mkdir(self.state)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), BPROC_MOUNT=self.mount)
        self.nodes = nodes
        self.holder = os.path.join(self.base, "holder")
        self.busy = 0               # moves refused EBUSY, then made again

    def up(self) -> None:
        src = self.holder + ".c"
        with open(src, "w") as f:
            f.write(HOLDER)
        subprocess.run(["gcc", "-O2", "-o", self.holder, src], check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # cwd: not a checkout's top (`python -c` puts the cwd first on sys.path, before
        # PYTHONPATH: bench/move_ab.py run from one checkout ran its code on both sides)
        subprocess.run(cmd("bpfs") + ["up", "--nodes", str(self.nodes), "--mount", self.mount,
                                      "--state-dir", self.state, "--port", str(port),
                                      "--detach"],
                       env=self.env, check=True, capture_output=True, cwd=self.base)

    def down(self, keep: bool = False) -> None:
        subprocess.run(cmd("bpfs") + ["down", "--mount", self.mount, "--state-dir",
                                      self.state], env=self.env, capture_output=True,
                       cwd=self.base)
        if keep:
            print(f"logs kept in {self.state}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    def move(self, pid: int, target: str) -> tuple[float, int]:
        """Write `move target`; (seconds the write took, CLOCK_REALTIME ns before it).
        EBUSY (a start or move of it not yet over, says the master) is counted, and the
        write made again 10 ms later, up to 10 times."""
        path = os.path.join(self.mount, "procs", str(pid), "ctl")
        for _ in range(10):
            fd = os.open(path, os.O_WRONLY)
            try:
                t_ns = time.time_ns()
                t0 = time.perf_counter()
                os.write(fd, f"move {target}".encode())
                return time.perf_counter() - t0, t_ns
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                self.busy += 1
            finally:
                os.close(fd)
            time.sleep(0.01)
        raise RuntimeError(f"move {target} of {pid}: EBUSY 10 times")


class Holder:
    """One holder process and its output lines."""

    def __init__(self, p: subprocess.Popen, mb: int) -> None:
        self.p, self.mb = p, mb
        assert p.stdout is not None
        self.out = p.stdout
        start = self.line()
        assert start[0] == "start", start
        self.pid = int(start[1])
        ready = self.line()
        assert ready[0] == "ready", ready
        self.sum, self.seq = ready[1], 0

    def line(self) -> list[str]:
        text = self.out.readline()
        if not text:
            raise RuntimeError(f"holder of {self.mb} MB: output ended ({self.p.poll()})")
        return text.split()

    def arrived(self, host: str) -> int:
        """Its `at` line for `host` (checked: counter +1, memory unchanged): the ns stamp."""
        at = self.line()
        self.seq += 1
        if at[0] != "at" or at[1] != host or int(at[3]) != self.seq or at[4] != self.sum:
            raise RuntimeError(f"holder {self.pid}: expected 'at {host} T {self.seq} "
                               f"{self.sum}', got {' '.join(at)}")
        return int(at[2])

    def finish(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)
        last = self.line()
        code = self.p.wait(timeout=60)
        if last != ["ok"] or code != 0:
            raise RuntimeError(f"holder {self.pid}: memory check {last}, exit {code}")

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.kill()
        self.p.wait(timeout=30)


def host_of(target: str) -> str:
    return os.uname().nodename if target == "master" else f"n{target}"


KINDS = (("m->n", "1"), ("n->n", "2"), ("n->m", "master"), ("h->n", "1"))


def moves(b: Bench, mb: int, runs: int, kinds: tuple[str, ...] = ()
          ) -> dict[str, list[tuple[float, float]]]:
    """A new process per run: master -> 1 (a relay is started for it), 1 -> 2, 2 -> master,
    master -> 1 again (h->n: back from a node, its links kept, no relay): (write s, runs s).
    `kinds`: only those (the moves before the last of them are made, not reported)."""
    kinds = kinds or tuple(k for k, _ in KINDS)
    last = max(i for i, (k, _) in enumerate(KINDS) if k in kinds)
    out: dict[str, list[tuple[float, float]]] = {k: [] for k, _ in KINDS if k in kinds}
    for _ in range(runs):
        h = Holder(subprocess.Popen([b.holder, str(mb)], stdout=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True), mb)
        try:
            for kind, target in KINDS[:last + 1]:
                took, t_ns = b.move(h.pid, target)
                runs_ns = h.arrived(host_of(target)) - t_ns
                if kind in out:
                    out[kind].append((took, runs_ns / 1e9))
            h.finish()
        finally:
            h.kill()
    return out


def exec_migration(b: Bench, mb: int, runs: int) -> tuple[float, float]:
    """`bpsh 1 holder MB`: medians of (start -> its first line, start -> ready)."""
    first, ready = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd("bpsh") + ["1", b.holder, str(mb)], env=b.env, cwd="/",
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert p.stdout is not None
        try:
            start = p.stdout.readline().split()
            assert start[0] == "start", start
            first.append(time.perf_counter() - t0)
            assert p.stdout.readline().startswith("ready")
            ready.append(time.perf_counter() - t0)
            os.kill(int(start[1]), signal.SIGUSR1)
            assert p.stdout.readline().strip() == "ok"
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
    return statistics.median(first), statistics.median(ready)


def floor(mb: int, kind: str, runs: int) -> float:
    ts = [float(subprocess.run([PY, "-c", FLOOR, str(mb << 20), kind], check=True,
                               capture_output=True, text=True).stdout) for _ in range(runs)]
    return statistics.median(ts)


def pingpong(b: Bench, n: int) -> list[float]:
    """One 1 MB holder moved 1 -> 2 -> 1 ... `n` times, checked each time: s per move
    (from the write to the process running on the other node)."""
    p = subprocess.Popen(cmd("bpsh") + ["1", b.holder, "1"], env=b.env, cwd="/",
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    h = Holder(p, 1)
    times = []
    try:
        for i in range(n):
            target = "2" if i % 2 == 0 else "1"
            _, t_ns = b.move(h.pid, target)
            times.append((h.arrived(host_of(target)) - t_ns) / 1e9)
        h.finish()
    finally:
        h.kill()
    return times


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,100,1024", help="MB, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pingpong", type=int, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the cluster's logs")
    ap.add_argument("--kinds", default="", help="only these moves, comma-separated "
                    "(m->n, n->n, n->m, h->n; default: all)")
    args = ap.parse_args()
    b = Bench(3)
    try:
        b.up()
        print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
        print("ms, medians; runs = until the process runs on the target; MB/s = MB / runs")
        print(f"{'MB':>5} {'kind':>5} {'write':>8} {'runs':>8} {'best':>8} {'MB/s':>6} "
              f"{'goal':>6} {'x floor':>8} {'x exec':>7}")
        for mb in (int(s) for s in args.sizes.split(",") if s):
            kinds = tuple(k for k in args.kinds.split(",") if k)
            moves(b, mb, 1, kinds)                  # warm-up: caches, first big buffers
            got = moves(b, mb, args.runs, kinds)
            unix, tcp = floor(mb, "unix", args.runs), floor(mb, "tcp", args.runs)
            first, ready = exec_migration(b, mb, args.runs)
            for kind, rows in got.items():
                write = statistics.median(r[0] for r in rows)
                runs = statistics.median(r[1] for r in rows)
                best = min(r[1] for r in rows)
                print(f"{mb:>5} {kind:>5} {ms(write):>8} {ms(runs):>8} {ms(best):>8} "
                      f"{mb / runs:>6.0f} {GOALS_MS.get(mb, 0):>6} {runs / tcp:>8.1f} "
                      f"{runs / first:>7.2f}", flush=True)
            print(f"{mb:>5} floor: unix socket {ms(unix)} ms ({mb / unix:.0f} MB/s), tcp "
                  f"loopback {ms(tcp)} ms ({mb / tcp:.0f} MB/s); exec-time migration "
                  f"(bpsh 1): runs {ms(first)} ms, ready (memory filled again) {ms(ready)} ms",
                  flush=True)
        if args.pingpong:
            t = sorted(pingpong(b, args.pingpong))
            print(f"ping-pong 1 MB between nodes 1 and 2, {len(t)} moves, state checked each "
                  f"time: median {ms(statistics.median(t))} ms, p90 "
                  f"{ms(t[int(len(t) * 0.9) - 1])} ms, max {ms(t[-1])} ms")
        print(f"load after: {os.getloadavg()[0]:.2f} (1 min); moves refused EBUSY and "
              f"made again: {b.busy}")
        return 0
    finally:
        b.down(args.keep)


if __name__ == "__main__":
    sys.exit(main())

"""bptop: the cluster's migrated processes, busiest first, refreshed like top.

    bptop [-d SECONDS] [-n COUNT] [-b] [--mount DIR] [NODESPEC...]

Interactive on a terminal: the screen is redrawn every `-d` seconds (2 by default, the
nodes' report interval) and at once on a key; `q` (or Ctrl-C) quits. `-b` is top's batch
mode: frames are printed one after the other, with no screen control and no keys, for
scripts and tests; `-n` stops after that many frames (top's `-b -n 1`: one snapshot).

Everything is read from the mount: $MOUNT/status for the nodes, procs/*/status for each
process's usage (bpfs/usage.py; reading it asks a node for figures older than half a
second, so every frame is fresh). bpstat's `-t` already means "total" (bproc's), hence a
command of its own rather than a bpstat option.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Sequence

import click

from bpfs import __version__, formats
from bpfs.cli import common
from bpfs.cli.bpstat import CLEAR, process_statuses, select as select_nodes, terminal_columns
from bpfs.cli.clickmain import click_main
from bpfs.formats import ProcStatus
from bpfs.usage import cpu_time

PROG = "bptop"
COLUMNS = "    PID NODE USER       NI S  %CPU    RSS    VSZ      TIME COMMAND"


def kib(n: int) -> str:
    """KiB as top writes them: plain up to 999999, then MiB ("512.0m") below 1000 MiB,
    then GiB ("3.0g")."""
    k = n // 1024
    if k < 1_000_000:
        return str(k)
    if k / 1024 < 999.95:
        return f"{k / 1024:.1f}m"
    return f"{k / 1024 / 1024:.1f}g"


def process_row(p: ProcStatus, users: dict[int, str]) -> str:
    u = p.usage
    user = users.setdefault(p.uid, formats.user_name(p.uid))
    if u is None:
        return f"{p.pid:>7} {p.node:>4} {user:<10.10} {'-':>2} - {'-':>5} {'-':>6} {'-':>6} " \
               f"{'-':>9} {p.cmd}"
    return (f"{p.pid:>7} {p.node:>4} {user:<10.10} {u.nice:>2} {u.state} {u.cpu_percent:>5.1f} "
            f"{kib(u.rss):>6} {kib(u.vsize):>6} {cpu_time(u.cpu):>9} {p.cmd}")


def frame(mount: str, specs: Sequence[str], now: float | None = None) -> list[str]:
    """One screen: a summary of nodes and processes, then the processes by %CPU."""
    rows = select_nodes(common.read_status(mount), specs)
    wanted = {r.number for r in rows}
    procs = [p for p in process_statuses(mount) if p.node in wanted]
    procs.sort(key=lambda p: (-(p.usage.cpu_percent if p.usage else 0.0), p.pid))
    up = sum(r.state == "up" for r in rows)
    states = [p.usage.state if p.usage else "?" for p in procs]
    total = sum(p.usage.cpu_percent for p in procs if p.usage)
    rss = sum(p.usage.rss for p in procs if p.usage)
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    users: dict[int, str] = {}
    return [f"{PROG} - {clock}  nodes: {len(rows)}, {up} up, {len(rows) - up} not up",
            f"Procs: {len(procs)} total, {states.count('R')} running, "
            f"{sum(s in 'SDI' for s in states)} sleeping, "
            f"{sum(s in 'Tt' for s in states)} stopped, {states.count('Z')} zombie",
            f"%Cpu: {total:.1f} (100 a CPU)   RSS: {kib(rss)} KiB", "",
            COLUMNS, *(process_row(p, users) for p in procs)]


def batch(mount: str, specs: Sequence[str], delay: float, count: int | None) -> None:
    shown = 0
    while count is None or shown < count:
        if shown:
            time.sleep(delay)
            sys.stdout.write("\n")
        sys.stdout.write("".join(f"{line}\n" for line in frame(mount, specs)))
        sys.stdout.flush()
        shown += 1


def interactive(mount: str, specs: Sequence[str], delay: float, count: int | None) -> None:
    """Redraw every `delay` seconds; `q` quits. Keys are read in cbreak mode, restored at
    the end whatever happens."""
    import termios
    import tty
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setcbreak(fd)
    try:
        shown = 0
        while count is None or shown < count:
            _draw(frame(mount, specs))
            shown += 1
            if _key(fd, delay) == "q":
                break
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _draw(lines: list[str]) -> None:
    width = terminal_columns()
    try:
        height = os.get_terminal_size(sys.stdout.fileno()).lines or 24
    except OSError:
        height = 24
    text = "\n".join(line[:width] for line in lines[:height - 1])
    sys.stdout.write(CLEAR + text)
    sys.stdout.flush()


def _key(fd: int, timeout: float) -> str:
    """A key pressed within `timeout` seconds, or ""; "q" at end of input."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return ""
    data = os.read(fd, 32)
    return "q" if not data or b"q" in data or b"Q" in data else data[:1].decode(errors="replace")


HELP = """Show the cluster's migrated processes, busiest first, refreshed like top.

\b
Keys (interactive): q quits; any other key redraws at once.
NODESPEC (as bpstat's) limits the view to those nodes' processes.

\b
Examples:
  bptop                  refresh every 2 seconds until q
  bptop -b -n 1          one snapshot on stdout (for scripts)
  bptop -d 0.5 0-3       nodes 0 to 3, twice a second
"""


@click.command(name=PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Exit status: 0 ok, 1 error, 2 bad usage, 130 interrupted.")
@click.option("-d", "--delay", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              metavar="SECONDS", help="Time between frames.")
@click.option("-n", "--iterations", "count", type=click.IntRange(min=1), default=None,
              metavar="COUNT", help="Stop after COUNT frames.")
@click.option("-b", "--batch", "batch_mode", is_flag=True,
              help="Batch mode: frames on stdout one after another, no keys (as top -b).")
@click.option("--mount", metavar="DIR", help="bpfs mount point [$BPROC_MOUNT or /bproc].")
@click.version_option(__version__, "-V", "-v", "--version", prog_name=PROG,
                      message="%(prog)s version %(version)s")
@click.argument("nodespec", nargs=-1)
def cli(delay: float, count: int | None, batch_mode: bool, mount: str | None,
        nodespec: tuple[str, ...]) -> int:
    mnt = common.mount_point(mount)
    if batch_mode or not sys.stdout.isatty():
        batch(mnt, nodespec, delay, count)
    else:
        try:
            interactive(mnt, nodespec, delay, count)
        except KeyboardInterrupt:
            pass
    return 0


def main(args: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status (see the module docstring of bpfs.cli.common)."""
    return common.run(PROG, lambda: click_main(cli, PROG, args))


if __name__ == "__main__":
    sys.exit(main())

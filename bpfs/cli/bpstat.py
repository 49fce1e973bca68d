"""bpstat: show the state of the cluster's nodes, bproc 4.0 style, from /bproc files.

Output formats are bproc 4.0's (clients/bpstat.c): the compact table merges nodes
with the same status, mode, user and group into ranges (columns 15/10/8/8 wide,
the node column gets the rest of the terminal, 80 columns when not a terminal);
`-l` is bproc's long listing plus Load (1-minute average) and Memory (used/total,
as `df -h` writes sizes) read from nodes/N/info. Modes show only the x bits, as
bproc did, since only they mean anything. One difference: trailing blanks are
not printed.

Reads $MOUNT/status (one read for the default table), nodes/N/info for `-l`,
procs/*/status for `-p`/`-P`, and blocks reading $MOUNT/events for `-U`. `-p` is
bproc's `PID<TAB>Node` table with three more tab-separated columns: %CPU (over the last
report interval), RSS in KiB and cumulative CPU TIME as ps writes it ("-" until the
node's first report). `bptop` (bpfs/cli/bptop.py) is the refreshing view.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Iterable, Sequence

import click

from bpfs import __version__, formats, nodeset
from bpfs.cli import common
from bpfs.cli.clickmain import click_main
from bpfs.formats import NodeRow
from bpfs.usage import cpu_time

PROG = "bpstat"
STATUS_W, MODE_W, USER_W = 15, 10, 8      # bproc's BPROC_STATE_LEN, MODELEN, USERLEN
MIN_NODES_W = 11
CLEAR = "\33[H\33[J"


# ---- rows -------------------------------------------------------------------------

def master_row() -> NodeRow:
    """bproc's stand-in for node -1: up, ---x--x--x, root, root."""
    return NodeRow(nodeset.MASTER, "up", 0o111, formats.user_name(0), formats.group_name(0), "")


def select(rows: list[NodeRow], specs: Sequence[str]) -> list[NodeRow]:
    """The rows named by the NODESPEC arguments, in their order; all nodes without any."""
    pairs = [(r.number, r.state) for r in rows]
    numbers: list[int] = []
    for text in specs or ["all"]:
        try:
            numbers += nodeset.parse(text).resolve(pairs)
        except ValueError as e:
            common.fail(str(e))
    by_number = {r.number: r for r in rows}
    return [by_number[n] if n in by_number else master_row() for n in numbers]


def sort_rows(rows: list[NodeRow], how: str, reverse: bool) -> list[NodeRow]:
    """bproc's orders: by number; by status then number (-R flips only the status order)."""
    if how == "none":
        return rows
    if how == "number":
        return sorted(rows, key=lambda r: r.number, reverse=reverse)
    by_number = sorted(rows, key=lambda r: r.number)
    return sorted(by_number, key=lambda r: r.state, reverse=reverse)


def mode_text(mode: int) -> str:
    return formats.mode_string(mode & 0o111)


# ---- the compact table ------------------------------------------------------------

def _same(a: NodeRow, b: NodeRow) -> bool:
    return (a.state, a.mode & 0o111, a.user, a.group) == (b.state, b.mode & 0o111, b.user, b.group)


def _groups(rows: list[NodeRow]) -> Iterable[list[NodeRow]]:
    """Maximal stretches of neighbours with the same status, mode, user and group."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or not _same(rows[start], rows[i]):
            yield rows[start:i]
            start = i


def _node_lines(numbers: list[int], width: int) -> list[str]:
    """`0-3,5,...` cut into lines of at most `width` chars at run boundaries (bproc)."""
    lines: list[str] = []
    for run in nodeset.runs(numbers):
        text = nodeset.run_text(run)
        if lines and len(lines[-1]) + 1 + len(text) <= width:
            lines[-1] += "," + text
        else:
            lines.append(text)
    return lines


def compact_table(rows: list[NodeRow], columns: int) -> list[str]:
    width = columns - (STATUS_W + MODE_W + USER_W + USER_W + 5)
    if width < MIN_NODES_W:
        common.fail(f"window too small ({columns} columns)")
    fmt = (f"{{:<{width}.{width}}} {{:<{STATUS_W}.{STATUS_W}}} {{:<{MODE_W}.{MODE_W}}} "
           f"{{:<{USER_W}.{USER_W}}} {{:<{USER_W}.{USER_W}}}")
    out = [fmt.format("Node(s)", "Status", "Mode", "User", "Group").rstrip()]
    for group in _groups(rows):
        r = group[0]
        for nodes in _node_lines([g.number for g in group], width):
            out.append(fmt.format(nodes, r.state, mode_text(r.mode), r.user, r.group).rstrip())
    return out


def terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns or 80
    except (OSError, ValueError):
        return 80


# ---- the long listing -------------------------------------------------------------

def human(n: float) -> str:
    """Bytes the way `df -h` writes them: 1024-based, rounded up, one decimal below 10."""
    for unit in ("B", "K", "M", "G", "T", "P"):
        if n < 1024 or unit == "P":
            break
        n /= 1024
    if unit == "B":
        return f"{int(n)}B"
    if n < 10:
        return f"{math.ceil(n * 10) / 10:.1f}{unit}"
    return f"{math.ceil(n)}{unit}"


def load_and_memory(mount: str, row: NodeRow) -> tuple[str, str]:
    """`("0.42", "1.2G/7.6G")` from nodes/N/info; "-" when down or unknown, "?" if garbled."""
    if row.number == nodeset.MASTER or row.state != "up":
        return "-", "-"
    try:
        info = formats.parse_info(common.read_file(
            os.path.join(common.node_dir(mount, row.number), "info")))
    except OSError:
        return "-", "-"
    except ValueError:
        return "?", "?"
    f = info.facts
    if not f.mem_total:
        return f"{f.load[0]:.2f}", "-"
    used = f.mem_total - f.mem_available
    return f"{f.load[0]:.2f}", f"{human(used)}/{human(f.mem_total)}"


def long_line(num: str, addr: str, state: str, mode: str, user: str, group: str,
              load: str, mem: str) -> str:
    # bproc: "%4d %-15s %-12s %s\t%-10.10s %-10.10s"; the tab puts User at column 48
    return (f"{num:>4} {addr:<15} {state:<12} {mode:<10}"
            f"\t{user:<10.10} {group:<10.10} {load:>5} {mem}").rstrip()


def long_listing(rows: list[NodeRow], mount: str) -> list[str]:
    out = ["Node Address         Status       Mode          User       Group       Load Memory"]
    for r in rows:
        load, mem = load_and_memory(mount, r)
        out.append(long_line(str(r.number), r.address or "-", r.state, mode_text(r.mode),
                             r.user, r.group, load, mem))
    return out


# ---- processes (-p, -P) -----------------------------------------------------------

def process_statuses(mount: str) -> list[formats.ProcStatus]:
    """Every migrated process not yet exited, from procs/*/status, ordered by pid."""
    top = os.path.join(mount, "procs")
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if not name.isdigit():
            continue
        path = os.path.join(top, name, "status")
        try:
            text = common.read_file(path)
        except (FileNotFoundError, ProcessLookupError):
            continue            # it ended while we looked
        p = common.parse_or_fail(formats.parse_proc_status, text, path)
        if p.state != "exited":
            out.append(p)
    return sorted(out, key=lambda p: p.pid)


def process_map(mount: str) -> dict[int, int]:
    """pid -> node of every migrated process not yet exited."""
    return {p.pid: p.node for p in process_statuses(mount)}


PROCESS_HEADER = "PID\tNode\t%CPU\tRSS\tTIME"


def process_line(p: formats.ProcStatus) -> str:
    """bproc's `PID<TAB>Node`, then %CPU, RSS (KiB) and TIME as ps writes them; "-" for
    each until the node's first report."""
    u = p.usage
    if u is None:
        return f"{p.pid}\t{p.node}\t-\t-\t-"
    return f"{p.pid}\t{p.node}\t{u.cpu_percent:.1f}\t{u.rss // 1024}\t{cpu_time(u.cpu)}"


def process_listing(mount: str, nodes: set[int] | None) -> list[str]:
    """bproc's `PID<TAB>Node` table with usage columns, ordered by pid; only `nodes`
    when given."""
    return [PROCESS_HEADER] + [process_line(p) for p in process_statuses(mount)
                               if nodes is None or p.node in nodes]


def annotate_ps(lines: Iterable[str], procs: dict[int, int]) -> Iterable[str]:
    """bpstat -P: prefix `ps` output with a NODE column (empty for local processes).

    The PID column is found under the header's "PID"; pids are right-aligned, so
    the value is the word that covers the header's last letter.
    """
    it = iter(lines)
    header = next(it, None)
    if header is None:
        return
    col = _pid_column(header)
    yield "NODE\t" + header
    for line in it:
        pid = _word_at(line, col)
        if not pid.isdigit():
            common.warn(PROG, f"punting on: {line.rstrip()}")
            continue
        node = procs.get(int(pid))
        yield ("" if node is None else str(node)) + "\t" + line


def _pid_column(header: str) -> int:
    words = header.split()
    if "PID" not in words:
        common.fail('didn\'t find "PID" in ps header line')
    pos = 0
    for w in words:
        pos = header.index(w, pos)
        if w == "PID":
            return pos + 2
        pos += len(w)
    raise AssertionError("unreachable")


def _word_at(line: str, col: int) -> str:
    if col >= len(line) or line[col].isspace():
        return ""
    start = col
    while start > 0 and not line[start - 1].isspace():
        start -= 1
    end = col
    while end < len(line) and not line[end].isspace():
        end += 1
    return line[start:end]


def node_of_host(rows: list[NodeRow], host: str) -> int:
    """bpstat -A: the node whose address is `host` or what `host` resolves to."""
    for r in rows:
        if r.address and r.address == host:
            return r.number
    import socket
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        common.fail(f"unknown host: {host}")
    for r in rows:
        if r.address and r.address == addr:
            return r.number
    common.fail(f"no node with address {host}")


# ---- -U: redraw on events ----------------------------------------------------------

class EventWaiter:
    """Wakes the main thread when $MOUNT/events yields something.

    The blocking read runs in a daemon thread that also opens the file (bpfs
    answers a blocked read with EINTR when its *opener* has a signal pending,
    which is how the thread gets out when the process exits) and blocks every
    signal, so Ctrl-C always reaches the main thread, waiting on a queue, and
    ends bpstat at once. The file is open before the first draw so no change is
    missed in between. If a read ever returns end of file (not a live bpfs), it
    falls back to redrawing once a second.
    """

    def __init__(self, path: str) -> None:
        import queue
        import threading
        self.path = path
        self.queue: "queue.Queue[BaseException | None]" = queue.Queue()
        threading.Thread(target=self._reader, name="events", daemon=True).start()
        opened = self.queue.get()
        if opened is not None:
            raise opened

    def _reader(self) -> None:
        import signal
        import time
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            self.queue.put(e)
            return
        self.queue.put(None)
        try:
            while True:
                if not os.read(fd, 65536):
                    time.sleep(1.0)
                    try:
                        os.lseek(fd, 0, os.SEEK_SET)
                    except OSError:
                        pass                # a pipe: just read again
                self.queue.put(None)
        except OSError as e:
            self.queue.put(e)

    def wait(self) -> None:
        """Block until something changed; raise what the reader met, if it failed."""
        import queue
        items = [self.queue.get()]
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is not None:
                raise item


def watch(mount: str, draw: Callable[[], list[str]]) -> None:
    waiter = EventWaiter(os.path.join(mount, "events"))
    while True:
        lines = draw()
        sys.stdout.write(CLEAR + "".join(f"{line}\n" for line in lines))
        sys.stdout.flush()
        waiter.wait()


# ---- the command ------------------------------------------------------------------

def render(rows: list[NodeRow], fmt: str, mount: str) -> list[str]:
    if fmt == "compact":
        return compact_table(rows, terminal_columns())
    if fmt == "long":
        return long_listing(rows, mount)
    if fmt == "address":
        return [r.address or "-" for r in rows]
    if fmt == "status":
        return [r.state for r in rows]
    if fmt == "number":
        return [str(r.number) for r in rows]
    return [str(len(rows))]


def snapshot(mount: str, specs: Sequence[str], fmt: str, sort: str | None,
             reverse: bool) -> list[str]:
    rows = select(common.read_status(mount), specs)
    how = sort or ("status" if fmt == "compact" else "number")
    return render(sort_rows(rows, how, reverse), fmt, mount)


def print_lines(lines: Iterable[str]) -> None:
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


HELP = """Show the status of cluster nodes, from the files under the bpfs mount.

\b
NODESPEC is a comma separated list of:
  5, n5, .5    node 5
  5-8, 5-      nodes 5 to 8, nodes 5 to the last
  all          all nodes (the default)
  master       the master (node -1)
  up, allup    nodes in state up (any state: down, boot, error, ...)
  !down, notdown, allnotdown
               nodes not in state down (quote the ! in a shell)
Several NODESPECs may be given: their nodes add up (sorted, unless -O).

\b
Examples:
  bpstat                 compact table of all nodes
  bpstat -l 0-3          long listing of nodes 0 to 3
  bpstat -t allup        number of nodes that are up
  bpstat -U              redraw the table whenever something changes
"""


def _flag(short: str, long: str, dest: str, value: str, text: str) -> Callable:
    return click.option(short, long, dest, flag_value=value, help=text)


@click.command(name=PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Exit status: 0 ok, 1 error, 2 bad usage, 130 interrupted.")
@click.option("-c", "--compact", "fmt", flag_value="compact", default=True,
              help="Compact table merging nodes into ranges (default).")
@_flag("-l", "--long", "fmt", "long", "One node per line, with address, load and memory.")
@_flag("-a", "--address", "fmt", "address", "Print node addresses.")
@_flag("-s", "--status", "fmt", "status", "Print node states.")
@_flag("-n", "--number", "fmt", "number", "Print node numbers.")
@_flag("-t", "--total", "fmt", "total", "Print the number of nodes.")
@click.option("-R", "--sort-reverse", "reverse", is_flag=True, help="Reverse the sort order.")
@_flag("-N", "--sort-number", "sort", "number", "Sort by node number (default but for -c).")
@_flag("-S", "--sort-status", "sort", "status", "Sort by status, then number (default for -c).")
@_flag("-O", "--keep-order", "sort", "none", "Keep the NODESPEC order.")
@click.option("-U", "--update", is_flag=True,
              help="Redraw whenever something changes (Ctrl-C ends).")
@click.option("-L", "--lock", is_flag=True, help="Ignore Ctrl-C and Ctrl-Z (unattended terminal).")
@click.option("-A", "host", metavar="HOST", help="Print the number of the node with this address.")
@click.option("-p", "procs", is_flag=True, help="List migrated processes: PID, node, %CPU, RSS (KiB), CPU time.")
@click.option("-P", "ps", is_flag=True, help='Add a NODE column to "ps" output read on stdin.')
@click.option("--mount", metavar="DIR", help="bpfs mount point [$BPROC_MOUNT or /bproc].")
@click.version_option(__version__, "-V", "-v", "--version", prog_name=PROG,
                      message="%(prog)s version %(version)s")
@click.argument("nodespec", nargs=-1)
def cli(fmt: str, reverse: bool, sort: str | None, update: bool, lock: bool, host: str | None,
        procs: bool, ps: bool, mount: str | None, nodespec: tuple[str, ...]) -> int:
    mnt = common.mount_point(mount)
    if lock:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTSTP, signal.SIG_IGN)
    if host is not None:
        print_lines([str(node_of_host(common.read_status(mnt), host))])
    elif procs:
        nodes = set(r.number for r in select(common.read_status(mnt), nodespec)) \
            if nodespec else None
        print_lines(process_listing(mnt, nodes))
    elif ps:
        print_lines(line.rstrip("\n") for line in annotate_ps(sys.stdin, process_map(mnt)))
    elif update:
        watch(mnt, lambda: snapshot(mnt, nodespec, fmt, sort, reverse))
    else:
        print_lines(snapshot(mnt, nodespec, fmt, sort, reverse))
    return 0


def main(args: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status (see the module docstring of bpfs.cli.common)."""
    return common.run(PROG, lambda: click_main(cli, PROG, args))


if __name__ == "__main__":
    sys.exit(main())

"""bpmove: move running processes to another node or back to the master (bproc_move).

    bpmove NODE PID...          NODE: a node number, or `master` (also -1)

Each PID is moved in turn by one write of `move NODE` to /bproc/procs/PID/ctl, which
returns once the process runs on NODE (the master's check and the steps:
bpfs/master/moves.py). A process keeps its PID, its memory, its stdio and its open
regular files; it cannot move while it has threads, children, a pipe or a socket
besides its stdio, or a tracer (EBUSY says which). A move that fails leaves the
process running where it was. Exit status: 0 if every process moved, 1 if any failed
(`bpmove: PID: why` on stderr), 2 for bad usage.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Sequence

from bpfs import __version__
from bpfs.cli import common

PROG = "bpmove"

USAGE = """\
Usage: bpmove [--mount DIR] NODE PID...

  Move running processes to node NODE, or back to the master (NODE `master` or
  -1). Each PID keeps its number, memory, stdio and open files; the command
  returns once each one runs there. A process with threads, children, a pipe or
  a socket besides its stdio, or a tracer, cannot move (EBUSY); one that may
  not be moved stays where it was.

Options:
      --mount DIR    bpfs mount point [$BPROC_MOUNT or /bproc].
  -V, --version      Show the version and exit.
  -h, --help         Show this message and exit.
"""


def _parse(argv: Sequence[str]) -> tuple[str, str, list[int]]:
    args, mount = list(argv), None
    while args and args[0].startswith("-") and args[0] != "-1":
        opt = args.pop(0)
        if opt in ("-h", "--help"):
            sys.stdout.write(USAGE)
            common.exit_now(0)
        if opt in ("-V", "--version"):
            sys.stdout.write(f"{PROG} {__version__}\n")
            common.exit_now(0)
        if opt == "--mount" and args:
            mount = args.pop(0)
        elif opt.startswith("--mount="):
            mount = opt.split("=", 1)[1]
        elif opt == "--":
            break
        else:
            common.fail(f"unknown option {opt}\n{USAGE}", 2)
    if len(args) < 2:
        common.fail(f"a node and at least one PID, please\n{USAGE}", 2)
    where = args[0].removeprefix("n") if args[0] != "master" else "master"
    if where != "master" and where != "-1" and not (where.isascii() and where.isdigit()):
        common.fail(f"{args[0]!r} is neither a node number nor `master`", 2)
    pids = []
    for word in args[1:]:
        if not (word.isascii() and word.isdigit() and 0 < int(word) < 1 << 22):
            common.fail(f"{word!r} is not a process id", 2)
        pids.append(int(word))
    return common.mount_point(mount), "master" if where == "-1" else where, pids


def _move(mount: str, where: str, pid: int) -> str | None:
    """None if `pid` moved, else why not."""
    path = os.path.join(mount, "procs", str(pid), "ctl")
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        err = errno.ESRCH if exc.errno == errno.ENOENT else exc.errno or errno.EIO
        return os.strerror(err)
    try:
        os.write(fd, f"move {where}\n".encode())
        return None
    except OSError as exc:
        return os.strerror(exc.errno or errno.EIO)
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        mount, where, pids = _parse(sys.argv[1:] if argv is None else argv)
        failed = 0
        for pid in pids:
            why = _move(mount, where, pid)
            if why is not None:
                common.warn(PROG, f"{pid}: {why}")
                failed = 1
        return failed
    return common.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())

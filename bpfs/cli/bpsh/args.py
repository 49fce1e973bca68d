"""bpsh's command line: USAGE, the hand-written parser (bproc's getopt loop), the PATH
lookup and the node list; and `Job`, what to run where.

The grammar is parsed by hand, not with click or argparse: their import alone would
cost bpsh more than the rest of a `bpsh 1 true` run (tests/unit/test_startup.py).
"""

from __future__ import annotations

import _socket
import os
from bpfs.child import path_candidates
from bpfs.record import Factory, record
TYPE_CHECKING = False  # not at start-up (bench/results-startup.md); annotations only
if TYPE_CHECKING:
    from typing import Sequence

from bpfs.cli import common
from bpfs.cli.bpsh.output import OutputOptions

PROG = "bpsh"
DEFAULT_BUFFER = 4096
EXIT_NOT_FOUND = 1          # bproc's bpsh: `bpsh: X: command not found`, exit 1
MASTER = -1                 # the master's node number (as bpfs.nodeset's)

USAGE = f"""\
usage: {PROG} [options] NODESPEC command [args...]
       {PROG} -a [options] command [args...]
       {PROG} -A [options] command [args...]
Run a command on cluster nodes. The program comes from this machine (looked up in
PATH here) and is migrated; stdin, stdout and stderr are forwarded back, so
redirections on the command line refer to files here.
NODESPEC: N, nN, .N, A-B, A-, lists with commas (order and duplicates kept), all,
master, allup, up, !down, allnotdown; -1 is the master.
  -h, --help     Display this message and exit
  -v, --version  Display version information and exit
      --mount DIR  the bpfs mount (default: $BPROC_MOUNT, else /bproc)
 Node selection options:
  -a     Run the command on all nodes which are up.
  -A     Run the command on all nodes which are not down.
 IO forwarding options:
  -n     Redirect stdin from /dev/null
  -N     No IO forwarding
  -L     Line buffer output from remote nodes.
  -p     Prefix each line of output with the node number
         it is from. (implies -L)
  -s     Show the output from each node sequentially.
  -d     Print a divider between the output from each
         node. (implies -s)
  -b ##  Set IO buffer size to ## bytes.  This affects the
         maximum line length for line buffered IO. (default={DEFAULT_BUFFER})
  -I file, --stdin file
         Redirect standard in from file on the remote node.
  -O file, --stdout file
         Redirect standard out to file on the remote node.
  -E file, --stderr file
         Redirect standard error to file on the remote node.
  -t, --time
         Time how long the command takes to complete.  This includes
         the time for process creation.
Exit status: the largest exit status of the remote processes; 255 if one was
killed by a signal; 1 if the command is not found or bpsh failed.
"""


class UsageError(Exception):
    """Bad command line: message, then a hint to --help; exit 2."""


@record
class Args:
    """bpsh's command line, parsed."""
    nodespec: str | None = None
    all_up: bool = False
    all_avail: bool = False
    io: list[str] = Factory(lambda: ["socket", "socket", "socket"])
    output: OutputOptions = Factory(lambda: OutputOptions(
        buffer_size=DEFAULT_BUFFER))
    time: bool = False
    mount: str | None = None
    command: list[str] = Factory(list)
    help: bool = False
    version: bool = False
    npos: int = 0               # free words seen (bproc's non_option_args)


# ---- command line -------------------------------------------------------------------

_SHORT_ARG = set("lbIOE")          # short options taking an argument
_SHORT_FLAG = set("hvnNaA1Lpsdt")
_LONG = {"help": None, "version": None, "time": None, "stdin": "I", "stdout": "O",
         "stderr": "E", "mount": "mount"}


def parse_args(argv: Sequence[str]) -> Args:
    """bproc's getopt loop ("+hl:nNaAv1Lpsdb:I:O:E:t" and long options), in Python.

    The first free word is NODESPEC (-a, -A and -1 stand for it), the next one is the
    command: it and every word after it are the command's. "--" makes the next word
    free even if it starts with "-".
    """
    args, i = Args(), 0
    argv = list(argv)
    while i < len(argv) and not args.command:
        word = argv[i]
        i += 1
        if word == "--":
            if i < len(argv):
                _positional(args, argv, i)
                i += 1
        elif word.startswith("--"):
            i = _long_option(args, word, argv, i)
        elif word.startswith("-") and word != "-":
            i = _short_options(args, word, argv, i)
        else:
            _positional(args, argv, i - 1)
        if args.help or args.version:
            break
    return args


def _positional(args: Args, argv: list[str], at: int) -> None:
    if args.npos == 0:
        args.nodespec = argv[at]
    else:
        args.command = argv[at:]
    args.npos += 1


def _long_option(args: Args, word: str, argv: list[str], i: int) -> int:
    name, eq, value = word[2:].partition("=")
    matches = [n for n in _LONG if n.startswith(name)] if name else []
    if name in _LONG:
        matches = [name]
    if len(matches) != 1:
        raise UsageError(f"{'ambiguous' if matches else 'unrecognized'} option '{word}'")
    name = matches[0]
    target = _LONG[name]
    if target is None:
        if eq:
            raise UsageError(f"option '--{name}' doesn't allow an argument")
        _flag(args, {"help": "h", "version": "v", "time": "t"}[name])
        return i
    if not eq:
        if i >= len(argv):
            raise UsageError(f"option '--{name}' requires an argument")
        value, i = argv[i], i + 1
    if target == "mount":
        args.mount = value
    else:
        _with_arg(args, target, value)
    return i


def _short_options(args: Args, word: str, argv: list[str], i: int) -> int:
    for k, ch in enumerate(word[1:], start=1):
        if ch in _SHORT_FLAG:
            _flag(args, ch)
        elif ch in _SHORT_ARG:
            value = word[k + 1:]
            if not value:
                if i >= len(argv):
                    raise UsageError(f"option requires an argument -- '{ch}'")
                value, i = argv[i], i + 1
            _with_arg(args, ch, value)
            return i
        else:
            raise UsageError(f"invalid option -- '{ch}'")
    return i


def _flag(args: Args, ch: str) -> None:
    out = args.output
    if ch == "h":
        args.help = True
    elif ch == "v":
        args.version = True
    elif ch == "1":
        args.nodespec = "-1"
        args.npos += 1
    elif ch == "a":
        args.all_up, args.npos = True, 1
    elif ch == "A":
        args.all_avail, args.npos = True, 1
    elif ch == "n":
        args.io[0] = "null"
    elif ch == "N":
        args.io[:] = ["null", "null", "null"]
    elif ch == "L":
        out.line_buffered = True
    elif ch == "p":
        out.line_buffered = out.prefix = True
    elif ch == "s":
        out.sequential = True
    elif ch == "d":
        out.sequential = out.dividers = True
    elif ch == "t":
        args.time = True


def _with_arg(args: Args, ch: str, value: str) -> None:
    if ch == "b":
        try:
            size = int(value, 0)
        except ValueError:
            size = 0
        if size <= 0:
            raise UsageError(f"Invalid buffer size: {value}")
        args.output.buffer_size = size
    elif ch in "IOE":
        if not value:
            raise UsageError(f"-{ch} needs a file name")
        args.io["IOE".index(ch)] = "file:" + value
    # -l USER: accepted and ignored, as bproc did (rsh compatibility)


# ---- command lookup -------------------------------------------------------------------

def which(name: str, path: str | None = None) -> str | None:
    """bproc's which(): the first executable regular file among `bpfs.child.path_candidates`
    of PATH (default ":/bin:/usr/bin"; a name with a slash is taken as is)."""
    if not name:
        return None
    if path is None:
        path = os.environ.get("PATH", ":/bin:/usr/bin")
    return next((c for c in path_candidates(name, path) if _executable(c)), None)


def _executable(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_mode & 0o170000) == 0o100000 and os.access(path, os.X_OK)


# ---- nodes ------------------------------------------------------------------------------

def resolve_nodes(args: Args, mount: str) -> list[int] | None:
    """The node list, or None when the spec names this machine (run the command here)."""
    text = "allup" if args.all_up else "allnotdown" if args.all_avail else args.nodespec
    assert text is not None
    if text == "-1":
        text = "master"
    numbers = _plain_numbers(text)
    if numbers is not None and os.path.exists(os.path.join(mount, "status")):
        return numbers                  # no node list needed: the ctl write checks each node
    from bpfs import nodeset            # the rest of the grammar needs the node list
    rows = common.read_status(mount)
    pairs = [(r.number, r.state) for r in rows]
    try:
        return nodeset.parse(text).resolve(pairs, keep_unknown=True)
    except ValueError as e:
        by_address = [r.number for r in rows if r.address and r.address == text]
        if by_address:
            return by_address
        if text in ("localhost", "n-1", _socket.gethostname()):
            return None
        common.fail(f'Invalid node specification "{text}": {e}')


def _plain_numbers(text: str) -> list[int] | None:
    """The nodes of a spec made only of node numbers (N, nN, .N) and `master`, as
    `nodeset.parse(text).resolve([], keep_unknown=True)` gives them when `only_numbers`;
    None for anything else (then bpfs.nodeset decides)."""
    out = []
    for chunk in text.split(","):
        if chunk == "master":
            out.append(MASTER)
        elif chunk:
            digits = chunk[1:] if chunk[0] in "n." else chunk
            if not (digits.isascii() and digits.isdigit()):
                return None
            out.append(int(digits))
    return out or None


# ---- running ----------------------------------------------------------------------------

@record
class Job:
    """What to run where; `path` is the program found by `which`, `argv` its argv."""
    mount: str
    nodes: list[int]
    path: str
    argv: list[str]
    io: Sequence[str] = ("socket", "socket", "socket")
    output: OutputOptions = Factory(OutputOptions)
    env: dict[str, str] | None = None       # None: bpsh's own environment


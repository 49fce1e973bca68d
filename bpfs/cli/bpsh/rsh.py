"""bprsh: bpsh spoken as rsh and ssh are, so launchers (mpirun, mpiexec, pdsh, parallel
tools) that start their daemons through a remote shell need no patch and no wrapper.

    bprsh [ssh/rsh options] [USER@]HOST COMMAND...

As ssh does, the words after HOST are joined with spaces into ONE string, which
`/bin/sh -c` runs on the node: Open MPI hands its agent ` orted -mca ess "env" ...`
(a leading space, quoted words), MPICH's hydra `-x HOST "/usr/bin/hydra_pmi_proxy" ...`.
HOST is one node as bpsh names it (`5`, `n5`, `.5`, `master`, the node's address; this
machine's own name or `localhost` run here). Options may come before and after HOST, as
OpenSSH parses them; the first other word starts the command.

ssh's options that mean nothing here are accepted and ignored (the tables below); `-n`
is bpsh's -n (stdin from /dev/null); `-l USER` and `-o User=USER` must name the caller
(a process runs on a node as its own user); options that ask for what a process space
cannot give (port forwarding, a login session, a master connection) are refused.

Everything else is bpsh's machinery (`run.run_job`): the shell is migrated to the node
with bprsh's environment and cwd, stdio is forwarded, signals to bprsh are passed on,
and bprsh exits with the remote command's status (a remote death by signal: 255, or
bprsh dies of the same signal when it was the one that forwarded it). bprsh's own
failures (usage, an unknown host, a node that refuses or is down) exit 255, as ssh's.

Kept as light as bpsh (tests/unit/test_startup.py): `pwd` only for -l.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys
TYPE_CHECKING = False  # not at start-up (bench/results-startup.md); annotations only
if TYPE_CHECKING:
    from typing import NoReturn, Sequence

from bpfs import __version__
from bpfs.cli import common
from bpfs.cli.bpsh.args import MASTER, Args, Job, resolve_nodes
from bpfs.cli.bpsh.run import exit_status, plan_io, run_job
from bpfs.errors import BpfsError
from bpfs.record import record

PROG = "bprsh"
SHELL = "/bin/sh"
EXIT_FAILED = 255               # ssh's status for its own failures

USAGE = f"""\
usage: {PROG} [options] [USER@]HOST COMMAND [ARGS...]
Run COMMAND on cluster node HOST the way rsh and ssh do, through bpsh's process
space: the words after HOST are joined with spaces into one command line that
{SHELL} -c runs on the node. For launchers that start their daemons through a
remote shell:
  mpirun --mca plm_rsh_agent {PROG} --host n0,n1 -np 2 ./a.out          (Open MPI)
  mpiexec -launcher ssh -launcher-exec {PROG} -hosts n0,n1 -n 2 ./a.out  (MPICH)
HOST: N, nN, .N or master (as bpsh's NODESPEC, one node), the node's address;
this machine's name or localhost run the command here.
  -h, --help     Display this message and exit
  -V, --version  Display version information and exit
      --mount DIR  the bpfs mount (default: $BPROC_MOUNT, else /bproc)
  -n             Redirect stdin from /dev/null
  -l USER, -o User=USER
                 Must be the caller: a process runs on a node as its own user.
Accepted and ignored, as they mean nothing here: -1 -2 -4 -6 -a -A -C -g -k -K -q
-t -T -v -x -X -y -Y, and -b -B -c -e -E -F -i -I -m -o -p -P -S with their
argument. Refused: -f -G -M -N -s -D -J -L -O -Q -R -W -w.
Exit status: the remote command's (255 if it was killed by a signal); 255 if
{PROG} itself failed (bad usage, unknown host, the node refused or is down).
"""

IGNORED_FLAGS = frozenset("1246aACgkKqtTvxXyY")
IGNORED_WITH_ARG = frozenset("bBceEFiImpPS")       # -o: see _ssh_option
REFUSED = {"f": "going to the background", "G": "printing ssh's configuration",
           "M": "master connections", "N": "sessions without a command",
           "s": "subsystems", "D": "port forwarding", "L": "port forwarding",
           "R": "port forwarding", "W": "stdio forwarding", "w": "tunnels",
           "J": "jump hosts", "O": "master connections", "Q": "ssh queries"}
REFUSED_WITH_ARG = frozenset("DJLOQRWw")


class RshError(Exception):
    """bprsh's own failure: `bprsh: message`, exit 255."""


class RshUsageError(RshError):
    """A bad command line: the message, then a hint to --help; exit 255 too."""


@record
class RshArgs:
    """bprsh's command line, parsed."""
    host: str | None = None
    words: list[str] | None = None      # the command's words (joined for the shell)
    stdin_null: bool = False
    user: str | None = None
    mount: str | None = None
    help: bool = False
    version: bool = False

    @property
    def command(self) -> str:
        return " ".join(self.words or ())


def parse_rsh(argv: Sequence[str]) -> RshArgs:
    """OpenSSH's option loop: options, HOST, options again, then the command's words
    (`--` ends the options). Raises RshError for what ssh would refuse too."""
    args, i, argv = RshArgs(), 0, list(argv)
    while i < len(argv) and args.words is None and not (args.help or args.version):
        word, i = argv[i], i + 1
        if word == "--":
            args.words = _host_then_command(args, argv[i:])
        elif word.startswith("--"):
            i = _long_option(args, word, argv, i)
        elif word.startswith("-") and word != "-":
            i = _short_options(args, word, argv, i)
        elif args.host is None:
            _set_host(args, word)
        else:
            args.words = argv[i - 1:]
    return args


def _host_then_command(args: RshArgs, rest: list[str]) -> list[str]:
    if args.host is None and rest:
        _set_host(args, rest[0])
        rest = rest[1:]
    return rest


def _set_host(args: RshArgs, word: str) -> None:
    user, at, host = word.rpartition("@")
    if at:
        args.user = user
    args.host = host


def _long_option(args: RshArgs, word: str, argv: list[str], i: int) -> int:
    name, eq, value = word[2:].partition("=")
    if name == "help":
        args.help = True
    elif name == "version":
        args.version = True
    elif name == "mount":
        if not eq:
            if i >= len(argv):
                raise RshUsageError("option '--mount' requires an argument")
            value, i = argv[i], i + 1
        args.mount = value
    else:
        raise RshUsageError(f"unrecognized option '{word}'")
    return i


def _short_options(args: RshArgs, word: str, argv: list[str], i: int) -> int:
    for k, ch in enumerate(word[1:], start=1):
        if ch in IGNORED_WITH_ARG or ch in REFUSED_WITH_ARG or ch in "lo":
            value = word[k + 1:]
            if not value:
                if i >= len(argv):
                    raise RshUsageError(f"option requires an argument -- '{ch}'")
                value, i = argv[i], i + 1
            _with_arg(args, ch, value)
            return i
        _flag(args, ch)
    return i


def _flag(args: RshArgs, ch: str) -> None:
    if ch == "h":
        args.help = True
    elif ch == "V":
        args.version = True
    elif ch == "n":
        args.stdin_null = True
    elif ch in REFUSED:
        raise RshError(f"-{ch} ({REFUSED[ch]}) is not supported")
    elif ch not in IGNORED_FLAGS:
        raise RshUsageError(f"invalid option -- '{ch}'")


def _with_arg(args: RshArgs, ch: str, value: str) -> None:
    if ch in REFUSED_WITH_ARG:
        raise RshError(f"-{ch} ({REFUSED[ch]}) is not supported")
    if ch == "l":
        args.user = value
    elif ch == "o":
        key, _, val = value.replace("=", " ", 1).partition(" ")
        if key.lower() == "user":
            args.user = val.strip()


# ---- running ------------------------------------------------------------------------

def check_user(user: str) -> None:
    """-l USER: a process runs on a node as its caller, so USER must be the caller."""
    import pwd
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise RshError(f"-l {user}: no such user") from None
    if uid != os.getuid():
        raise RshError(f"-l {user}: processes run on a node as their caller; "
                       f"run {PROG} as {user} instead")


def one_node(host: str, mount: str) -> int | None:
    """HOST's node number, or None for this machine (its name, localhost, `master`);
    RshError if it names no node or several."""
    if host in ("localhost", "127.0.0.1", _socket.gethostname()):
        return None                     # as bpsh would, without needing /bproc
    try:
        nodes = resolve_nodes(Args(nodespec=host), mount)
    except common.CliError as e:
        if not e.message.startswith("Invalid node specification"):
            raise RshError(e.message) from None
        raise RshError(f"Could not resolve hostname {host}: not a node of this cluster "
                       f"(N, nN, .N, master, a node's address)") from None
    if nodes is not None and len(nodes) != 1:
        raise RshError(f"{host}: names {len(nodes)} nodes, not one host")
    return None if nodes is None or nodes[0] == MASTER else nodes[0]


def run_rsh(args: RshArgs) -> int:
    """Run the parsed command line; returns the exit status (RshError: bprsh's failure)."""
    if args.host is None:
        raise RshUsageError("no host given")
    if args.user is not None:
        check_user(args.user)
    if not args.command.strip():
        raise RshError(f"no command given: {PROG} runs commands, not login sessions "
                       f"(an interactive shell on node N: bpsh N sh -i)")
    mount = common.mount_point(args.mount)
    node = one_node(args.host, mount)
    argv = ["sh", "-c", args.command]
    if node is None:
        os.execv(SHELL, argv)
    io = ["null" if args.stdin_null else "socket", "socket", "socket"]
    plan_io(io)
    procs, received = run_job(Job(mount, [node], SHELL, argv, tuple(io)))
    if any(p.failed for p in procs):
        return EXIT_FAILED              # it never ran; the node's reason is printed already
    code, die_of = exit_status(procs, received, prog=PROG)
    if die_of is not None:              # we forwarded it: die of it too, as bpsh does
        sys.stdout.flush()
        _signal.signal(die_of, _signal.SIG_DFL)
        os.kill(os.getpid(), die_of)
        return 128 + die_of
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    def body() -> int:
        try:
            args = parse_rsh(sys.argv[1:] if argv is None else argv)
            if args.help:
                sys.stdout.write(USAGE)
                return 0
            if args.version:
                sys.stdout.write(f"{PROG} version {__version__}\n")
                return 0
            return run_rsh(args)
        except RshUsageError as e:
            _fail(f"{e}\nTry '{PROG} --help' for more information.")
        except RshError as e:
            _fail(str(e))
        except common.CliError as e:
            _fail(e.message)
        except BrokenPipeError:
            raise
        except (OSError, BpfsError) as e:
            _fail(common.describe(e))
    return common.run(PROG, body)


def _fail(message: str) -> NoReturn:
    raise common.CliError(message, EXIT_FAILED)


def console() -> None:
    """The installed `bprsh` command: main(), then exit at once."""
    common.exit_now(main())

"""Control messages written to /bproc ctl files, Plan 9 Cmdtab style.

A write holds one command per line; each line is split into words like a
POSIX shell does (quotes group words: `exec sh -c 'echo hi'`). Each command
is looked up in a table of `Command(name, (min_args, max_args), handler)`;
adding a command is adding a row. Lines run in order and the first failure
stops the write: its BpfsError is the write's result (commands on earlier
lines have run). The handler's text (`ok`, or later `ok PID`) is what reading
the ctl handle back gives.

Refusals, all EINVAL unless the command says otherwise:
    empty write, not UTF-8, NUL or other control bytes, more than MAX_CTL_WRITE
    bytes ("control message 'execmove' is 5391 bytes, over the 4096-byte limit"),
    unbalanced quotes; "unknown control message 'foo'";
    "wrong number of arguments for 'state'".

nodes/N/ctl commands:
    state STATE              root only (EPERM); up|unavailable|error (EINVAL);
                             node down: EHOSTDOWN
    reboot | halt | pwroff   root only (EPERM); the master sends
                             messages.Ctl(cmd=...) to the node daemon;
                             node down: EHOSTDOWN
    execmove OPTIONS         the writer's next execve runs on the node
                             (bpfs.wire.execreq grammar, EINVAL); node down:
                             EHOSTDOWN; no x permission: EACCES; the writer
                             is traced before the write returns. `ok PID`.
                             The writer is the handle's opener, pinned at
                             open (bpfs/fs/ops.py): ESRCH once it has ended
                             (its PID may be another process's by now),
                             EPERM once it is not the user it was (it ran a
                             set-user-ID program since); nothing is done.
                             With --nodes (a multi-node run) each rank is
                             checked alone; the write fails only if no rank
                             may run, and bpsh hears of the others' errors.
    exec [--] ARGV...        the master runs ARGV as the writer (uid, gid,
                             groups, cwd, environment, umask of the handle's
                             opener) and migrates it (bpfs/master/exec.py);
                             stdin /dev/null, output in procs/PID/stdout and
                             stderr. No options: a first word starting with
                             "-" other than "--" is EINVAL. No command: EINVAL;
                             node down: EHOSTDOWN; no x permission: EACCES;
                             not found in the writer's PATH: ENOENT; the
                             opener gone or changed: ESRCH, EPERM, as for
                             execmove. The write returns once the process
                             runs on the node. `ok PID`.
    Both act on the writer's own process on the master (they seize it, or read its
    environment and cwd). A writer on a node (a request its node daemon forwarded,
    `Caller.node` set) has its ghost here instead: execmove from a node arms it (its
    execve there is run in its ghost and migrated: bpfs/master/nodeexec.py); exec from a
    node is EOPNOTSUPP (bpsh on a node uses execmove).

procs/P/ctl commands (the process's uid or root, else EPERM; ESRCH once exited, or
once P is another process than the one the file was opened for):
    kill | stop | cont       SIGKILL, SIGSTOP, SIGCONT to the real process
    move N | move master     move the running process to node N or back to the master
                             (bpfs/master/moves.py: the write returns once it runs there)

procs/P/signal: one word, a number (9) or a name (KILL, SIGKILL, kill); EINVAL
otherwise. The table row named ANY matches every word and gets it as argument.
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

from bpfs.errors import BpfsError, einval
from bpfs.model import POWER_COMMANDS, Caller, Cluster
from bpfs.wire import execreq, messages

MAX_CTL_WRITE = 4096


class Services(Protocol):
    """What ctl handlers and the fs adapter need from the master."""

    cluster: Cluster

    async def send_node(self, node: int, msg: dict[str, Any]) -> None:
        """Send a wire message to node `node`'s daemon; EHOSTDOWN if not connected."""

    async def persist(self) -> None:
        """Write the state file if persistent data changed; returns once it is on disk."""

    async def arm_from_node(self, node: int, caller: Caller, req: execreq.ExecMove,
                            rank_errors: Sequence[BpfsError | None] = ()) -> int:
        """An execmove written on a node (`caller.node`): arm its writer's next execve
        there to run in its ghost here and migrate to `node` (bpfs/master/nodeexec.py)."""

    async def execmove(self, node: int, caller: Caller, req: execreq.ExecMove,
                       rank_errors: Sequence[BpfsError | None] = ()) -> int:
        """Arm the migration of the writer's next execve to `node`; its pid.

        With req.nodes, `rank_errors` says which ranks may not run (and why).
        ENOSYS when this master cannot migrate; the writer is `caller.pin`'s process,
        only while the pin proves it (ESRCH: gone, EPERM: not the user it was).
        """

    async def signal_proc(self, pid: int, sig: int) -> None:
        """Send `sig` to migrated process `pid` on its node (permission already checked)."""

    async def exec_command(self, node: int, caller: Caller, argv: list[str]) -> int:
        """Run `argv` as `caller` migrated to `node` (permission checked); its pid once it
        runs there. Errors: see bpfs/master/exec.py."""

    async def move_proc(self, caller: Caller, pid: int, target: int | None,
                        gen: int | None = None) -> str:
        """Move running process `pid` to node `target` (None: the master); returns once it
        runs there. Errors: see bpfs/master/moves.py."""


@dataclass(frozen=True)
class CtlContext:
    services: Services
    caller: Caller
    target: int               # the node number (nodes/N/ctl) or pid (procs/P/ctl)
    gen: int | None = None    # procs/P: the generation of the process the file is of


Handler = Callable[[CtlContext, list[str]], Awaitable[str]]


@dataclass(frozen=True)
class Command:
    name: str
    nargs: tuple[int, int | None]     # min, max (None: unbounded)
    handler: Handler


def parse(data: bytes) -> list[list[str]]:
    """Split a ctl write into commands (lists of words); EINVAL for garbage."""
    if len(data) > MAX_CTL_WRITE:
        raise einval(f"control message {_first_word(data)}is {len(data)} bytes, over the "
                     f"{MAX_CTL_WRITE}-byte limit")
    if b"\0" in data:
        raise einval("control message contains NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise einval("control message is not UTF-8 text") from None
    if any(not ch.isprintable() and ch not in "\t\n\r" for ch in text):
        raise einval("control message contains binary data")
    commands = [execreq.split_ctl_words(line) for line in text.split("\n")]
    commands = [c for c in commands if c]
    if not commands:
        raise einval("empty control message")
    return commands


def _first_word(data: bytes) -> str:
    """What an over-long write was, for its error: its first word, quoted and cut short,
    and a space ("" for a write of blanks)."""
    words = data[:80].split(maxsplit=1)
    if not words:
        return ""
    text = "".join(ch if ch.isprintable() else "?" for ch in words[0].decode("utf-8", "replace"))
    return f"{_printable(text)!r} "


ANY = "*"      # a row that matches every first word and gets the whole line as arguments


def lookup(table: Sequence[Command], words: list[str]) -> Command:
    """The table row for `words`; EINVAL naming the command when it does not fit."""
    name, args = words[0], words[1:]
    for cmd in table:
        if cmd.name == ANY:
            name, args = "argument", words
        if cmd.name in (name, ANY):
            lo, hi = cmd.nargs
            if len(args) < lo or (hi is not None and len(args) > hi):
                raise einval(f"wrong number of arguments for '{name}'")
            return cmd
    raise einval(f"unknown control message '{_printable(name)}'")


def _printable(name: str) -> str:
    return name if len(name) <= 64 else name[:61] + "..."


async def execute(table: Sequence[Command], ctx: CtlContext, data: bytes) -> str:
    """Run every command of a write in order; the last one's result text."""
    result = ""
    for words in parse(data):
        cmd = lookup(table, words)
        result = await cmd.handler(ctx, words if cmd.name == ANY else words[1:])
    return result


# ---- nodes/N/ctl ---------------------------------------------------------------

async def _state(ctx: CtlContext, args: list[str]) -> str:
    ctx.services.cluster.set_admin_state(ctx.target, args[0], ctx.caller)
    await ctx.services.persist()
    return "ok"


def _power(cmd: str) -> Handler:
    async def handler(ctx: CtlContext, args: list[str]) -> str:
        cluster = ctx.services.cluster
        cluster.check_power(ctx.target, cmd, ctx.caller)
        cluster.mark_power(ctx.target, cmd)
        await ctx.services.send_node(ctx.target, messages.Ctl(cmd=cmd))
        return "ok"
    return handler


def _on_master(ctx: CtlContext, what: str) -> None:
    """EOPNOTSUPP for `what` (exec) written from a node: it reads the writer's environment
    and cwd on the master, which a process on a node does not have there."""
    if ctx.caller.node is not None:
        raise BpfsError(errno.EOPNOTSUPP, f"{what} from a process on node {ctx.caller.node} "
                        "is not supported: use execmove (bpsh)")


async def _arm(ctx: CtlContext, req: execreq.ExecMove,
               errors: Sequence[BpfsError | None] = ()) -> int:
    """execmove: the writer on the master is seized; one on a node is armed there."""
    if ctx.caller.node is not None:
        return await ctx.services.arm_from_node(ctx.target, ctx.caller, req, errors)
    return await ctx.services.execmove(ctx.target, ctx.caller, req, errors)


async def _execmove(ctx: CtlContext, args: list[str]) -> str:
    req = execreq.parse_execmove(args)
    if req.nodes is None:
        ctx.services.cluster.check_run(ctx.target, ctx.caller)
        return f"ok {await _arm(ctx, req)}"
    if ctx.target not in req.nodes:
        raise einval(f"execmove --nodes: write it to the ctl of one of its nodes, "
                     f"not nodes/{ctx.target}/ctl")
    errors = rank_errors(ctx.services.cluster, req.nodes, ctx.caller)
    if all(errors):
        raise errors[0]         # type: ignore[misc]
    return f"ok {await _arm(ctx, req, errors)}"


def rank_errors(cluster: Cluster, nodes: Sequence[int], caller: Caller
                ) -> list[BpfsError | None]:
    """Why each rank of a multi-node run may not run (None: it may), as bproc's
    vexecmove reported per node; a node that does not exist is ENODEV, as for a single
    node whose ctl file is missing."""
    errors: list[BpfsError | None] = []
    for n in nodes:
        try:
            cluster.check_run(n, caller)
            errors.append(None)
        except BpfsError as exc:
            errors.append(BpfsError(errno.ENODEV, exc.message)
                          if exc.errno == errno.ENOENT else exc)
    return errors


def parse_exec(args: list[str]) -> list[str]:
    """`[--] ARGV...` -> ARGV; EINVAL for an option (there are none), no command or an
    empty command name (`exec ""`: no PATH lookup can find it)."""
    if args and args[0] == "--":
        args = args[1:]
    elif args and args[0].startswith("-"):
        raise einval(f"exec: unknown option {_printable(args[0])!r} (no options; "
                     "put -- before a command starting with -)")
    if not args:
        raise einval("exec: no command")
    if not args[0]:
        raise einval("exec: the command name is empty")
    return args


async def _exec(ctx: CtlContext, args: list[str]) -> str:
    argv = parse_exec(args)
    ctx.services.cluster.check_run(ctx.target, ctx.caller)
    _on_master(ctx, "exec")
    pid = await ctx.services.exec_command(ctx.target, ctx.caller, argv)
    return f"ok {pid}"


NODE_CTL: tuple[Command, ...] = (
    Command("state", (1, 1), _state),
    *(Command(c, (0, 0), _power(c)) for c in POWER_COMMANDS),
    Command("execmove", (0, None), _execmove),
    Command("exec", (0, None), _exec),
)


# ---- procs/P/ctl and procs/P/signal ------------------------------------------------

def parse_signal(word: str) -> int:
    """`9`, `KILL`, `SIGKILL`, `kill` -> 9; EINVAL for anything else (0 is no signal).

    Digits are ASCII only: str.isdigit() and int() also take '٩' or '９' as 9."""
    if word.isascii() and word.isdigit():
        n = int(word)
        if 1 <= n < signal.NSIG:
            return n
        raise einval(f"no signal number {word}")
    name = word.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise einval(f"unknown signal {word[:32]!r}") from None


async def send_signal(ctx: CtlContext, sig: int) -> str:
    """Checked for every command of a write: an earlier one may have waited, and the pid
    have gone to another process meanwhile (ESRCH: not the generation the file is of)."""
    ctx.services.cluster.check_signal(ctx.target, ctx.caller, ctx.gen)
    await ctx.services.signal_proc(ctx.target, sig)
    return "ok"


def _signal_cmd(sig: int) -> Handler:
    async def handler(ctx: CtlContext, args: list[str]) -> str:
        return await send_signal(ctx, sig)
    return handler


async def _signal_word(ctx: CtlContext, args: list[str]) -> str:
    return await send_signal(ctx, parse_signal(args[0]))


def parse_place(word: str) -> int | None:
    """`3` -> node 3; `master` or `-1` -> None (BPROC_NODE_MASTER); EINVAL otherwise."""
    if word in ("master", "-1"):
        return None
    if word.isascii() and word.isdigit() and len(word) <= 7:
        return int(word)
    raise einval(f"move: {word[:32]!r} is neither a node number nor `master`")


async def _move(ctx: CtlContext, args: list[str]) -> str:
    return await ctx.services.move_proc(ctx.caller, ctx.target, parse_place(args[0]), ctx.gen)


PROC_CTL: tuple[Command, ...] = (
    Command("kill", (0, 0), _signal_cmd(signal.SIGKILL)),
    Command("stop", (0, 0), _signal_cmd(signal.SIGSTOP)),
    Command("cont", (0, 0), _signal_cmd(signal.SIGCONT)),
    Command("move", (1, 1), _move),
)

PROC_SIGNAL: tuple[Command, ...] = (Command(ANY, (1, 1), _signal_word),)

"""bpctl: change nodes' state and access rights, bproc 4.0 style, through /bproc files.

    bpctl -S NODESPEC [-s STATE] [-R|-H|-P] [-m MODE] [-u USER] [-g GROUP] ...

Options act in the order given, each on every node of the latest `-S` set, like
bproc's bpctl (clients/bpctl.c), which is why argv is parsed here by hand
(getopt_long style: bundles like `-RH`, `-S1`, `--state=up`, unique prefixes of
long options) rather than by click, which groups values per option. Unlike
bproc, every argument is checked before anything is done: a bad mode, an unknown
user or a state typo changes nothing.

Each action is one operation on the node's files; its errno is the result:
`-s/-R/-H/-P` write one line (`state up`, `reboot`, `halt`, `pwroff`) to
nodes/N/ctl; `-m/-u/-g` are chmod/chown/chgrp of the nodes/N directory. A node
that fails prints `N: <strerror>` on stderr and bpctl goes on, exiting 1 at the end.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple, NoReturn, Sequence

from bpfs import __version__, nodeset
from bpfs.cli import common
from bpfs.formats import NODE_STATES

PROG = "bpctl"

USAGE = f"""\
Usage: bpctl -S NODESPEC [-s STATE] [-R|-H|-P] [-m MODE] [-u USER] [-g GROUP] ...

  Change the state or the access rights of cluster nodes. Options act in the
  order given, each on every node selected by the latest -S.

Options:
  -S, --slave NODESPEC   Select the nodes the following options act on:
                         5, n5, 5-8, 5-, all, allup, up, !down, allnotdown, ...
  -s, --state STATE      Set the node state: {', '.join(NODE_STATES[:4])},
                         {', '.join(NODE_STATES[4:])}.
  -R, --reboot           Reboot the node.
  -H, --halt             Halt the node.
  -P, --pwroff           Power the node off.
  -m, --mode MODE        Set who may run processes on the node: octal, only the
                         x bits count (0111 everyone, 0110 owner and group).
  -u, --user USER        Set the node's owner (name or number).
  -g, --group GROUP      Set the node's group (name or number).
      --mount DIR        bpfs mount point [$BPROC_MOUNT or /bproc].
  -v, -V, --version      Show the version and exit.
  -h, --help             Show this message and exit.

  A node that fails prints "N: reason" on stderr; the others go on.
  Exit status: 0 ok, 1 some node failed or a bad value, 2 bad usage.
  Example: bpctl -S 2-3 -s unavailable -m 0110 -g staff
"""


class Opt(NamedTuple):
    short: str
    long: str
    takes_arg: bool


OPTIONS = [Opt("h", "help", False), Opt("v", "version", False), Opt("V", "", False),
           Opt("S", "slave", True), Opt("s", "state", True), Opt("R", "reboot", False),
           Opt("H", "halt", False), Opt("P", "pwroff", False), Opt("m", "mode", True),
           Opt("u", "user", True), Opt("g", "group", True), Opt("f", "", False),
           Opt("", "mount", True)]


# ---- parsing argv, in order ------------------------------------------------------------

def parse_argv(argv: Sequence[str]) -> list[tuple[Opt, str]]:
    """getopt_long-style: (option, value) pairs in command-line order; CliError(2) on misuse."""
    out: list[tuple[Opt, str]] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            if args:
                _usage_error(f"unexpected argument '{args[0]}'")
            break
        if arg.startswith("--"):
            out.append(_long(arg, args))
        elif arg.startswith("-") and len(arg) > 1:
            out.extend(_shorts(arg, args))
        else:
            _usage_error(f"unexpected argument '{arg}'")
    return out


def _long(arg: str, rest: list[str]) -> tuple[Opt, str]:
    name, eq, value = arg[2:].partition("=")
    matches = [o for o in OPTIONS if o.long and o.long.startswith(name)]
    exact = [o for o in matches if o.long == name]
    if len(exact or matches) != 1:
        _usage_error(f"{'ambiguous' if matches else 'unknown'} option '--{name}'")
    opt = (exact or matches)[0]
    if not opt.takes_arg:
        if eq:
            _usage_error(f"option '--{opt.long}' takes no value")
        return opt, ""
    if not eq:
        if not rest:
            _usage_error(f"option '--{opt.long}' needs a value")
        value = rest.pop(0)
    return opt, value


def _shorts(arg: str, rest: list[str]) -> list[tuple[Opt, str]]:
    out = []
    for i, ch in enumerate(arg[1:], start=1):
        opt = next((o for o in OPTIONS if o.short == ch), None)
        if opt is None:
            _usage_error(f"unknown option '-{ch}'")
        if not opt.takes_arg:
            out.append((opt, ""))
            continue
        value = arg[i + 1:]
        if not value:
            if not rest:
                _usage_error(f"option '-{ch}' needs a value")
            value = rest.pop(0)
        out.append((opt, value))
        break
    return out


def _usage_error(message: str) -> NoReturn:
    common.fail(f"{message}\nTry 'bpctl --help' for help.", common.EXIT_USAGE)


# ---- the values -------------------------------------------------------------------

def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        common.fail(f"invalid mode: {text} (an octal number such as 0111)")
    return mode


def _parse_id(text: str, kind: str, lookup: Callable[[str], int]) -> int:
    try:
        return lookup(text)
    except KeyError:
        pass
    if text.isascii() and text.isdigit():
        return int(text)
    common.fail(f"unknown {kind}: {text}")


def parse_user(text: str) -> int:
    import pwd
    return _parse_id(text, "user", lambda name: pwd.getpwnam(name).pw_uid)


def parse_group(text: str) -> int:
    import grp
    return _parse_id(text, "group", lambda name: grp.getgrnam(name).gr_gid)


def parse_state(text: str) -> str:
    if text not in NODE_STATES:
        common.fail(f"unknown state: {text} (states: {', '.join(NODE_STATES)})")
    return text


# ---- the actions ------------------------------------------------------------------

Action = Callable[[str, int], None]      # (mount, node) -> None, raising OSError


def write_ctl(command: str) -> Action:
    """One write of `command` to nodes/N/ctl; the write's errno is the command's result."""
    data = f"{command}\n".encode()

    def act(mount: str, node: int) -> None:
        fd = os.open(os.path.join(common.node_dir(mount, node), "ctl"),
                     os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return act


def chmod(mode: int) -> Action:
    return lambda mount, node: os.chmod(common.node_dir(mount, node), mode)


def chown(uid: int, gid: int) -> Action:
    return lambda mount, node: os.chown(common.node_dir(mount, node), uid, gid)


def build_steps(pairs: list[tuple[Opt, str]]) -> list[tuple[str, object]]:
    """Check every value up front: ("select", NodeSpec) and ("act", Action) steps in order."""
    steps: list[tuple[str, object]] = []
    selected = False
    for opt, value in pairs:
        if opt.short == "S":
            try:
                steps.append(("select", nodeset.parse(value)))
            except ValueError as e:
                common.fail(str(e))
            selected = True
            continue
        action = _action(opt, value)
        if action is None:
            continue
        if not selected:
            _usage_error(f"-{opt.short} needs nodes: give -S NODESPEC before it")
        steps.append(("act", action))
    if not any(kind == "act" for kind, _ in steps):
        _usage_error("nothing to do")
    return steps


def _action(opt: Opt, value: str) -> Action | None:
    if opt.short == "s":
        return write_ctl(f"state {parse_state(value)}")
    if opt.short in ("R", "H", "P"):
        return write_ctl(opt.long)
    if opt.short == "m":
        return chmod(parse_mode(value))
    if opt.short == "u":
        return chown(parse_user(value), -1)
    if opt.short == "g":
        return chown(-1, parse_group(value))
    return None                         # -f (ignored, as bproc did) and --mount


def select_nodes(spec: nodeset.NodeSpec, mount: str) -> list[int]:
    rows = [] if spec.only_numbers else [(r.number, r.state) for r in common.read_status(mount)]
    return spec.resolve(rows, keep_unknown=True)


def execute(steps: list[tuple[str, object]], mount: str) -> int:
    """Run the steps in order; report each failing node as `N: strerror`."""
    nodes: list[int] = []
    failed = False
    for kind, what in steps:
        if kind == "select":
            nodes = select_nodes(what, mount)       # type: ignore[arg-type]
            continue
        for node in nodes:
            try:
                what(mount, node)                   # type: ignore[operator]
            except OSError as e:
                sys.stderr.write(common.node_error(node, e) + "\n")
                failed = True
    return common.EXIT_FAIL if failed else common.EXIT_OK


def run(argv: Sequence[str]) -> int:
    pairs = parse_argv(argv)
    names = {opt.short or opt.long for opt, _ in pairs}
    if "h" in names:
        sys.stdout.write(USAGE)
        return 0
    if names & {"v", "V"}:
        sys.stdout.write(f"{PROG} version {__version__}\n")
        return 0
    mounts = [value for opt, value in pairs if opt.long == "mount"]
    mount = common.mount_point(mounts[-1] if mounts else None)
    return execute(build_steps(pairs), mount)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status."""
    argv = sys.argv[1:] if args is None else list(args)
    return common.run(PROG, lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

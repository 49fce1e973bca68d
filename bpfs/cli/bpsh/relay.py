"""The relay: bpsh's stdio server for a process that did not start under bpsh.

    python -m bpfs.cli.bpsh.relay --pid P --token-fd M --host H --ready-fd N [--fds 0,1,2]

When the master moves a plain process of its own (started by a shell on the master, say)
to a node, that process's fds 0-2 become links (docs/bpsh.md, "Links made again"), and
something on the master must stand at their other end and hold what they were: the
relay. The master starts it as the process's user with fds 0-2 being the process's own
stdio (the same open files: a terminal, a pipe, a socket), and it serves the links of
PID P exactly as bpsh serves its children's (`stdio.StdioServer`, own_children=False):
first links with plain headers, then `again` ones each time P moves.

- the links' token comes on fd M (read to EOF, then closed): a command line is anyone's
  to read (/proc/PID/cmdline), and the token is all that keeps other users' links out.
  `--token T` does the same, for tests and by hand;
- it listens on H, port from the kernel, and writes "PORT\\n" on fd N, then closes N;
- stdout/stderr links are copied to its fds 1 and 2, stdin read from its fd 0 goes to
  P's stdin link; stdin is not read before that link has come (until then P, stopped on
  the master, may still be its reader: a move that fails leaves it all to P);
- it ends (status 0) once P has ended (a pidfd of P, the ghost while P runs on a node)
  and its output links are at EOF; then it stops reading stdin. A P that never connects
  a link (a move that failed) ends it a second after P ends, or the master kills it
  (SIGTERM, SIGINT, SIGHUP: it dies of them). It forwards no signal: signals reach P
  through its ghost, as for any process.
- it has no controlling terminal of its own (start it in a new session): reading P's
  terminal then never stops it with SIGTTIN.
- its name (/proc/RELAY/comm) is `bprelay P`: `pgrep -x 'bprelay P'` finds it, spawned
  as here or forked by the master's relay fork-server (bpfs/cli/bpsh/relayfork.py, which
  runs `run_forked` in a child that is P's user already).

Errors before serving (bad arguments, no such P, an address it cannot bind): a line on
stderr and exit status 2 (usage) or 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from typing import Sequence

from bpfs.cli import common
from bpfs.cli.bpsh.output import OutputOptions
from bpfs.cli.bpsh.stdio import LOCAL, StdioServer
from bpfs.errors import BpfsError
from bpfs.wire.execreq import is_token

PROG = "bpsh-relay"


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="python -m bpfs.cli.bpsh.relay", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=doc.split("\n\n", 2)[2].split("\nErrors")[0],
        epilog="Exit status: 0 once P has ended and its output is through, 1 on a "
               "failure, 2 on bad usage.")
    p.add_argument("--pid", type=int, required=True, help="the process whose links to serve")
    token = p.add_mutually_exclusive_group(required=True)
    token.add_argument("--token-fd", type=int, metavar="M",
                       help="an inherited fd to read the links' token from (to EOF)")
    token.add_argument("--token", help="the links' token: 32 lowercase hex digits (seen "
                       "by every user in the command line: for tests)")
    p.add_argument("--host", required=True, help="the address to listen on (the master's "
                   "address the nodes reach)")
    p.add_argument("--ready-fd", type=int, required=True,
                   help='an inherited fd to write "PORT\\n" on, then closed')
    p.add_argument("--fds", default="0,1,2",
                   help="which of P's fds come as links (default 0,1,2)")
    return p


def _fds(text: str) -> set[int]:
    try:
        fds = {int(w) for w in text.split(",") if w}
    except ValueError:
        fds = {-1}
    if not fds or not fds <= {0, 1, 2}:
        raise common.CliError(f"--fds {text!r}: a list of 0, 1, 2", common.EXIT_USAGE)
    return fds


def _read_token(fd: int) -> str:
    """The token from fd `fd`, read to EOF (at most 4096 bytes), then closed."""
    try:
        with open(fd, "rb", closefd=True) as f:
            return f.read(4096).decode("ascii", "replace").strip()
    except OSError as exc:
        raise common.CliError(f"--token-fd {fd}: {exc.strerror}", common.EXIT_USAGE) from None


def listen(host: str) -> socket.socket:
    """A listener on `host`, port from the kernel (IPv6 if the address has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((host, 0))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def name_self(pid: int) -> None:
    """/proc/self/comm = `bprelay P` (15 bytes at most: a PID has 7 digits at most)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(f"bprelay {pid}")
    except OSError:
        pass                # a name only (a forked relay named itself while root)


def serve(pid: int, token: str, host: str, ready_fd: int, fds: set[int]) -> int:
    """Listen, say the port, serve P's links until P is over; the exit status."""
    if not is_token(token) or pid <= 0:
        raise common.CliError("--token must be 32 hex digits and --pid a PID", common.EXIT_USAGE)
    name_self(pid)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise BpfsError(exc.errno or errno.ESRCH, f"pid {pid}: {exc.strerror}") from None
    listener = None
    try:
        listener = listen(host)
        server = StdioServer(listener, token, OutputOptions(), prog=PROG, own_children=False,
                             stdin_fd=0 if 0 in fds else None)
        server.add_process(0, LOCAL, pid, fds, pidfd=pidfd)
        pidfd = -1                                  # the server's now
        os.write(ready_fd, f"{listener.getsockname()[1]}\n".encode())
        os.close(ready_fd)
        ready_fd = -1
        server.run()
        return 0
    finally:
        for fd in (pidfd, ready_fd):
            if fd >= 0:
                os.close(fd)
        if listener is not None:
            listener.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    def body() -> int:
        args = _parser().parse_args(argv)
        token = args.token if args.token is not None else _read_token(args.token_fd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)   # die of it, as of SIGTERM
        return serve(args.pid, token, args.host, args.ready_fd, _fds(args.fds))
    return common.run(PROG, body)


def run_forked(pid: int, token_fd: int, host: str, ready_fd: int) -> int:
    """The relay in a child of the relay fork-server, its user already and P's fds 0-2 its
    own: as `main` with --token-fd, serving all three fds; the exit status."""
    def body() -> int:
        return serve(pid, _read_token(token_fd), host, ready_fd, {0, 1, 2})
    return common.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())

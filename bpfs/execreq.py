"""The execmove request (bpsh -> master, through nodes/N/ctl) and the stdio link (node -> bpsh).

One module owns both formats, so bpsh, the master and the node daemon agree.

execmove request: one ctl line, shell-quoted words (shlex):

    execmove --port PORT --token TOKEN --rank RANK [--stdin IO] [--stdout IO] [--stderr IO]
    IO := "socket"          connect this fd back to bpsh (default)
        | "null"            /dev/null on the node
        | "file:" PATH      PATH opened on the node (stdin read-only; stdout/stderr
                            created/truncated, mode 0666 & ~umask)
    TOKEN := 32 lowercase hex digits, random per bpsh run

The writer's *next execve* is migrated to the node; bpsh's child writes the request
and then calls execve itself.

stdio link: for each fd whose IO is "socket", the node opens one TCP connection to
bpsh (at the master's address, port PORT) and sends one header line, then the data:

    header := TOKEN SP PID SP FD NL          FD in 0, 1, 2
    error  := TOKEN SP PID SP "err" SP ERRNO SP MESSAGE NL

A connection whose first line does not start with the run's token is dropped. The
error form tells bpsh that the migration of PID failed before the program ran
(printed as `N: strerror(ERRNO)`); the ghost then exits with status 255.
"""

from __future__ import annotations

import re
import shlex
from bpfs.record import record

from bpfs.errors import einval

TOKEN_RE = re.compile(r"[0-9a-f]{32}")
HEADER_MAX = 512


def parse_io(text: str) -> str:
    if text in ("socket", "null") or (text.startswith("file:") and len(text) > 5):
        return text
    raise einval(f"bad stdio spec {text!r}: want socket, null or file:PATH")


@record(frozen=True)
class ExecMove:
    port: int
    token: str
    rank: int = 0
    stdin: str = "socket"
    stdout: str = "socket"
    stderr: str = "socket"

    @property
    def io(self) -> tuple[str, str, str]:
        return (self.stdin, self.stdout, self.stderr)

    def render(self) -> str:
        words = ["execmove", "--port", str(self.port), "--token", self.token,
                 "--rank", str(self.rank), "--stdin", self.stdin, "--stdout", self.stdout,
                 "--stderr", self.stderr]
        return " ".join(shlex.quote(w) for w in words) + "\n"


_OPTS = {"--port": "port", "--token": "token", "--rank": "rank",
         "--stdin": "stdin", "--stdout": "stdout", "--stderr": "stderr"}


def parse_execmove(args: list[str]) -> ExecMove:
    """Parse the words after `execmove`; raise EINVAL naming what is wrong."""
    if len(args) % 2:
        raise einval("execmove: every option takes a value")
    vals: dict[str, str] = {}
    for opt, val in zip(args[::2], args[1::2]):
        if opt not in _OPTS:
            raise einval(f"execmove: unknown option {opt!r}")
        vals[_OPTS[opt]] = val
    for need in ("port", "token"):
        if need not in vals:
            raise einval(f"execmove: --{need} is required")
    if not TOKEN_RE.fullmatch(vals["token"]):
        raise einval("execmove: --token must be 32 hex digits")
    try:
        port, rank = int(vals["port"]), int(vals.get("rank", "0"))
    except ValueError:
        raise einval("execmove: --port and --rank take numbers") from None
    if not 0 < port < 65536 or rank < 0:
        raise einval("execmove: port or rank out of range")
    return ExecMove(port, vals["token"], rank, *(parse_io(vals.get(k, "socket"))
                                                  for k in ("stdin", "stdout", "stderr")))


def split_ctl_words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise einval(f"cannot parse {line!r}: {exc}") from None


# ---- stdio link headers --------------------------------------------------------

def render_header(token: str, pid: int, fd: int) -> bytes:
    return f"{token} {pid} {fd}\n".encode()


def render_error(token: str, pid: int, err: int, message: str) -> bytes:
    message = " ".join(message.split())[:300]
    return f"{token} {pid} err {err} {message}\n".encode()


@record(frozen=True)
class Header:
    pid: int
    fd: int             # 0, 1, 2; -1 for an error report
    errno: int = 0
    message: str = ""


def parse_header(line: bytes, token: str) -> Header | None:
    """The header of a stdio link, or None when it is not for this run (drop it)."""
    try:
        text = line.decode("ascii").rstrip("\n")
    except UnicodeDecodeError:
        return None
    parts = text.split(" ", 4)
    if len(parts) < 3 or parts[0] != token or not parts[1].isdigit():
        return None
    pid = int(parts[1])
    if parts[2] == "err" and len(parts) >= 4 and parts[3].isdigit():
        return Header(pid, -1, int(parts[3]), parts[4] if len(parts) == 5 else "")
    if parts[2] in ("0", "1", "2") and len(parts) == 3:
        return Header(pid, int(parts[2]))
    return None

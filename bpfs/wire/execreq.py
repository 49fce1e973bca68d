"""The execmove request (bpsh -> master, through nodes/N/ctl) and the stdio link (node -> bpsh).

One module owns both formats, so bpsh, the master and the node daemon agree.

execmove request: one ctl line, shell-quoted words (shlex):

    execmove --port PORT --token TOKEN --rank RANK [--nodes LIST]
             [--stdin IO] [--stdout IO] [--stderr IO]
    LIST := NODESPEC        a multi-node run (bproc's vexecmove), written to the ctl of
                            one of the nodes listed; rank k runs on the k-th node (order
                            and duplicates kept; at most MAX_RANKS); --rank must be 0.
                            Node numbers and closed ranges only, in the compact form of
                            `bpfs.nodeset` ("0-1023", "3,1,3", "0-5,7"): the request is
                            one ctl write, at most ctl.MAX_CTL_WRITE bytes
    IO := "socket"          connect this fd back to bpsh (default)
        | "null"            /dev/null on the node
        | "file:" PATH      PATH opened on the node (stdin read-only; stdout/stderr
                            created/truncated, mode 0666 & ~umask)
        | "stdout"          --stderr only: fd 2 is the process's fd 1, as `2>&1` (bpsh
                            asks for it when its own stdout and stderr are one file, so
                            one link carries both)
    TOKEN := 32 lowercase hex digits, random per bpsh run

The writer's *next execve* is migrated to the node; bpsh's child writes the request
and then calls execve itself. With --nodes the master dumps that one execve once and
makes one ghost per rank (the writer stands for the first rank that may run, clones
of it for the others), then sends every node the same image; the environment should
hold `BPROC_RANK=XXXXXXX`, which each node overwrites with its rank.

stdio link: for each fd whose IO is "socket", the node opens one TCP connection to
bpsh (at the master's address, port PORT) and sends one header line, then the data:

    header := TOKEN SP PID SP FD NL          FD in 0, 1, 2
            | TOKEN SP PID SP FD SP "again" SP CONSUMED NL
    error  := TOKEN SP PID SP "err" SP ERRNO SP MESSAGE NL
    CONSUMED := 1*19 DIGIT, at most MAX_CONSUMED

    ranks  := TOKEN SP PID SP "ranks" NL  BODY EOF      (the master, for --nodes)
    BODY   := R (SP R)* NL      R: the PID of rank k's ghost, or -ERRNO: rank k never ran

A connection whose first line does not start with the run's token is dropped. The
error form tells bpsh that the migration of PID failed before the program ran
(printed as `bpsh: MESSAGE`, then `N: strerror(ERRNO)`); the ghost then exits with
status 255. The ranks
link (PID is the writer's) tells bpsh which of its children stands for which rank;
the master sends it before any node is asked to restore, but links are separate
connections: bpsh holds the headers of PIDs it does not know yet until it arrives.

The `again` form is a link made again because its process moved (node A -> node B, or
back to the master; docs/bpsh.md "Links made again"). For fd 1 and 2 the server reads
the old link to its EOF first, then this one; CONSUMED is 0 and means nothing. For fd 0,
CONSUMED is how many bytes of its stdin stream (counted from the stream's start) the
process had read when it was stopped: the server sends the stream again from there on
this link, and no more on the old one.
"""

from __future__ import annotations

from bpfs.record import record

from bpfs.errors import einval

# bpsh imports this module at start-up: no `re` and no `shlex` at module level (with
# `enum` and `functools` behind them, ~3 ms of every bpsh run). `is_token` checks a token
# by hand, `quote` is shlex.quote's rule; the parsing side imports shlex when it is used.
HEX_DIGITS = "0123456789abcdef"
TOKEN_LEN = 32
HEADER_MAX = 512
MAX_RANKS = 65536
MAX_NODE = 999_999_999  # the largest node number a request may name
MAX_CONSUMED = (1 << 63) - 1    # the largest CONSUMED a header may carry (tcpi_bytes_received
                                # is a u64; no stdin stream gets anywhere near it)
DIGITS = "0123456789"
RANKS_FD = -2           # Header.fd of a ranks link


def is_token(text: str) -> bool:
    """True for TOKEN: exactly 32 lowercase hex digits (checked by hand: no `re`)."""
    return len(text) == TOKEN_LEN and not text.strip(HEX_DIGITS)


# shlex.quote's safe characters: ASCII letters and digits and these (its [\w@%+=:,./-]).
_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-"


def quote(word: str) -> str:
    """shlex.quote(word), without importing shlex (and `re`)."""
    if not word:
        return "''"
    if not word.strip(_SAFE):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def parse_io(text: str, fd: int = 0) -> str:
    """IO spec `text` for fd `fd` (0, 1, 2), or EINVAL."""
    if text in ("socket", "null") or (text.startswith("file:") and len(text) > 5):
        return text
    if text == "stdout" and fd == 2:
        return text
    raise einval(f"bad stdio spec {text!r} for fd {fd}: want socket, null or file:PATH"
                 + (" or stdout" if fd == 2 else ""))


@record(frozen=True)
class ExecMove:
    port: int
    token: str
    rank: int = 0
    stdin: str = "socket"
    stdout: str = "socket"
    stderr: str = "socket"
    nodes: tuple[int, ...] | None = None     # a multi-node run: rank k on nodes[k]

    @property
    def io(self) -> tuple[str, str, str]:
        return (self.stdin, self.stdout, self.stderr)

    def render(self) -> str:
        words = ["execmove", "--port", str(self.port), "--token", self.token,
                 "--rank", str(self.rank), "--stdin", self.stdin, "--stdout", self.stdout,
                 "--stderr", self.stderr]
        if self.nodes is not None:
            from bpfs.nodeset import compact    # multi-node runs only (see the top)
            words += ["--nodes", compact(self.nodes)]
        return " ".join(quote(w) for w in words) + "\n"


_OPTS = {"--port": "port", "--token": "token", "--rank": "rank", "--nodes": "nodes",
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
    if not is_token(vals["token"]):
        raise einval("execmove: --token must be 32 hex digits")
    try:
        port, rank = int(vals["port"]), int(vals.get("rank", "0"))
    except ValueError:
        raise einval("execmove: --port and --rank take numbers") from None
    if not 0 < port < 65536 or rank < 0:
        raise einval("execmove: port or rank out of range")
    nodes = _parse_nodes(vals["nodes"]) if "nodes" in vals else None
    if nodes is not None and rank:
        raise einval("execmove: --nodes numbers its ranks from 0; --rank must be 0")
    return ExecMove(port, vals["token"], rank, *(parse_io(vals.get(k, "socket"), fd)
                                                  for fd, k in enumerate(("stdin", "stdout",
                                                                          "stderr"))),
                    nodes=nodes)


def _parse_nodes(text: str) -> tuple[int, ...]:
    """LIST -> the node of each rank; EINVAL for anything but numbers and closed ranges."""
    from bpfs import nodeset
    try:
        nodes = nodeset.expand(text, limit=MAX_RANKS)
    except ValueError as exc:
        raise einval(f"execmove: --nodes: {exc}") from None
    if not nodes or min(nodes) < 0 or max(nodes) > MAX_NODE:
        raise einval("execmove: --nodes takes node numbers and ranges (0-1023,2000), "
                     "not the master")
    return tuple(nodes)


def split_ctl_words(line: str) -> list[str]:
    """One ctl line split into words as a POSIX shell does: how bpfs.ctl.parse reads every
    line of a ctl write, an execmove request's too; EINVAL for unbalanced quotes."""
    import shlex        # the master's side only; see the top of the module
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise einval(f"bad quoting in control message: {exc}") from None


# ---- stdio link headers --------------------------------------------------------

def render_header(token: str, pid: int, fd: int, consumed: int | None = None) -> bytes:
    """A link's header; with `consumed` (an int, 0 for fd 1 and 2) the `again` form."""
    if consumed is None:
        return f"{token} {pid} {fd}\n".encode()
    if not 0 <= consumed <= MAX_CONSUMED:
        raise einval(f"stdio link of pid {pid} fd {fd}: CONSUMED {consumed} out of range")
    return f"{token} {pid} {fd} again {consumed}\n".encode()


def render_ranks(token: str, pid: int, ranks: list[int]) -> bytes:
    """The ranks link, header and body: rank k's ghost PID, or -ERRNO if it never ran."""
    return f"{token} {pid} ranks\n{' '.join(map(str, ranks))}\n".encode()


def parse_ranks(body: bytes, count: int) -> list[int] | None:
    """The body of a ranks link, or None unless it is `count` PIDs or -ERRNOs."""
    try:
        ranks = [int(w) for w in body.decode("ascii").split()]
    except (UnicodeDecodeError, ValueError):
        return None
    return ranks if len(ranks) == count and all(r != 0 for r in ranks) else None


def render_error(token: str, pid: int, err: int, message: str) -> bytes:
    message = " ".join(message.split())[:300]
    return f"{token} {pid} err {err} {message}\n".encode()


@record(frozen=True)
class Header:
    pid: int
    fd: int             # 0, 1, 2; -1 for an error report, RANKS_FD for a ranks link
    errno: int = 0
    message: str = ""
    again: bool = False     # a link made again after a move (fd 0, 1, 2 only)
    consumed: int = 0       # again, fd 0: the stdin bytes the process had read


def parse_count(text: str, limit: int) -> int | None:
    """A decimal count of at most `limit` from untrusted text (ASCII digits only, no
    sign, no spaces, no more digits than `limit` has), or None."""
    if not text or len(text) > len(str(limit)) or text.strip(DIGITS):
        return None
    value = int(text)
    return value if value <= limit else None


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
    if parts[2] == "ranks" and len(parts) == 3:
        return Header(pid, RANKS_FD)
    if parts[2] not in ("0", "1", "2"):
        return None
    if len(parts) == 3:
        return Header(pid, int(parts[2]))
    if len(parts) == 5 and parts[3] == "again":
        consumed = parse_count(parts[4], MAX_CONSUMED)
        if consumed is not None:
            return Header(pid, int(parts[2]), again=True, consumed=consumed)
    return None

"""What every bpfs command shares: the mount point, reading /bproc, and error reporting.

The one place that turns errors into what a user reads: `run` calls a command's
body and maps `CliError`, `BpfsError` and `OSError` to `prog: what: strerror` on
stderr and an exit status, never a traceback. Exit statuses: 0 success, 1 an
operation failed, 2 bad usage, 130 interrupted (Ctrl-C).

Kept light on purpose (os, sys and bpfs.errors; bpfs.formats only once /bproc/status is
read): it is imported by every CLI at start-up, and start-up time is most of a bpstat
run or a bpsh run.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False  # not at start-up (bench/results-startup.md); annotations only
if TYPE_CHECKING:
    from typing import Callable, NoReturn, Sequence, TypeVar

    from bpfs import formats

    T = TypeVar("T")

from bpfs.errors import BpfsError

DEFAULT_MOUNT = "/bproc"
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A failure to report as `prog: message` and exit with `status`; no traceback."""

    def __init__(self, message: str, status: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def mount_point(option: str | None = None) -> str:
    """The /bproc mount: `--mount DIR`, else $BPROC_MOUNT, else /bproc."""
    return option or os.environ.get("BPROC_MOUNT") or DEFAULT_MOUNT


def describe(exc: BaseException) -> str:
    """`what: strerror` for an OSError or BpfsError, the message for anything else."""
    if isinstance(exc, OSError):
        what = exc.filename if exc.filename is not None else None
        text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
        return f"{what}: {text}" if what is not None else text
    if isinstance(exc, BpfsError):
        return exc.message
    return str(exc)


def node_error(node: int, exc: OSError | BpfsError) -> str:
    """bproc's per-node failure line: `2: Operation not permitted`."""
    err = exc.errno or 0
    return f"{node}: {os.strerror(err) if err else exc}"


def run(prog: str, body: Callable[[], int | None]) -> int:
    """Run `body`, turning user-facing errors into `prog: ...` lines and an exit status."""
    try:
        return body() or EXIT_OK
    except CliError as e:
        warn(prog, e.message)
        return e.status
    except (BpfsError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        warn(prog, describe(e))
        return EXIT_FAIL
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED


def exit_now(status: int) -> "NoReturn":
    """Flush and leave without the interpreter's shutdown (~5-8 ms of a short command's
    life here); for console entry points only, once nothing else is left to do."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def warn(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()


def _broken_pipe() -> int:
    """`bpstat | head`: stop quietly, and keep Python from complaining at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return EXIT_FAIL


def fail(message: str, status: int = EXIT_FAIL) -> NoReturn:
    raise CliError(message, status)


# ---- reading /bproc ---------------------------------------------------------------

def read_file(path: str) -> str:
    """A whole /bproc file as text (they are small; one read is usually enough)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_status(mount: str) -> list[formats.NodeRow]:
    """The rows of $MOUNT/status; a missing file means bpfs is not mounted there."""
    from bpfs import formats        # not at start-up: bpsh seldom needs it
    path = os.path.join(mount, "status")
    try:
        text = read_file(path)
    except FileNotFoundError:
        fail(f"{path}: No such file or directory (is bpfs mounted? use --mount or "
             f"BPROC_MOUNT)")
    return parse_or_fail(formats.parse_status, text, path)


def parse_or_fail(parser: Callable[[str], T], text: str, path: str) -> T:
    """Apply a formats parser; a ValueError there is the master's bug, reported as such."""
    try:
        return parser(text)
    except ValueError as e:
        fail(f"{path}: unexpected content ({e}); this is a bug in the bpfs master")


def node_dir(mount: str, node: int) -> str:
    return os.path.join(mount, "nodes", str(node))

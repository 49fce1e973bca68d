"""/proc/TID/status, read once and split into its fields: the one parser for fs, migrate,
the master and pin.

    parse(data: bytes) -> dict[str, str]     every `Key:<TAB>value` line, value stripped
    read(tid: int) -> dict[str, str]         parse() of /proc/TID/status

The file is one field a line, the name before the first colon (`Name:\tsh`,
`Uid:\t0\t0\t0\t0`, `SigPnd:\t0000000000000000`). Lines are split on "\\n" only: the
kernel escapes a newline in a task's name, but not the other characters that
`str.splitlines` takes for line breaks (\\x1c-\\x1e, \\x85, U+2028), so a process named
"x\\x1cUid: 0" must not add a field. A line without a colon is skipped; when a name comes
twice, the last line wins (the task's own name is the first line, so it cannot hide a
real field). Bytes that are not UTF-8 are replaced (U+FFFD), as in the name of a task
that wrote raw bytes into its comm.

Errors: `read` lets OSError through (ENOENT when no task has that id, ESRCH when it
ended during the read, EACCES): each caller maps it as it must (a FUSE errno, a
MigrateError, ESRCH for a gone writer, or "nothing to pin"). Values are text: callers
convert the fields they use (`int(fields["Umask"], 8)`, `fields["Groups"].split()`).
"""

from __future__ import annotations


def parse(data: bytes) -> dict[str, str]:
    """The fields of a /proc/TID/status text (see the module docstring)."""
    out = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def read(tid: int) -> dict[str, str]:
    """The fields of /proc/TID/status, read in one go; OSError if it cannot be read."""
    with open(f"/proc/{tid}/status", "rb") as f:
        return parse(f.read())

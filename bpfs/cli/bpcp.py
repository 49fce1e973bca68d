"""bpcp: copy files to and from cluster nodes, bproc 4.0 style (an rcp over bpsh).

    bpcp [-p] [-r] SRC... DEST        each of SRC and DEST is PATH or NODE:PATH

A word is remote when it has a colon before any slash (rcp's rule): `3:/tmp/x`,
`n3:x`; a relative remote path is relative to the remote process's cwd (the
master's cwd name if it exists on the node, else /). With several SRC, DEST must be
a directory. `-r` copies directories recursively; `-p` keeps modes and times (as
rcp -p: without it, files get the source's mode less the umask and the time of the
copy). Symbolic links are followed, as rcp did. Owners are never copied.

Everything goes through the bpsh machinery (`bpfs.cli.bpsh.run_job`): the master's
`tar` is migrated to the node, and a tar stream flows over the stdio links.
- to a node:    a local child writes the tar stream (Python's tarfile, entries
                already named as they must land) into the stdin of
                `tar -x -f - -C DIR` on the node. Whether DEST is a directory is
                asked first with `test -d DEST` on the node, when it matters.
- from a node:  `tar -c -f - -C DIR NAME` on the node; a local child reads the
                stream and writes the files (refusing names that leave the target).
- node to node: both, through a local child that renames entries on the way.
- local to local: `cp [-r] [-p]`, as bproc's bpcp did.
A progress line is shown on stderr when it is a terminal and a copy passes 1 MiB.

Exit status: 0 if everything was copied, 1 if anything failed (each failure is
reported as `bpcp: what: strerror` or by the remote tar), 2 for bad usage.
"""

from __future__ import annotations

import errno as _errno
import getopt
import os
import stat
import sys
import time
from bpfs.record import record
from typing import BinaryIO, Callable, Iterator, Sequence

from bpfs import __version__
from bpfs.cli import bpsh, common
from bpfs.cli.bpsh.output import OutputOptions

PROG = "bpcp"
PROGRESS_MIN = 1 << 20
COPY_CHUNK = 1 << 20

USAGE = f"""\
Usage: {PROG} [-p] f1 f2
       {PROG} [-r] [-p] f1 ... fn directory
Copy files between this machine and cluster nodes; a file is PATH or NODE:PATH.

  -h, --help     Display this message and exit.
  -v, --version  Display version information and exit.
  -p             Preserve file modes and timestamps.
  -r             Copy recursively.
      --mount DIR  the bpfs mount (default: $BPROC_MOUNT, else /bproc)
"""


@record(frozen=True)
class Place:
    """One SRC or DEST word: a node number (None: here) and a path."""
    node: int | None
    path: str

    def __str__(self) -> str:
        return self.path if self.node is None else f"{self.node}:{self.path}"


class Failed(Exception):
    """One source could not be copied; the message is already printed or in .args."""


def split_place(word: str) -> tuple[str | None, str]:
    """rcp's colon(): `node:path` when a colon comes before any slash."""
    for i, ch in enumerate(word):
        if ch == ":":
            return word[:i], word[i + 1:] or "."
        if ch == "/":
            break
    return None, word


def parse_node(text: str) -> int:
    """`3`, `n3`, `.3`, `-1` or `master`: one node number."""
    from bpfs import nodeset
    if text in ("-1", "master"):
        return nodeset.MASTER
    digits = text[1:] if text[:1] in ("n", ".") else text
    if digits.isascii() and digits.isdigit():
        return int(digits)
    common.fail(f"Invalid node number: {text}")


@record
class Copier:
    mount: str
    recursive: bool
    preserve: bool
    progress: bool
    errors: int = 0

    # ---- per source -------------------------------------------------------------------

    def copy(self, src: Place, dest: Place, dest_is_dir: bool | None) -> None:
        try:
            if src.node is None and dest.node is None:
                self._local(src, dest)
            elif dest.node is None:
                self._from_node(src, dest)
            else:
                self._to_node(src, dest, dest_is_dir)
        except Failed as e:
            if e.args and e.args[0]:
                common.warn(PROG, e.args[0])
            self.errors += 1

    def _local(self, src: Place, dest: Place) -> None:
        argv = ["cp", *(["-r"] if self.recursive else []), *(["-p"] if self.preserve else []),
                "--", src.path, dest.path]
        if _spawn_wait(lambda: os.execvp("cp", argv)) != 0:
            raise Failed()

    def _to_node(self, src: Place, dest: Place, dest_is_dir: bool | None) -> None:
        assert dest.node is not None
        if dest_is_dir is None:
            dest_is_dir = dest.path.endswith("/") or self._remote_is_dir(dest)
        where, name = (dest.path, None) if dest_is_dir else _split(dest.path)
        where = where or "."
        if src.node is None:
            st = _stat(src.path)
            if stat.S_ISDIR(st.st_mode) and not self.recursive:
                raise Failed(f"{src.path}: not a regular file")
            name = name or _base(src.path)
            feed = lambda w: _produce(src.path, name, self.recursive, w, self.progress)  # noqa: E731
        else:
            name = name or _base(src.path)
            feed = lambda w: self._relay(src, name, w)  # noqa: E731
        self._tar_to(dest.node, where, feed)

    def _from_node(self, src: Place, dest: Place) -> None:
        assert src.node is not None
        if os.path.isdir(dest.path):
            where, name = dest.path, _base(src.path)
        else:
            where, name = _split(dest.path)
            where = where or "."
        sink = lambda r: _extract(r, where, name, self.recursive, self.preserve,  # noqa: E731
                                  self.progress, str(src))
        read_r, write_w = os.pipe()
        consumer = _spawn(lambda: (os.close(write_w), sink(read_r)))
        os.close(read_r)
        code = self._tar_from(src, write_w)
        status = _wait(consumer)
        if code != 0 or status != 0:
            raise Failed()

    # ---- building blocks --------------------------------------------------------------

    def _remote_is_dir(self, place: Place) -> bool:
        procs = self._job(place.node, ["test", "-d", place.path], ("null", "null", "null"))
        if procs[0].failed:
            raise Failed()
        return os.WIFEXITED(procs[0].status) and os.WEXITSTATUS(procs[0].status) == 0

    def _tar_to(self, node: int, where: str, feed: Callable[[int], None]) -> None:
        """`tar -x` on the node, its stdin fed by `feed(fd)` in a local child."""
        read_r, write_w = os.pipe()
        producer = _spawn(lambda: (os.close(read_r), feed(write_w)))
        os.close(write_w)
        try:
            opts = ["-p"] if self.preserve else ["-m", "--no-same-permissions"]
            procs = self._job(node, ["tar", "-x", "-f", "-", "--no-same-owner", *opts,
                                     "-C", where], ("socket", "socket", "socket"),
                              stdin_fd=read_r)
        finally:
            os.close(read_r)
        status = _wait(producer)
        if _bad(procs) or status != 0:
            raise Failed()

    def _tar_from(self, src: Place, out_fd: int) -> int:
        """`tar -c` of src on its node, the stream going to out_fd; 0 when it worked."""
        where, name = _split(src.path)
        recurse = [] if self.recursive else ["--no-recursion"]
        try:
            procs = self._job(src.node, ["tar", "-c", "-h", "-f", "-", *recurse, "-C",
                                         where or ".", "--", name],
                              ("null", "socket", "socket"), stdin_fd=None, stdout_fd=out_fd)
        finally:
            os.close(out_fd)
        return 1 if _bad(procs) else 0

    def _relay(self, src: Place, name: str, out_fd: int) -> None:
        """Node to node: the source node's tar stream, renamed to `name`, into out_fd."""
        read_r, write_w = os.pipe()
        renamer = _spawn(lambda: (os.close(write_w),
                                  _rename(read_r, out_fd, name, self.recursive, str(src))))
        os.close(read_r)
        os.close(out_fd)
        code = self._tar_from(src, write_w)
        if _wait(renamer) != 0 or code != 0:
            raise Failed()

    def _job(self, node: int | None, argv: list[str], io: Sequence[str], *,
             stdin_fd: int | None = 0, stdout_fd: int = 1) -> list:
        assert node is not None
        path = bpsh.which(argv[0])
        if path is None:
            raise Failed(f"{argv[0]}: command not found")
        job = bpsh.Job(self.mount, [node], path, argv, tuple(io),
                       OutputOptions(buffer_size=bpsh.DEFAULT_BUFFER))
        procs, _ = bpsh.run_job(job, stdin_fd=stdin_fd, stdout_fd=stdout_fd)
        return procs


def _bad(procs: list) -> bool:
    st = procs[0].status
    return procs[0].failed or st is None or not os.WIFEXITED(st) or os.WEXITSTATUS(st) != 0


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise Failed(f"{path}: {os.strerror(e.errno or _errno.EIO)}") from None


def _split(path: str) -> tuple[str, str]:
    """("dir", "name") of a path; "" as dir when there is none."""
    path = path.rstrip("/") or "/"
    head, _, tail = path.rpartition("/")
    return (head or ("/" if path.startswith("/") else "")), tail


def _base(path: str) -> str:
    return _split(path)[1] or "."


# ---- local children -------------------------------------------------------------------

def _spawn(body: Callable[[], object]) -> int:
    """Fork a child that runs `body` and exits 0, or 1 on an error it reported."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except Failed as e:
            if e.args and e.args[0]:
                common.warn(PROG, e.args[0])
        except BrokenPipeError:
            pass
        except OSError as e:
            common.warn(PROG, common.describe(e))
        except BaseException:       # never let a child run on into the parent's code
            import traceback
            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    return pid


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _spawn_wait(body: Callable[[], object]) -> int:
    return _wait(_spawn(body))


class _Progress:
    """`\\rNAME  12.0 MiB  45%  110.2 MiB/s` on stderr, at most ten times a second."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled = enabled and (total is None or total >= PROGRESS_MIN)
        self.total, self.done, self.start, self.last = total, 0, time.monotonic(), 0.0
        self.shown = False

    def add(self, name: str, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and self.done >= PROGRESS_MIN and now - self.last >= 0.1:
            self.last = now
            self._show(name, now)

    def _show(self, name: str, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-6) / (1 << 20)
        pct = f"{100 * self.done // self.total:3d}%  " if self.total else ""
        sys.stderr.write(f"\r{name[-40:]:<40} {self.done / (1 << 20):9.1f} MiB  {pct}"
                         f"{rate:7.1f} MiB/s")
        sys.stderr.flush()
        self.shown = True

    def finish(self, name: str) -> None:
        if self.shown:
            self._show(name, time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Counting:
    """A file object that counts what is read through it (for the progress line)."""

    def __init__(self, f: BinaryIO, progress: _Progress, name: str) -> None:
        self.f, self.progress, self.name = f, progress, name

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.progress.add(self.name, len(data))
        return data


def _tree_size(path: str, recursive: bool) -> int:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode) or not recursive:
        return st.st_size
    return sum(os.stat(os.path.join(d, f)).st_size
               for d, _, files in os.walk(path, followlinks=True) for f in files)


def _produce(path: str, arcname: str, recursive: bool, out_fd: int, progress: bool) -> None:
    """Write `path` as a tar stream (top entry named `arcname`) to out_fd."""
    import tarfile
    bar = _Progress(progress and sys.stderr.isatty(), _tree_size(path, recursive))
    with os.fdopen(out_fd, "wb", buffering=COPY_CHUNK) as out, \
            tarfile.open(fileobj=out, mode="w|", dereference=True,
                         copybufsize=COPY_CHUNK) as tar:   # type: ignore[call-overload]
        for full, name in _walk(path, arcname, recursive):
            info = tar.gettarinfo(full, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(full, "rb") as f:
                    tar.addfile(info, _Counting(f, bar, name))  # type: ignore[arg-type]
            else:
                tar.addfile(info)
    bar.finish(arcname)


def _walk(path: str, arcname: str, recursive: bool) -> Iterator[tuple[str, str]]:
    yield path, arcname
    if recursive and os.path.isdir(path):
        for entry in sorted(os.listdir(path)):
            yield from _walk(os.path.join(path, entry), f"{arcname}/{entry}", True)


def _members(in_fd: int, top: str, recursive: bool, what: str) -> Iterator:
    """(tar, member, new name) for each entry of the stream, its top name -> `top`."""
    import tarfile
    with os.fdopen(in_fd, "rb", buffering=COPY_CHUNK) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|", copybufsize=COPY_CHUNK)  # type: ignore[call-overload]
        except tarfile.ReadError as e:
            raise Failed(None if "empty" in str(e) else f"{what}: {e}") from None
        yield from _renamed(tar, top, recursive, what)


def _renamed(tar, top: str, recursive: bool, what: str) -> Iterator:  # type: ignore[no-untyped-def]
    with tar:
        old_top = None
        for m in tar:
            parts = m.name.strip("/").split("/")
            old_top = old_top or parts[0]
            if parts[0] != old_top or ".." in parts or m.name.startswith("/"):
                raise Failed(f"{what}: unexpected entry {m.name!r} in the stream")
            if m.isdir() and not recursive:
                raise Failed(f"{what}: not a regular file")
            yield tar, m, "/".join([top, *parts[1:]])
        if old_top is None:
            raise Failed()          # the remote tar said why


def _extract(in_fd: int, where: str, top: str, recursive: bool, preserve: bool,
             progress: bool, what: str) -> None:
    """Write the tar stream from in_fd under `where`, its top entry named `top`."""
    bar = _Progress(progress and sys.stderr.isatty(), None)
    umask = os.umask(0)
    os.umask(umask)
    dirs = []
    for tar, m, name in _members(in_fd, top, recursive, what):
        target = os.path.join(where, name)
        mode = m.mode & 0o7777 if preserve else m.mode & 0o777 & ~umask
        if m.isdir():
            os.makedirs(target, exist_ok=True)
            dirs.append((target, m))
        elif m.issym():
            os.symlink(m.linkname, target)
        elif m.isreg():
            src = tar.extractfile(m)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode | 0o200)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(COPY_CHUNK):
                    out.write(chunk)
                    bar.add(name, len(chunk))
            os.chmod(target, mode)
            if preserve:
                os.utime(target, (m.mtime, m.mtime))
        else:
            continue
    for target, m in reversed(dirs):
        if preserve:
            os.chmod(target, m.mode & 0o7777)
            os.utime(target, (m.mtime, m.mtime))
    bar.finish(top)


def _rename(in_fd: int, out_fd: int, top: str, recursive: bool, what: str) -> None:
    """Copy a tar stream, renaming its top entry to `top` (node-to-node copies)."""
    import tarfile
    with os.fdopen(out_fd, "wb", buffering=COPY_CHUNK) as out, \
            tarfile.open(fileobj=out, mode="w|", copybufsize=COPY_CHUNK) as dst:  # type: ignore[call-overload]
        for src, m, name in _members(in_fd, top, recursive, what):
            m.name = name
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)


# ---- command line ---------------------------------------------------------------------

def _run(argv: Sequence[str]) -> int:
    try:
        opts, words = getopt.gnu_getopt(list(argv), "hvpr", ["help", "version", "mount="])
    except getopt.GetoptError as e:
        common.fail(f"{e}\nTry '{PROG} --help' for more information.", common.EXIT_USAGE)
    flags = {o for o, _ in opts}
    if flags & {"-h", "--help"}:
        sys.stdout.write(USAGE)
        return 0
    if flags & {"-v", "--version"}:
        sys.stdout.write(f"{PROG} version {__version__}\n")
        return 0
    if len(words) < 2:
        common.fail(f"a source and a destination are needed\nTry '{PROG} --help' for more "
                    "information.", common.EXIT_USAGE)
    mount = common.mount_point(next((v for o, v in opts if o == "--mount"), None))
    places = [_place(w) for w in words]
    srcs, dest = places[:-1], places[-1]
    copier = Copier(mount, "-r" in flags, "-p" in flags, sys.stderr.isatty())
    dest_is_dir = True if len(srcs) > 1 else None
    if len(srcs) > 1 and dest.node is None and not os.path.isdir(dest.path):
        common.fail(f"{dest.path}: {os.strerror(_errno.ENOTDIR)}")
    for src in srcs:
        copier.copy(src, dest, dest_is_dir)
    return 1 if copier.errors else 0


def _place(word: str) -> Place:
    node, path = split_place(word)
    return Place(None if node is None else parse_node(node), path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return common.run(PROG, lambda: _run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

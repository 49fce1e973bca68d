"""The migration engine: dump a process at its entry point on the master, restore it on a node.

Master side (every call for one tracee from ONE thread: ptrace accepts only the tracer thread)::

    seize_for_exec(pid) -> None
        PTRACE_SEIZE a running process that will execve by itself (a bpsh child), with
        PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL (if the master dies, the ghost dies).
    wait_exec_and_dump(pid, timeout) -> Image
        Wait for its exec, refuse set-uid/set-gid/file-capability programs (EPERM), run it to
        AT_ENTRY, dump it and leave it stopped under ptrace: the ghost. ETIMEDOUT, ESRCH.
    launch(argv, env=None, cwd=None) -> pid      fork+exec traced, stopped at AT_ENTRY
    dump.dump(pid) -> Image                      dump a tracee stopped at AT_ENTRY
    kill(pid) -> None                            SIGKILL a tracee (and reap it if our child)
    read_contents(image, hashes, pid=None) -> {hash: bytes}
        Contents of files a node lacks; with the ghost's pid they are read through its own
        mappings (right even if the path was replaced since); ESTALE if the content changed.

Image (`bpfs.migrate.image`, format documented there): `.pid`, `.argv`, `.comm`, `.exe_path`,
`.cwd`, `.uid`, `.gid`, `.groups`, `.dumpable`, `.file_refs()` -> [FileRef(hash, size, path)],
`.contents` (inline file contents, usually empty); `dumps(img) -> bytes`, `loads(bytes)`
(EINVAL "corrupt image: ..." on any defect).

File negotiation (two steps, the node keeps a cache so repeats are by reference only)::

    master: data = dumps(img)                              -> node
    node:   restorer.missing(loads(data)) -> [hash]         -> master
    master: read_contents(img, missing)   -> {hash: bytes}  -> node
    node:   restorer.restore(img, ..., file_content=those)

Node side (from a process inside the target PID namespace, one thread)::

    Restorer(cache_dir=None, jobs_fd=None)
                                        holds the pre-cleaned helper; close() or `with`.
                                        With jobs_fd each process is a job: a session and
                                        group of its own under a keeper that writes its
                                        stops, continues and end to jobs_fd (JOB_RECORD);
                                        .prepare() makes the next keeper, .last_keeper
                                        is the last one's pid (see bpfs.migrate.restore)
    Restorer.missing(image) -> [hash]
    Restorer.restore(image, *, pid=None, uid, gid, groups=(), fds=(0, 1, 2),
                     file_content=None) -> pid
        The process is a CHILD of the caller (of its keeper, with jobs_fd: waitpid that), running,
        not traced, with PID `pid`
        (default image.pid), the given credentials (never root unless uid 0), fds 0-2 = `fds`,
        cwd = image.cwd if it exists and the user may enter it, else "/".
        Errors (BpfsError/MigrateError): EINVAL corrupt image or bad content, ENOENT a file the
        node lacks was not sent, ENOEXEC other kernel build, EOPNOTSUPP CPU lacks features,
        EEXIST the PID is taken, EPERM a set-ID/file-capability executable (checked again
        on the node's file), or as the kernel says.
    FileCache(dir)                      received file contents keyed by hash
    Restorer.host -> Host               this node's kernel/vdso/CPU facts

Threads: ptrace answers only the tracer thread, so all master-side calls for a tracee, and all
uses of one Restorer, must come from one thread each (a Restorer checks and raises EINVAL).
The node must not waitpid(-1) while a restore runs in another thread (it would steal ptrace
stops); waiting for the restored pids, or reaping between restores, is fine.

Carried besides memory and registers: signal dispositions, mask and pending signals, rseq,
robust list, umask, personality, comm, resource limits (clamped to the node's hard limits),
dumpability (the kernel's, read at the dump: a program its user may run but not read stays
non-dumpable on the node, and the node's copy of its content stays unreadable to users).
Not yet migrated (refused or not carried): processes with several threads (EOPNOTSUPP), shared
mappings (EOPNOTSUPP), fds beyond 0-2, timers, SysV IPC, seccomp filters, sigaltstack. The stop
point is the entry point; bproc_move of a running process is a later step on the same code.

Modules: `ptrace` (thin ctypes binding, syscall injection), `spawn` (vfork-style traced start,
native fork for the helper), `procfs` (/proc parsers), `image` (the format), `filecache`
(hashes, FileCache), `hostinfo` (kernel/CPU compatibility), `dump` (launch, seize, dump),
`stub` (syscall batches run inside a tracee), `restore` (Restorer), `loopnode` (a minimal
node as PID 1 of new PID + mount namespaces, for tests and benchmarks). Note: the package
attribute `dump` is the module; the function is `dump.dump`.
"""

from bpfs.migrate.dump import (kill, launch, read_contents, seize_for_exec,
                               wait_exec_and_dump)
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.filecache import FileCache
from bpfs.migrate.image import FileRef, Host, Image, dumps, loads, set_rank
from bpfs.migrate.restore import Restorer

__all__ = ["seize_for_exec", "wait_exec_and_dump", "launch", "dump", "kill", "read_contents",
           "Image", "FileRef", "Host", "dumps", "loads", "set_rank", "Restorer", "FileCache", "MigrateError"]

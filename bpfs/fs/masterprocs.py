"""procs/P of a process that runs on the master and was never migrated (generation 0).

/bproc/procs lists the cluster's migrated processes. A master process is not listed, but
procs/P resolves for it, holding only `ctl`, so `echo 'move 2' > /bproc/procs/P/ctl`
moves it as it moves any other (bpfs/master/moves.py checks who may). Its owner is the
process's effective uid and gid, as /proc/P shows; kernel threads and the master itself
have none. Generation 0 is never a migrated process's (those start at 1), so a handle of
a master process meets ENOENT once P has moved and is listed (it is another file now).
"""

from __future__ import annotations

import os

MASTER_GEN = 0


def owner(pid: int) -> tuple[int, int] | None:
    """(uid, gid) of master process `pid`, or None: no such process (or a kernel thread,
    or the master itself, which never moves)."""
    if pid <= 1 or pid == os.getpid():
        return None
    try:
        st = os.stat(f"/proc/{pid}")
        if not os.path.exists(f"/proc/{pid}/exe"):      # a kernel thread has no exe
            return None
    except OSError:
        return None
    return st.st_uid, st.st_gid

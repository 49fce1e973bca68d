"""Wake a bpfs daemon whose FUSE loop may be reading an empty /dev/fuse.

pyfuse3 waits until /dev/fuse is readable, then reads it with a blocking read. The kernel
can take back what made it readable: a FUSE_INTERRUPT queued for a request leaves the
queue unread once that request is answered (fs/fuse/dev.c, request_end). A daemon that
stops (PTRACE_INTERRUPT) a process whose request it has not answered yet, then answers it
(a process that moves itself with a write to its own procs/P/ctl: libbproc's bproc_move),
can so leave its reading worker blocked, and with it the whole trio loop, until another
request comes: the move never goes on, and the master marks a node that does this down.

That read holds the GIL (pyfuse3 calls it without releasing it): no thread of the daemon
runs until it returns. So `poke(mount)` starts a small process (sh) that sends such
requests for a short while: lookups of a name that is never there (the kernel keeps no
negative entry for it, so each one is a request), and a thread that reaps it. Each
lookup costs one round trip when nothing was blocked.
"""

from __future__ import annotations

import os
import subprocess
import threading

NAME = ".bpfs-poke"         # never a file of /bproc
TIMES, EVERY = 10, "0.05"   # lookups, and seconds between them: 0.5 s in all
SCRIPT = 'i=0; while [ $i -lt "$2" ]; do sleep "$3"; [ -e "$1" ]; i=$((i + 1)); done'


def poke(mount: str, times: int = TIMES, every: str = EVERY) -> None:
    """Look `NAME` up on `mount` `times` times, `every` seconds apart, from a process of
    its own; nothing if it cannot be started."""
    try:
        p = subprocess.Popen(["/bin/sh", "-c", SCRIPT, "poke", os.path.join(mount, NAME),
                              str(times), every], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             close_fds=True, start_new_session=True)
    except OSError:
        return
    threading.Thread(target=p.wait, name="fuse-poke", daemon=True).start()

"""The migration engine: dump a process at its entry point on the master, restore it on a node.

Master side: `dump` (seize_for_exec, wait_exec_and_dump, launch, read_contents) and the
ptrace thread that holds the ghosts (`tracer`, `ghost`, `ghost_park`); node side: `Restorer`
(`restore`) with its `FileCache`; between them the `image` format. Every call for one tracee
comes from one thread. The API, the file negotiation, the threading rules and what is carried
are in docs/engine.md (the ghosts: docs/ghosts.md).
"""


from bpfs.migrate.dump import (kill, launch, read_contents, seize_for_exec,
                               wait_exec_and_dump)
from bpfs.migrate.errors import MigrateError
from bpfs.migrate.filecache import FileCache
from bpfs.migrate.image import FileRef, Host, Image, dumps, loads
from bpfs.migrate.rank import set_rank
from bpfs.migrate.restore import Restorer

__all__ = ["seize_for_exec", "wait_exec_and_dump", "launch", "dump", "kill", "read_contents",
           "Image", "FileRef", "Host", "dumps", "loads", "set_rank", "Restorer", "FileCache", "MigrateError"]

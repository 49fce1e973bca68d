"""bpsh, bproc 4.0 style: its command line and the names bpcp and the tests use.

`args` holds the command line (USAGE, the parser, the PATH lookup, the node list, `Job`);
`children` the children that write the execmove requests and exec the command; `run` the
job and the exit status (its docstring tells how one run goes); `stdio` the stdio server
that forwards the children's stdio and reaps them (with `links`, `output`, `stdin` and
`poller`). `console` is the installed `bpsh`
command. `relay` is that stdio server for a process bpsh did not start (the master runs
it when such a process moves to a node: forked by `relayfork`, the master's relay
fork-server, or spawned as `python -m bpfs.cli.bpsh.relay`).

Kept light: bpsh imports this at start-up (tests/unit/test_startup.py).
"""

from bpfs.cli.bpsh.args import (DEFAULT_BUFFER, MASTER, Args, Job, UsageError, parse_args,
                                resolve_nodes, which)
from bpfs.child import RequestRefused, write_request
from bpfs.cli.bpsh.children import EXEC_PREFIX
from bpfs.cli.bpsh.run import console, exit_status, main, node_gone, plan_io, run_job

__all__ = ["DEFAULT_BUFFER", "EXEC_PREFIX", "MASTER", "Args", "Job", "RequestRefused",
           "UsageError", "console", "exit_status", "main", "node_gone", "parse_args", "plan_io",
           "resolve_nodes", "run_job", "which", "write_request"]

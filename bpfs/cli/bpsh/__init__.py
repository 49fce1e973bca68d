"""bpsh, bproc 4.0 style: its command line and the names bpcp and the tests use.

`run` holds the command (parsing, the children, the job, the exit status; its docstring
tells how one run goes); `stdio` the stdio server that forwards the children's stdio
and reaps them. `console` is the installed `bpsh` command.

Kept light: bpsh imports this at start-up (tests/unit/test_startup.py).
"""

from bpfs.cli.bpsh.run import (DEFAULT_BUFFER, EXEC_PREFIX, MASTER, Args, Job, RequestRefused,
                               UsageError, console, exit_status, main, node_gone, parse_args,
                               plan_io, resolve_nodes, run_job, which, write_request)

__all__ = ["DEFAULT_BUFFER", "EXEC_PREFIX", "MASTER", "Args", "Job", "RequestRefused",
           "UsageError", "console", "exit_status", "main", "node_gone", "parse_args", "plan_io",
           "resolve_nodes", "run_job", "which", "write_request"]

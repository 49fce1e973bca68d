"""`python -m bpfs.cli.bpsh`: the bpsh command."""

from bpfs.cli.bpsh.run import console

console()

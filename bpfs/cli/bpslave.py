"""bpslave: the node daemon's command line.

    bpslave --master HOST:PORT [--node N] [--key FILE] [-r] [--no-namespace]
            [--hostname NAME] [--scratch DIR]... [--hide DIR]... [--unmount DIR]...

`main(argv=None) -> int`. Parses the options, then runs bpfs.node.daemon.start: unless
--no-namespace, or already PID 1, the launcher (bpfs/node/launcher.py) puts the daemon
proper in new PID and mount namespaces as their PID 1.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

import click

from bpfs.cli import nodebproc
from bpfs.cli.clickmain import click_main
from bpfs.errors import BpfsError
from bpfs.hostsfile import DEFAULT_HOSTS_FILE
from bpfs.node.config import DEFAULT_KEY_FILE, NodeConfig, parse_master
from bpfs.node.daemon import start
from bpfs.node.launcher import NamespaceSpec

HELP = """Run a bpfs node: connect to the master, authenticate with the cluster key,
register (as node N, or as whatever number the master gives), report `up` and
send node facts (load, memory, uptime) every heartbeat. The master's `reboot`
makes it reconnect afresh, `halt` and `pwroff` make it exit 0.

The daemon runs as PID 1 of its own PID and mount namespaces (with its own
/proc): migrated processes will live there, and die with it. The outer process
only waits for it and forwards SIGTERM/SIGINT/SIGHUP. In that mount namespace
it serves the master's /bproc at the master's mount point for the node's
processes (each operation forwarded to the master, with the caller's ids), and
unmounts it when it stops.

\b
Exit status: 0 halted/powered off by the master or stopped by a signal;
             1 master unreachable or connection lost (without -r);
             2 bad usage; 3 wrong cluster key or registration refused.
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--master", "master", required=True, metavar="HOST:PORT",
              help="The master's node port (default port 2223).")
@click.option("--node", type=click.IntRange(min=0), default=None, metavar="N",
              help="Ask for node number N (default: the master picks the next free one).")
@click.option("--key", "key_file", default=DEFAULT_KEY_FILE, show_default=True, metavar="FILE",
              help="The cluster key file (mode 0600, shared with the master).")
@click.option("-r", "--reconnect", is_flag=True,
              help="Keep (re)connecting with exponential back-off (0.1 s up to 5 s) when the "
                   "master is not there yet, goes away, or refuses us; without -r such a "
                   "failure ends the daemon with a nonzero status.")
@click.option("--no-namespace", is_flag=True,
              help="Do not create PID/mount namespaces: the caller already did "
                   "(implied when running as PID 1).")
@click.option("--hostname", metavar="NAME",
              help="Simulated node: own UTS namespace with this hostname.")
@click.option("--scratch", multiple=True, metavar="DIR",
              help="Simulated node: mount a private tmpfs on DIR (must exist). Repeatable.")
@click.option("--hide", multiple=True, metavar="DIR",
              help="Simulated node: mount an empty read-only tmpfs over DIR. Repeatable.")
@click.option("--unmount", multiple=True, metavar="DIR",
              help="Simulated node: lazily unmount DIR inside the node (e.g. the master's "
                   "FUSE mount, which the node must never block on). Repeatable.")
@click.option("--hosts-file", default=None, metavar="FILE",
              help="Where to write the cluster's names (n5, .5, master) the master sends, "
                   "for the NSS module libnss_bproc; '' for nowhere. Default: "
                   "/run/bpfs/hosts, but nowhere when the master is on this machine "
                   "(a loopback address: the node shares the master's files).")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Log errors only.")
def cli(master: str, node: int | None, key_file: str, reconnect: bool, no_namespace: bool,
        hostname: str | None, scratch: tuple[str, ...], hide: tuple[str, ...],
        unmount: tuple[str, ...], hosts_file: str | None, verbose: int, quiet: bool) -> int:
    try:
        host, port = parse_master(master)
    except BpfsError as exc:
        raise click.BadParameter(str(exc), param_hint="--master") from None
    cfg = NodeConfig(host=host, port=port, key_file=key_file, node=node, reconnect=reconnect,
                     serve_fs=nodebproc.serve,
                     hosts_file=default_hosts_file(host) if hosts_file is None
                     else hosts_file or None)
    spec = NamespaceSpec(hostname, list(scratch), list(hide), list(unmount))
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    label = hostname or (f"node{node}" if node is not None else "")
    return start(cfg, spec, label=label, namespaces=not no_namespace, level=level)


def default_hosts_file(master_host: str) -> str | None:
    """/run/bpfs/hosts for a node on a machine of its own; None when the master is on
    this machine (it writes the names there itself, and a test's node must not
    overwrite the names of the machine's cluster)."""
    import ipaddress
    try:
        loopback = master_host == "localhost" or ipaddress.ip_address(master_host).is_loopback
    except ValueError:
        loopback = False
    return None if loopback else DEFAULT_HOSTS_FILE


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (see HELP)."""
    return click_main(cli, "bpslave", argv)


if __name__ == "__main__":
    sys.exit(main())

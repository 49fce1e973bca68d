"""bpfs: run a master, or a whole embedded cluster on this machine.

    bpfs master [--mount DIR] [--listen H] [--port P] [--key FILE] [--state-file F]
                [--nodes K] [--ping-timeout S] [--heartbeat S]
    bpfs up --nodes K [--mount DIR] [--port P] [--state-dir DIR] [--ping-timeout S]
            [--hide DIR]... [--detach] [--timeout S]
    bpfs down [--mount DIR] [--state-dir DIR]

`main(argv=None) -> int`. The mount defaults to $BPROC_MOUNT, else /bproc.
Errors go through bpfs.cli.common.run: `bpfs: message` on stderr, no traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import click

from bpfs.cli import common, nodebproc
from bpfs.cli.clickmain import click_main

DEFAULT_PORT = 2223
CONTEXT = {"help_option_names": ["-h", "--help"]}

mount_option = click.option(
    "--mount", metavar="DIR", default=None,
    help="Where /bproc is mounted (default: $BPROC_MOUNT, else /bproc).")
state_dir_option = click.option(
    "--state-dir", metavar="DIR", default=None,
    help="Keys, PID records and logs of the embedded cluster (default: /var/lib/bpfs for "
         "/bproc, /var/lib/bpfs/mounts/<escaped mount> for any other mount).")


@click.group(context_settings=CONTEXT)
def cli() -> None:
    """bpfs: BProc's single process space for a cluster, as files under /bproc.

    `bpfs up` starts a master and simulated nodes on this machine (root);
    `bpfs master` and `bpslave` make a real cluster.
    """


@cli.command(context_settings=CONTEXT)
@mount_option
@click.option("--listen", default="0.0.0.0", show_default=True, metavar="HOST",
              help="Address the node port listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="The node port.")
@click.option("--key", "key_file", default="/etc/bpfs/cluster.key", show_default=True,
              metavar="FILE", help="Cluster key file (mode 0600), shared with every node.")
@click.option("--state-file", default="/var/lib/bpfs/state", show_default=True, metavar="FILE",
              help="Where the master keeps node ACLs and states across restarts.")
@click.option("--nodes", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Configured node count: nodes/0..K-1 exist from the start and no other "
                   "number may register (ENODEV). 0: open numbering, any number a node asks.")
@click.option("--ping-timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              metavar="S", help="A node silent this long is marked down.")
@click.option("--heartbeat", type=click.FloatRange(min=0.01), default=None, metavar="S",
              help="How often nodes send their facts; shorter than --ping-timeout "
                   "(default: a fifth of it, at most 1 s).")
@click.option("--usage-interval", type=click.FloatRange(min=0.05, max=1e6), default=2.0,
              show_default=True, metavar="S",
              help="How often nodes report their processes' CPU, memory and state.")
@click.option("--hosts-file", default=None, metavar="FILE",
              help="Where the master writes the nodes' names (n5, .5, master) for the NSS "
                   "module libnss_bproc (which reads it, or $BPFS_HOSTS); '' for nowhere. "
                   "Default: /run/bpfs/hosts for the mount /bproc, else nowhere.")
def master(mount: str | None, listen: str, port: int, key_file: str, state_file: str,
           nodes: int, ping_timeout: float, heartbeat: float | None,
           usage_interval: float, hosts_file: str | None) -> int:
    """Run the master daemon in the foreground: serve the node port, mount /bproc.

    SIGTERM or SIGINT unmounts cleanly and exits 0.
    """
    from bpfs.master import liveness
    problem = liveness.settings_problem(ping_timeout, heartbeat)
    if problem:
        raise click.UsageError(problem)
    from bpfs.master.daemon import MasterConfig, run_master
    cfg_mount = os.path.abspath(common.mount_point(mount))
    cfg = MasterConfig(mount=cfg_mount, listen=listen, port=port,
                       key_file=key_file, state_file=state_file, nodes=nodes,
                       ping_timeout=ping_timeout, heartbeat=heartbeat,
                       usage_interval=usage_interval,
                       hosts_file=_hosts_file(hosts_file, cfg_mount))
    return run_master(cfg)


def _hosts_file(option: str | None, mount: str) -> str | None:
    """--hosts-file: '' is nowhere; by default /run/bpfs/hosts for the cluster of /bproc
    only (a master on another mount is a test's or a second cluster's)."""
    if option is not None:
        return option or None
    return "/run/bpfs/hosts" if mount == "/bproc" else None


@cli.command(context_settings=CONTEXT)
@click.option("--nodes", type=click.IntRange(min=1), required=True, metavar="K",
              help="How many simulated nodes (numbered 0..K-1, hostnames n0..nK-1).")
@mount_option
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="The master's node port (on 127.0.0.1).")
@state_dir_option
@click.option("--ping-timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              metavar="S", help="A node silent this long is marked down; nodes send a "
                                "heartbeat every fifth of it (at most every second).")
@click.option("--hide", multiple=True, metavar="DIR",
              help="Cover DIR with an empty tmpfs inside every node (so something exists "
                   "only on the master). Repeatable.")
@click.option("--detach", is_flag=True,
              help="Return once the mount answers and every node is up (the cluster keeps "
                   "running; stop it with `bpfs down`). Without it, stay in the foreground "
                   "and tear everything down on Ctrl-C or SIGTERM.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None, metavar="S",
              help="Give up (and stop what was started) if not ready after S seconds "
                   "(default 30 + 0.25 per node).")
@click.option("--usage-interval", type=click.FloatRange(min=0.05, max=1e6), default=2.0,
              show_default=True, metavar="S",
              help="How often nodes report their processes' CPU, memory and state.")
def up(nodes: int, mount: str | None, port: int, state_dir: str | None, ping_timeout: float,
       hide: tuple[str, ...], detach: bool, timeout: float | None,
       usage_interval: float) -> int:
    """Start an embedded cluster: a master and K simulated nodes on this machine.

    Each node is a real bpslave, PID 1 of its own PID, mount and UTS namespaces
    (hostname nN, its own /proc, a private tmpfs on /scratch), talking to the
    master over loopback. Needs root. Refuses (EBUSY) if a cluster is already up
    on the mount. The cluster key is created in the state directory if missing.
    """
    if nodes < 1:
        raise common.CliError("--nodes must be at least 1", common.EXIT_USAGE)
    for d in hide:
        if not os.path.isdir(d):
            raise common.CliError(f"--hide {d}: not a directory", common.EXIT_USAGE)
    from bpfs.node import embedded
    layout = embedded.Layout.make(common.mount_point(mount), state_dir)
    opts = embedded.UpOptions(nodes=nodes, port=port, ping_timeout=ping_timeout,
                              hide=list(hide), detach=detach, timeout=timeout,
                              usage_interval=usage_interval,
                              serve_fs=nodebproc.serve)
    nodebproc.preload()
    return embedded.up(layout, opts)


@cli.command(context_settings=CONTEXT)
@mount_option
@state_dir_option
def down(mount: str | None, state_dir: str | None) -> int:
    """Stop the embedded cluster on the mount: exactly the processes `bpfs up`
    recorded (SIGTERM, then SIGKILL after 5 s), then unmount. Idempotent."""
    from bpfs.node import embedded
    return embedded.down(embedded.Layout.make(common.mount_point(mount), state_dir))


@cli.command()
@click.option("--key", "key_file", default="/etc/bpfs/cluster.key", show_default=True,
              metavar="FILE", help="Where to write the key (its directory is created).")
@click.option("--force", is_flag=True, help="Replace an existing key (every node needs the new one).")
def keygen(key_file: str, force: bool) -> int:
    """Create a cluster key for a real cluster: a random secret in a 0600 file. Copy it to
    every node (`bpslave --key FILE`) over a channel you trust; `bpfs up` makes its own."""
    import errno
    import os
    from bpfs.errors import BpfsError
    from bpfs.wire import framing as wire
    if os.path.exists(key_file) and not force:
        raise BpfsError(errno.EEXIST, f"{key_file} exists (use --force to replace it)")
    os.makedirs(os.path.dirname(os.path.abspath(key_file)), mode=0o700, exist_ok=True)
    wire.create_key(key_file)
    click.echo(f"bpfs: wrote a new cluster key to {key_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    return common.run("bpfs", lambda: click_main(cli, "bpfs", argv))


if __name__ == "__main__":
    sys.exit(main())

"""bpslave's start: what the node daemon does once its options are parsed.

    start(cfg, spec, label=, namespaces=, level=) -> exit status

Unless told otherwise, or already PID 1, it runs the launcher (bpfs/node/launcher.py),
which puts the daemon proper (bpfs/node/service.py) in new PID and mount namespaces as
their PID 1. The service module, and with it trio, msgpack and psutil, is imported only
in that child, so the launcher that stays behind is a bare interpreter. The command line
is bpfs/cli/bpslave.py; `bpfs up` calls `start` in a fork.
"""

from __future__ import annotations

import logging
import os
import sys

from bpfs.node.config import EXIT_LOST, NodeConfig
from bpfs.node.launcher import NamespaceSpec

log = logging.getLogger("bpslave")


def start(cfg: NodeConfig, spec: NamespaceSpec, *, label: str = "", namespaces: bool = True,
          level: int = logging.INFO) -> int:
    """Everything bpslave does after parsing its options (`bpfs up` calls it in a fork)."""
    setup_logging(level, label)
    if not namespaces or os.getpid() == 1:
        return _run_service(cfg)
    from bpfs.node import launcher, nsutil
    nsutil.set_comm("bpslave")
    try:
        return launcher.launch(spec, lambda: _run_service(cfg))
    except OSError as exc:
        log.error("cannot create the node's namespaces (bpslave must run as root, or pass "
                  "--no-namespace): %s", exc.strerror or exc)
        return EXIT_LOST


def _run_service(cfg: NodeConfig) -> int:
    from bpfs.node import service     # trio, msgpack, psutil: only in the daemon proper
    return service.run(cfg)


def setup_logging(level: int, label: str) -> None:
    tag = f"bpslave[{label}]" if label else "bpslave"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

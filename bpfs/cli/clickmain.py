"""The click commands' runner (bpfs, bpstat, bpslave): a module of its own, so that what
bpsh imports (bpfs.cli.common) never names click, which costs ~30 ms of start-up here.
bpsh, bpctl and bpcp parse their arguments by hand (docs/architecture.md says why)."""

from __future__ import annotations

from typing import Sequence

import click

from bpfs.cli.common import EXIT_INTERRUPTED, EXIT_OK


def click_main(command: click.Command, prog: str, argv: Sequence[str] | None) -> int:
    """Run a click command without its standalone mode: the exit status it returns, else 0;
    a usage error (2) or other click error shown as click shows it; Ctrl-C (click has
    ended the line already) is EXIT_INTERRUPTED. Other errors pass through, to `run`."""
    try:
        rv = command.main(args=list(argv) if argv is not None else None, prog_name=prog,
                          standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return EXIT_INTERRUPTED
    return rv if isinstance(rv, int) else EXIT_OK

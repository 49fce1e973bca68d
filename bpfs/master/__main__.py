"""`python -m bpfs.master`: the master daemon's own command line (bpfs.master.daemon.main)."""

import sys

from bpfs.master.daemon import main

sys.exit(main())

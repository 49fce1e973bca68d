"""bpfs: BProc's single process space for a cluster, exposed as files under /bproc."""

__version__ = "0.1.0"

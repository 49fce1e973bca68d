"""libbproc for Python programs: BProc 4's calls by their names, over the /bproc files.

    from bpfs import libbproc
    libbproc.currnode()                      -1 (NODE_MASTER) on the master, N on node N
    libbproc.numnodes(), nodestatus(n), nodeaddr(n), nodenumber(addr), access(n), pidnode(p)
    libbproc.getnodebyname("n5")             5 (also ".5", "5", "master", "self")
    libbproc.execmove(n, path, argv, env)    no return: the caller runs on node n
    libbproc.vexecmove(nodes, path, argv, env) -> [pid or -errno per node]
    libbproc.move(n)                         the caller carries on on node n
    libbproc.rfork(n), vrfork(nodes)         fork, the children moved to their nodes

`codes` holds the numbers (special nodes, BProc's errno values, strerror), `nodes` the
questions, `launch` the calls that start programs elsewhere, `moves` the calls that move
running processes, `iod` the forwarder of the output of execmove's programs. The C
library (libbproc/: bproc.h, libbproc.so) has the same calls with BProc 4's signatures. docs/libbproc.md tells what each returns and raises.
"""

# The names are imported when first used (PEP 562), so that the forwarder, run as
# `python -m bpfs.libbproc.iod` for every execmove whose output it carries, does not load
# the whole package at its start-up.
_WHERE = {
    "bpfs.libbproc.codes": ("BE_INVALIDNODE", "BE_INVALIDPROC", "BE_NODEDOWN", "BE_SAMENODE",
                            "BE_SLAVEDIED", "NODE_ANY", "NODE_MASTER", "NODE_NONE", "NODE_SELF",
                            "X_OK", "strerror"),
    "bpfs.libbproc.launch": ("execmove", "vexecmove"),
    "bpfs.libbproc.moves": ("move", "rfork", "vrfork"),
    "bpfs.libbproc.nodes": ("access", "currnode", "nodeaddr", "nodenumber", "nodestatus",
                            "numnodes", "pidnode"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted([*_MODULE_OF, "getnodebyname"])


def __getattr__(name: str) -> object:
    import importlib
    if name == "getnodebyname":
        return importlib.import_module("bpfs.libbproc.codes").node_by_name
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'bpfs.libbproc' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)

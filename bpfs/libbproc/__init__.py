"""libbproc for Python programs: BProc 4's calls by their names, over the /bproc files.

    from bpfs import libbproc
    libbproc.currnode()                      -1 (NODE_MASTER) on the master, N on node N
    libbproc.numnodes(), nodestatus(n), nodeaddr(n), nodenumber(addr), access(n), pidnode(p)
    libbproc.getnodebyname("n5")             5 (also ".5", "5", "master", "self")
    libbproc.execmove(n, path, argv, env)    no return: the caller runs on node n
    libbproc.vexecmove(nodes, path, argv, env) -> [pid or -errno per node]
    libbproc.move(n), rfork(n), vrfork(nodes)   ENOSYS until the master moves processes

`codes` holds the numbers (special nodes, BProc's errno values, strerror), `nodes` the
questions, `launch` the calls that start or move processes, `iod` the forwarder of their
output. The C library (libbproc/: bproc.h, libbproc.so) has the same calls with BProc 4's
signatures. docs/libbproc.md tells what each returns and raises.
"""

from bpfs.libbproc.codes import (BE_INVALIDNODE, BE_INVALIDPROC, BE_NODEDOWN, BE_SAMENODE,
                                 BE_SLAVEDIED, NODE_ANY, NODE_MASTER, NODE_NONE, NODE_SELF, X_OK,
                                 node_by_name as getnodebyname, strerror)
from bpfs.libbproc.launch import execmove, move, rfork, vexecmove, vrfork
from bpfs.libbproc.nodes import (access, currnode, nodeaddr, nodenumber, nodestatus, numnodes,
                                 pidnode)

__all__ = ["BE_INVALIDNODE", "BE_INVALIDPROC", "BE_NODEDOWN", "BE_SAMENODE", "BE_SLAVEDIED",
           "NODE_ANY", "NODE_MASTER", "NODE_NONE", "NODE_SELF", "X_OK", "access", "currnode",
           "execmove", "getnodebyname", "move", "nodeaddr", "nodenumber", "nodestatus",
           "numnodes", "pidnode", "rfork", "strerror", "vexecmove", "vrfork"]

/* bproc.h: BProc 4's library calls for programs, served by bpfs over the /bproc files.
 *
 * The names, signatures, special node numbers and errno values are BProc 4's
 * (clustermatic bproc-4.0, sys/bproc.h), so a program written for it builds against
 * this header and libbproc.so (-lbproc). docs/libbproc.md says what each call does
 * here, what it returns, and which calls wait for the master (ENOSYS until then).
 * The mount point is $BPROC_MOUNT, else /bproc.
 */
#ifndef _SYS_BPROC_H
#define _SYS_BPROC_H

#include <sys/socket.h>

#define BPROC_API_VERSION 4

/* Special node numbers */
#define BPROC_NODE_MASTER (-1)
#define BPROC_NODE_SELF   (-2)
#define BPROC_NODE_NONE   (-3)
#define BPROC_NODE_ANY    (-4)

#define BPROC_X_OK        1
#define BPROC_STATE_LEN   15

/* BProc's own errno values */
#define BE_BASE           300
#define BE_INVALIDNODE    (BE_BASE + 0)   /* no such node */
#define BE_NODEDOWN       (BE_BASE + 1)   /* the node is down */
#define BE_SAMENODE       (BE_BASE + 2)   /* already on that node */
#define BE_SLAVEDIED      (BE_BASE + 3)
#define BE_INVALIDPROC    (BE_BASE + 4)

struct bproc_node_info_t {
    int node;
    char status[BPROC_STATE_LEN + 1];
    unsigned int mode;          /* the x bits of the node's ACL */
    unsigned int user;
    unsigned int group;
    struct sockaddr addr;
};

#ifdef __cplusplus
extern "C" {
#endif

/* Node information */
int bproc_numnodes(void);
int bproc_currnode(void);
int bproc_nodestatus(int node, char *status, int len);
int bproc_nodeaddr(int node, struct sockaddr *s, int *size);
int bproc_nodenumber(struct sockaddr *addr, int size);
int bproc_nodeinfo(int node, struct bproc_node_info_t *info);
int bproc_getnodebyname(const char *name);      /* BProc 3's; kept by MPI launchers */
int bproc_access(int node, int mode);
int bproc_pidnode(int pid);

/* Process creation and migration */
int bproc_execmove(int node, const char *cmd, char *const argv[], char *const envp[]);
int bproc_vexecmove(int nnodes, int *nodes, int *pids, const char *cmd,
                    char *const argv[], char *const envp[]);
int bproc_move(int node);
int bproc_rfork(int node);
int bproc_vrfork(int nnodes, int *nodes, int *pids);

const char *bproc_strerror(int err);

#ifdef __cplusplus
}
#endif
#endif

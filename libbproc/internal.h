/* libbproc's own helpers, shared by nodes.c, launch.c and move.c (not installed). */
#ifndef BPFS_LIBBPROC_INTERNAL_H
#define BPFS_LIBBPROC_INTERNAL_H
#include <errno.h>
#include <stddef.h>

#include "bproc.h"

/* What the master serves of issue 15: `move N` on procs/P/ctl (move.c). 0 makes every
 * move to another node ENOSYS without asking (a master without it answers EINVAL). */
#ifndef BPFS_MOVE_SERVED
#define BPFS_MOVE_SERVED 1
#endif

const char *bpfs_mount(void);
int bpfs_read(const char *rel, char *buf, size_t size);
/* The output forwarder (iod.c): serves until done, then returns. */
void bpfs_iod(int listener, int control, int result, const char *token);
/* After an execve that answered EINPROGRESS on a node (standin.c): no return. */
void bpfs_stand_in(int pid) __attribute__((noreturn));

/* BProc's errno for the one /bproc gave (a ctl write carries only errnos the kernel
 * knows): ENODEV, EHOSTDOWN -> BE_INVALIDNODE, BE_NODEDOWN. */
static inline int from_bpfs(int err)
{
    return err == ENODEV ? BE_INVALIDNODE : err == EHOSTDOWN ? BE_NODEDOWN : err;
}
#endif

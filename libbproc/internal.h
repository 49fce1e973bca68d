/* libbproc's own helpers, shared by nodes.c and launch.c (not installed). */
#ifndef BPFS_LIBBPROC_INTERNAL_H
#define BPFS_LIBBPROC_INTERNAL_H
#include <stddef.h>

/* What the master serves of issue 15: set to 1 once `move N` on procs/P/ctl works;
 * bproc_move, bproc_rfork and bproc_vrfork are written on top of it. */
#ifndef BPFS_MOVE_SERVED
#define BPFS_MOVE_SERVED 0
#endif

const char *bpfs_mount(void);
int bpfs_read(const char *rel, char *buf, size_t size);
/* The output forwarder (iod.c): serves until done, then returns. */
void bpfs_iod(int listener, int control, int result, const char *token);
#endif

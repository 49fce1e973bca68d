/* libbproc: bproc_move, bproc_rfork, bproc_vrfork over `move N` on MOUNT/procs/P/ctl,
 * as bpfs/libbproc/moves.py does them (docs/libbproc.md).
 *
 * bproc_move is exactly one write() of "move N\n" to the caller's own ctl: the master
 * stops the caller at that write's return and moves it, so the moved copy sees the
 * write succeed on the target, and a refusal fails the write where the caller still
 * runs. Nothing else may be in flight, so no retry, no second write.
 *
 * bproc_vrfork is seen from the parent's side, so that a failed move is an errno the
 * parent gets: the parent forks, the child waits, the parent writes "move N" for the
 * child's PID and, once that write has returned (the child runs on its node), wakes it
 * with WAKE_SIGNAL (SIGURG, ignored by default), which the child has blocked from its
 * fork on and takes with sigtimedwait: a wait that holds no pipe or socket (which could
 * not move) and makes no request to /bproc (a process stopped for its move while a
 * request of it is in flight in a bpfs daemon is a hazard for that daemon). A child that
 * finds another parent (its parent ended, or a node answers for a parent elsewhere) asks
 * where it is: on its node it goes on (a later wake-up is ignored), elsewhere it ends.
 * A refused move: the parent kills and reaps that child, pids[i] = -errno. A node equal
 * to the caller's own (or BPROC_NODE_SELF) is a plain fork, as BProc's BE_SAMENODE was. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bproc.h"
#include "internal.h"

#define WAKE_SIGNAL SIGURG           /* the parent's "you run on your node now" */
#define WAKE_CHECK_NS 50000000L      /* how often a waiting child looks at its parent: 50 ms */

static int fail(int err) { errno = err; return -1; }

/* One write of "move N\n" to MOUNT/procs/PID/ctl: 0, or the errno /bproc gave (ESRCH:
 * no such process; ENOSYS: no cluster mounted). For the caller's own PID a 0 comes back
 * on the target node. */
static int write_move(pid_t pid, int node)
{
    char path[4096], line[32];
    int fd, len, err = 0;
    ssize_t n;

    snprintf(path, sizeof path, "%s/procs/%d/ctl", bpfs_mount(), (int)pid);
    len = node == BPROC_NODE_MASTER ? snprintf(line, sizeof line, "move master\n")
                                    : snprintf(line, sizeof line, "move %d\n", node);
    fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        snprintf(path, sizeof path, "%s/procs", bpfs_mount());
        return access(path, F_OK) == 0 ? ESRCH : ENOSYS;
    }
    if (fd < 0)
        return errno;
    n = write(fd, line, len);
    if (n < 0)
        err = errno;
    else if (n != len)
        err = EIO;
    close(fd);                       /* on the target the handle may not have come: no matter */
    return err;
}

static int check_target(int node)
{
    if (!BPFS_MOVE_SERVED)
        return fail(ENOSYS);
    if (node < BPROC_NODE_MASTER)
        return fail(BE_INVALIDNODE);
    return 0;
}

int bproc_move(int node)
{
    int here = bproc_currnode(), err;

    if (node == BPROC_NODE_SELF || node == here)
        return 0;                    /* BProc: a move to where we are is none */
    if (check_target(node) < 0)
        return -1;
    err = write_move(getpid(), node);
    return err ? fail(from_bpfs(err)) : 0;
}

/* The child's wait: returns once the parent wakes it (it runs on `node` then), or once
 * it finds itself on `node` when getppid says another parent; ends if it is elsewhere
 * then. /bproc is asked only then. A wait cut short by the move (EINTR) is only a
 * shorter wait. */
static void wait_until_woken(int node, pid_t parent, const sigset_t *wake)
{
    struct timespec check = {0, WAKE_CHECK_NS};

    while (sigtimedwait(wake, NULL, &check) != WAKE_SIGNAL) {
        if (errno == EINTR || getppid() == parent)
            continue;
        if (bproc_currnode() == node)
            return;
        _exit(1);
    }
}

static void end_child(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);           /* ECHILD if SIGCHLD is ignored: the kernel reaped it */
}

/* The child's PID once it runs on `node` (and is woken); else it is ended and reaped:
 * -errno. */
static int move_child(pid_t pid, int node)
{
    int err = write_move(pid, node);

    if (err) {
        end_child(pid);
        return -from_bpfs(err);
    }
    kill(pid, WAKE_SIGNAL);          /* ESRCH: it ended already; its parent gets its status */
    return pid;
}

int bproc_vrfork(int nnodes, int *nodes, int *pids)
{
    int here = bproc_currnode();
    pid_t parent = getpid();
    sigset_t wake, mask;

    if (nnodes <= 0)
        return fail(EINVAL);
    for (int i = 0; i < nnodes; i++) {
        pids[i] = 0;
        if (nodes[i] != here && nodes[i] != BPROC_NODE_SELF && !BPFS_MOVE_SERVED)
            return fail(ENOSYS);
    }
    for (int i = 0; i < nnodes; i++) {
        int node = nodes[i] == BPROC_NODE_SELF ? here : nodes[i];
        pid_t pid;

        if (node != here && node < BPROC_NODE_MASTER) {
            pids[i] = -BE_INVALIDNODE;
            continue;
        }
        sigemptyset(&wake);
        sigaddset(&wake, WAKE_SIGNAL);
        sigprocmask(SIG_BLOCK, &wake, &mask);   /* a wake-up sent early waits for the child */
        pid = fork();
        if (pid == 0) {
            if (node != here)
                wait_until_woken(node, parent, &wake);
            sigprocmask(SIG_SETMASK, &mask, NULL);
            return i;                /* the child: its index */
        }
        sigprocmask(SIG_SETMASK, &mask, NULL);
        if (pid < 0) {               /* a local failure: the call fails, nothing is left */
            int err = errno;
            for (int k = 0; k < i; k++)
                if (pids[k] > 0)
                    end_child(pids[k]);
            return fail(err);
        }
        pids[i] = node == here ? pid : move_child(pid, node);
    }
    return nnodes;
}

int bproc_rfork(int node)
{
    int pid, ret = bproc_vrfork(1, &node, &pid);

    if (ret != 1)
        return ret < 0 ? -1 : 0;     /* -1: refused; 0: the child */
    return pid > 0 ? pid : fail(-pid);
}

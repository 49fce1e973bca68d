/* A process on a node that launched a program on another node stands in for it: the C
 * twin of bpfs/standin.py (docs/pidspace.md, "Launching from a node").
 *
 * execmove from a node: the caller's execve is run by the master in its ghost and the
 * program migrated elsewhere under the same cluster PID; on the caller's node the execve
 * fails with EINPROGRESS (no execve gives it of its own). The caller then stays as the
 * program's stand-in, the child its parent waits for: it passes every signal it gets on
 * to MOUNT/procs/PID/signal and ends the way the program ended.
 *
 * How it learns the end: a getpgid() of a PID that cannot exist (WAIT_ARG), which the
 * node's supervisor answers only once the master has said how the program ended (its
 * wait status); a signal interrupts it, is passed on, and the call is made again. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define WAIT_ARG (-0x42504653L)        /* getpgid(-"BPFS"): the stand-in's question */

static char sigfile[4096];

/* Async-signal-safe: open, write the number, close. */
static void pass_on(int sig)
{
    char buf[8];
    int n = sizeof buf, fd, saved = errno;

    buf[--n] = '\n';
    do
        buf[--n] = '0' + sig % 10;
    while ((sig /= 10) && n > 0);
    fd = open(sigfile, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, buf + n, sizeof buf - n) < 0)
            n = 0;
        close(fd);
    }
    errno = saved;
}

static int restarted(int err)
{
    return err == EINTR || (err >= 512 && err <= 516);   /* ERESTARTSYS .. RESTART_RESTARTBLOCK */
}

void bpfs_stand_in(int pid)
{
    struct sigaction sa = {.sa_handler = pass_on};
    sigset_t one;
    long status;

    snprintf(sigfile, sizeof sigfile, "%s/procs/%d/signal", bpfs_mount(), pid);
    sigemptyset(&sa.sa_mask);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && sig != SIGCHLD && sig != SIGCONT)
            sigaction(sig, &sa, NULL);       /* EINVAL for the C library's own: no matter */
    while ((status = syscall(SYS_getpgid, WAIT_ARG)) < 0)
        if (!restarted(errno))
            _exit(255);
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL);
        sigemptyset(&one);
        sigaddset(&one, sig);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        kill(getpid(), sig);
    }
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 255);
}

/* libbproc: execmove and vexecmove over MOUNT/nodes/N/ctl, as bpfs/libbproc/launch.py
 * does them (docs/libbproc.md): the request is bpfs.wire.execreq's execmove line, the
 * output comes back through the forwarder (iod.c, in a grandchild of the caller).
 * move, rfork and vrfork are in move.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bproc.h"
#include "internal.h"

#define RANKS_WAIT_MS 2000
#define MAX_LINE 65536

struct iod { int port, control, result; };
struct report { int rank, err; };

static int fail(int err) { errno = err; return -1; }

static int check_exec(const char *path)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return -1;
    if (!S_ISREG(st.st_mode) || access(path, X_OK) < 0)
        return fail(EACCES);
    return 0;
}

/* From a node the request goes to the master through the node's /bproc, as bpsh's. */
static int check_target(int node)
{
    if (node < BPROC_NODE_MASTER)
        return fail(BE_INVALIDNODE);
    return 0;
}

/* "null" when our stdout is /dev/null or closed, else "socket". */
static const char *stdout_spec(void)
{
    struct stat st;
    if (fstat(1, &st) < 0)
        return "null";
    return S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3) ? "null" : "socket";
}

static void make_token(char *token)
{
    unsigned char raw[16];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, raw, sizeof raw) != sizeof raw)
        abort();
    close(fd);
    for (int i = 0; i < 16; i++)
        sprintf(token + 2 * i, "%02x", raw[i]);
}

/* One execmove line (bpfs.wire.execreq's grammar); nodes as ascending runs "a-b". */
static char *render(int port, const char *token, int rank, const char *out, int n,
                    const int *nodes)
{
    size_t size = 256 + (size_t)n * 24;
    char *line = malloc(size);
    int len;

    if (!line)
        return NULL;
    len = snprintf(line, size, "execmove --port %d --token %s --rank %d --stdin null "
                   "--stdout %s --stderr stdout", port, token, rank, out);
    if (nodes) {
        len += snprintf(line + len, size - len, " --nodes ");
        for (int i = 0; i < n; ) {
            int j = i;
            while (j + 1 < n && nodes[j + 1] == nodes[j] + 1)
                j++;
            len += snprintf(line + len, size - len, i ? ",%d" : "%d", nodes[i]);
            if (j > i)
                len += snprintf(line + len, size - len, "-%d", nodes[j]);
            i = j + 1;
        }
    }
    snprintf(line + len, size - len, "\n");
    return line;
}

/* One write of the line to MOUNT/nodes/N/ctl: 0, or the errno (ENODEV: no such node). */
static int write_request(int node, const char *line)
{
    char path[4096];
    int fd, err = 0;

    snprintf(path, sizeof path, "%s/nodes/%d/ctl", bpfs_mount(), node);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? ENODEV : errno;
    if (write(fd, line, strlen(line)) < 0)
        err = errno;
    close(fd);
    return err;
}

static void close_all_but(const int *keep, int n)
{
    for (int fd = 3; fd < 1024; fd++) {
        int kept = 0;
        for (int i = 0; i < n; i++)
            kept |= keep[i] == fd;
        if (!kept)
            close(fd);
    }
}

static void reset_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Start the forwarder in a session of its own, as init's child; 0 or -1. */
static int start_iod(struct iod *iod, const char *token, int vector)
{
    struct sockaddr_in addr = {.sin_family = AF_INET};
    socklen_t alen = sizeof addr;
    int lfd, ctl[2], res[2] = {-1, -1}, status;
    pid_t pid;

    lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0
        || getsockname(lfd, (struct sockaddr *)&addr, &alen) < 0 || pipe2(ctl, O_CLOEXEC) < 0
        || (vector && pipe2(res, O_CLOEXEC) < 0)) {
        if (lfd >= 0)
            close(lfd);
        return -1;
    }
    pid = fork();
    if (pid == 0) {
        setsid();
        if (fork() == 0) {
            int keep[] = {lfd, ctl[0], res[1]};
            close_all_but(keep, 3);
            for (int sig = 1; sig < NSIG; sig++)    /* none of the program's handlers */
                signal(sig, SIG_DFL);
            reset_signals();
            bpfs_iod(lfd, ctl[0], res[1], token);
        }
        _exit(0);
    }
    close(lfd);
    close(ctl[0]);
    if (res[1] >= 0)
        close(res[1]);
    if (pid < 0 || waitpid(pid, &status, 0) < 0) {
        close(ctl[1]);
        if (res[0] >= 0)
            close(res[0]);
        return -1;
    }
    iod->port = ntohs(addr.sin_port);
    iod->control = ctl[1];
    iod->result = res[0];
    return 0;
}

static void iod_say(struct iod *iod, const char *what, int pid)
{
    char line[64];
    int n = pid ? snprintf(line, sizeof line, "%s %d\n", what, pid)
                : snprintf(line, sizeof line, "%s\n", what);
    if (iod->control >= 0 && write(iod->control, line, n) < 0)
        return;
}

static void iod_close(struct iod *iod)
{
    if (iod->control >= 0)
        close(iod->control);
    if (iod->result >= 0)
        close(iod->result);
    iod->control = iod->result = -1;
}

int bproc_execmove(int node, const char *cmd, char *const argv[], char *const envp[])
{
    struct iod iod = {0, -1, -1};
    char token[33], *line;
    const char *out;
    int here = bproc_currnode(), err;

    if (node == BPROC_NODE_SELF)
        node = here;
    if (node == here)
        return execve(cmd, argv, envp);
    if (check_target(node) < 0 || check_exec(cmd) < 0)
        return -1;
    out = stdout_spec();
    make_token(token);
    if (!strcmp(out, "socket") && start_iod(&iod, token, 0) < 0)
        return -1;
    line = render(iod.port ? iod.port : 1, token, 0, out, 0, NULL);
    err = line ? write_request(node, line) : ENOMEM;
    free(line);
    if (err) {
        iod_say(&iod, "quit", 0);
        iod_close(&iod);
        return fail(from_bpfs(err));
    }
    iod_say(&iod, "pid", getpid());
    execve(cmd, argv, envp);          /* the forwarder's control pipe closes on exec */
    if (errno == EINPROGRESS)         /* on a node: it runs elsewhere under our PID */
        bpfs_stand_in(getpid());
    err = errno;
    iod_say(&iod, "quit", 0);
    iod_close(&iod);
    return fail(err);
}

/* envp plus BPROC_RANK=rank (replacing one it had); malloc'd, or NULL. */
static char **rank_env(char *const envp[], const char *rank)
{
    int n = 0, k = 0;
    char **env;

    while (envp && envp[n])
        n++;
    env = calloc(n + 2, sizeof *env);
    if (!env)
        return NULL;
    for (int i = 0; i < n; i++)
        if (strncmp(envp[i], "BPROC_RANK=", 11))
            env[k++] = envp[i];
    env[k] = malloc(strlen(rank) + 12);
    if (!env[k]) {
        free(env);
        return NULL;
    }
    sprintf(env[k], "BPROC_RANK=%s", rank);
    return env;
}

static void free_env(char **env)
{
    int n = 0;

    if (!env)
        return;
    while (env[n])
        n++;
    if (n)
        free(env[n - 1]);            /* BPROC_RANK=..., the one string rank_env made */
    free(env);
}

/* Fork a child that writes `line` to the first of nodes[0..n) whose ctl exists (none:
 * only exec here) and execs cmd; a failure is a report {rank, errno} on status_w. */
static pid_t spawn(const int *nodes, int n, const char *line, const char *cmd,
                   char *const argv[], char **env, int status_w, int rank)
{
    pid_t pid = fork();
    if (pid)
        return pid;
    int keep[] = {status_w};
    struct report r = {rank, ENODEV};
    close_all_but(keep, 1);
    reset_signals();
    if (line) {
        for (int i = 0; i < n; i++) {
            r.err = write_request(nodes[i], line);
            if (r.err != ENODEV)
                break;
        }
        if (r.err) {
            if (write(status_w, &r, sizeof r) < 0)
                _exit(1);
            _exit(1);
        }
    }
    execve(cmd, argv, env);
    if (errno == EINPROGRESS) {       /* on a node: it runs elsewhere, we stand in for it */
        close(status_w);
        bpfs_stand_in(getpid());
    }
    r.err = errno;
    if (write(status_w, &r, sizeof r) < 0)
        _exit(127);
    _exit(127);
}

/* Reports until EOF (every child exec'd or ended): pids[rank] = -errno, child reaped. */
static int read_reports(int fd, int *pids, int n, int *whole)
{
    struct report r;
    int count = 0;

    while (read(fd, &r, sizeof r) == sizeof r) {
        count++;
        if (r.rank < 0) {
            *whole = from_bpfs(r.err);
            continue;
        }
        if (r.rank < n && pids[r.rank] > 0) {
            waitpid(pids[r.rank], NULL, 0);
            pids[r.rank] = -from_bpfs(r.err);
        }
    }
    close(fd);
    return count;
}

/* The ranks line the forwarder passes on: 0, or -1 if it does not come in time. */
static int read_ranks(struct iod *iod, pid_t writer, int *pids, int n)
{
    char *buf = malloc(MAX_LINE), *p, *end;
    int len = 0, pidfd = syscall(SYS_pidfd_open, writer, 0), timeout = -1, i = 0;
    struct pollfd fds[2] = {{iod->result, POLLIN, 0}, {pidfd, POLLIN, 0}};

    if (!buf)
        return -1;
    while (!memchr(buf, '\n', len)) {
        int r = poll(fds, pidfd >= 0 && timeout < 0 ? 2 : 1, timeout);
        if (r <= 0)
            goto fail;
        if (fds[0].revents) {
            r = read(iod->result, buf + len, MAX_LINE - 1 - len);
            if (r <= 0)
                goto fail;
            len += r;
        } else if (fds[1].revents) {
            timeout = RANKS_WAIT_MS;
        }
    }
    buf[len] = 0;
    if (strncmp(buf, "ranks ", 6))
        goto fail;
    for (p = buf + 6; i < n; i++, p = end) {
        long v = strtol(p, &end, 10);
        if (end == p)
            goto fail;
        pids[i] = v > 0 ? (int)v : -from_bpfs((int)-v);
    }
    if (pidfd >= 0)
        close(pidfd);
    free(buf);
    return 0;
fail:
    if (pidfd >= 0)
        close(pidfd);
    free(buf);
    return fail(EIO);
}

static int vexecmove(int nnodes, int *nodes, int *pids, const char *cmd,
                     char *const argv[], char *const envp[]);

int bproc_vexecmove(int nnodes, int *nodes, int *pids, const char *cmd,
                    char *const argv[], char *const envp[])
{
    int *copy, ret;

    if (nnodes <= 0)
        return fail(EINVAL);
    copy = malloc(nnodes * sizeof *copy);       /* the caller's list stays as it was */
    if (!copy)
        return -1;
    memcpy(copy, nodes, nnodes * sizeof *copy);
    ret = vexecmove(nnodes, copy, pids, cmd, argv, envp);
    free(copy);
    return ret;
}

static int vexecmove(int nnodes, int *nodes, int *pids, const char *cmd,
                     char *const argv[], char *const envp[])
{
    struct iod iod = {0, -1, -1};
    int here = bproc_currnode(), remote = 0, vector, status[2], whole = 0, ret = nnodes;
    char token[33], rank[16], **env;
    const char *out;

    for (int i = 0; i < nnodes; i++) {
        pids[i] = 0;
        if (nodes[i] == BPROC_NODE_SELF)
            nodes[i] = here;
        if (nodes[i] != here && check_target(nodes[i]) < 0)
            return -1;
        remote += nodes[i] != here;
    }
    if (check_exec(cmd) < 0)
        return -1;
    /* one capture for all ranks from the master; from a node, each rank needs a stand-in */
    vector = nnodes > 1 && remote == nnodes && here == BPROC_NODE_MASTER;
    out = stdout_spec();
    make_token(token);
    /* a multi-node request always has a forwarder: the master's ranks link comes to it */
    if (((!strcmp(out, "socket") && remote) || vector) && start_iod(&iod, token, vector) < 0)
        return -1;
    if (pipe2(status, O_CLOEXEC) < 0) {
        iod_close(&iod);
        return -1;
    }
    if (vector) {
        char *line = render(iod.port, token, 0, out, nnodes, nodes);
        env = rank_env(envp, "XXXXXXX");
        pid_t writer = line && env ? spawn(nodes, nnodes, line, cmd, argv, env, status[1], -1)
                                   : -1;
        free(line);
        free_env(env);
        close(status[1]);
        pids[0] = writer;
        read_reports(status[0], pids, 0, &whole);
        if (writer < 0 || whole) {
            if (writer > 0)
                waitpid(writer, NULL, 0);
            iod_say(&iod, "quit", 0);
            iod_close(&iod);
            return fail(whole ? whole : ENOMEM);
        }
        iod_say(&iod, "pid", writer);
        if (read_ranks(&iod, writer, pids, nnodes) < 0)
            ret = -1;
    } else {
        for (int i = 0; i < nnodes; i++) {
            char *line = nodes[i] == here ? NULL
                : render(iod.port ? iod.port : 1, token, i, out, 0, NULL);
            snprintf(rank, sizeof rank, "%07d", i);
            env = rank_env(envp, rank);
            pids[i] = env ? spawn(&nodes[i], 1, line, cmd, argv, env, status[1], i)
                          : -ENOMEM;
            free(line);
            free_env(env);
        }
        close(status[1]);
        read_reports(status[0], pids, nnodes, &whole);
        for (int i = 0; i < nnodes; i++)
            if (pids[i] > 0 && nodes[i] != here)
                iod_say(&iod, "pid", pids[i]);
    }
    iod_close(&iod);
    return ret;
}

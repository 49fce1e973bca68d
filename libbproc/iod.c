/* libbproc's output forwarder (BProc's iod), in C: what bpfs/libbproc/iod.py does for
 * Python programs, run in a grandchild of the caller (a session of its own, init's
 * child), so a C program pays no interpreter for it. docs/libbproc.md describes it; the
 * link formats are bpfs/wire/execreq.py's:
 *   TOKEN PID FD\n DATA...            copied to fd 1 (fd 2 for a link of fd 2)
 *   TOKEN PID err ERRNO MESSAGE\n     "bproc: MESSAGE" on fd 2
 *   TOKEN PID ranks\n R R ...\n EOF   "ranks R R ...\n" on the result pipe; each R > 0 is
 *                                     a process to wait for
 * Control pipe lines: "pid P" (wait for P), "quit"; EOF: the caller exec'd or ended.
 * It leaves once every process it waits for has ended, its links are at EOF and nothing
 * waits in the listen queue; or LINGER_MS after the last activity once they have ended.
 * Only fixed tables, no malloc: it runs after fork() in whatever program called us. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define MAX_FDS 4096
#define HEADER_MAX 512
#define LINGER_MS 2000
#define RANKS_MAX (1 << 20)

enum kind { FREE, LISTENER, CONTROL, PIDFD, HEADER, LINK, RANKS };

struct slot { enum kind kind; int out, len; char head[HEADER_MAX]; };

static struct pollfd fds[MAX_FDS];
static struct slot slots[MAX_FDS];
static int nfds;
static char ranks[RANKS_MAX];
static int ranks_len;

static long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void add(int fd, enum kind kind)
{
    if (nfds == MAX_FDS) {
        close(fd);
        return;
    }
    fds[nfds] = (struct pollfd){fd, POLLIN, 0};
    slots[nfds].kind = kind;
    slots[nfds].len = 0;
    nfds++;
}

static void drop(int i)
{
    close(fds[i].fd);
    slots[i].kind = FREE;
    fds[i].fd = -1;
}

static int count(enum kind kind)
{
    int n = 0;
    for (int i = 0; i < nfds; i++)
        n += slots[i].kind == kind;
    return n;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

static void watch(int pid)
{
    int fd = syscall(SYS_pidfd_open, pid, 0);
    if (fd >= 0)
        add(fd, PIDFD);
}

static void out(int i, const char *data, size_t n)
{
    if (write_all(slots[i].out, data, n) == 0)
        return;
    if (errno == EPIPE && slots[i].out == 1) {      /* nobody reads our stdout: stop all */
        for (int j = 0; j < nfds; j++)
            if (slots[j].kind == LINK && slots[j].out == 1)
                drop(j);
    } else {
        drop(i);
    }
}

/* A whole header line in slots[i].head: what the link is. */
static void header(int i, const char *token, char *rest, size_t rest_len)
{
    char *f[5] = {slots[i].head}, *sp;
    int n = 1;

    while (n < 5 && (sp = strchr(f[n - 1], ' '))) {   /* TOKEN PID WHAT [ERRNO [MESSAGE]] */
        *sp = 0;
        f[n++] = sp + 1;
    }
    if (n < 3 || strcmp(f[0], token) || !*f[1] || strspn(f[1], "0123456789") != strlen(f[1])) {
        drop(i);
    } else if (!strcmp(f[2], "err") && n >= 4) {
        char msg[HEADER_MAX + 16];
        int len = snprintf(msg, sizeof msg, "bproc: %s\n",
                           n == 5 ? f[4] : strerror(atoi(f[3])));
        write_all(2, msg, len < (int)sizeof msg ? len : (int)sizeof msg - 1);
        drop(i);
    } else if (!strcmp(f[2], "ranks") && n == 3) {
        slots[i].kind = RANKS;
        ranks_len = 0;
        if (rest_len < RANKS_MAX) {
            memcpy(ranks, rest, rest_len);
            ranks_len = rest_len;
        }
    } else if ((!strcmp(f[2], "1") || !strcmp(f[2], "2") || !strcmp(f[2], "0")) && n == 3) {
        slots[i].kind = LINK;
        slots[i].out = f[2][0] == '2' ? 2 : 1;
        if (rest_len)
            out(i, rest, rest_len);
    } else {
        drop(i);
    }
}

static void read_header(int i, const char *token)
{
    char buf[HEADER_MAX];
    struct slot *s = &slots[i];
    ssize_t n = read(fds[i].fd, buf, HEADER_MAX - s->len);
    char *nl;

    if (n <= 0) {
        drop(i);
        return;
    }
    memcpy(s->head + s->len, buf, n);
    s->len += n;
    nl = memchr(s->head, '\n', s->len);
    if (!nl) {
        if (s->len >= HEADER_MAX - 1)
            drop(i);
        return;
    }
    *nl = 0;
    {
        char rest[HEADER_MAX];
        size_t rest_len = s->len - (nl + 1 - s->head);
        memcpy(rest, nl + 1, rest_len);
        header(i, token, rest, rest_len);
    }
}

static void read_ranks(int i, int result)
{
    ssize_t n = read(fds[i].fd, ranks + ranks_len, RANKS_MAX - 1 - ranks_len);
    char *p, *end;

    if (n > 0) {
        ranks_len += n;
        if (ranks_len < RANKS_MAX - 1)
            return;
    }
    drop(i);
    ranks[ranks_len] = 0;
    if (result >= 0) {
        write_all(result, "ranks ", 6);
        for (p = ranks; *p == ' ' || *p == '\n'; p++)
            ;
        write_all(result, p, strcspn(p, "\n"));
        write_all(result, "\n", 1);
    }
    for (p = ranks; ; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        if (v > 0)
            watch((int)v);
    }
}

static void read_control(int i, int *told, int *quit)
{
    char buf[4096], *line, *save = NULL;
    ssize_t n = read(fds[i].fd, buf, sizeof buf - 1);

    if (n <= 0) {
        drop(i);
        return;
    }
    buf[n] = 0;
    for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (!strcmp(line, "quit"))
            *quit = 1;
        else if (!strncmp(line, "pid ", 4)) {
            *told = 1;
            watch(atoi(line + 4));
        }
    }
}

static int waiting(int listener)
{
    struct pollfd p = {listener, POLLIN, 0};
    return poll(&p, 1, 0) > 0;
}

void bpfs_iod(int listener, int control, int result, const char *token)
{
    int told = 0, quit = 0;
    long last = now_ms();

    signal(SIGPIPE, SIG_IGN);
    add(listener, LISTENER);
    add(control, CONTROL);
    for (;;) {
        int alive = count(CONTROL) + count(PIDFD), busy;
        if (quit || (!alive && !told))
            break;
        busy = count(HEADER) + count(LINK) + count(RANKS);
        if (!alive && (now_ms() - last > LINGER_MS || (!busy && !waiting(listener))))
            break;
        if (poll(fds, nfds, alive ? -1 : LINGER_MS / 4) < 0 && errno != EINTR)
            break;
        for (int i = 0; i < nfds; i++) {
            if (slots[i].kind == FREE || !fds[i].revents)
                continue;
            last = now_ms();
            switch (slots[i].kind) {
            case LISTENER: {
                int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
                if (fd >= 0)
                    add(fd, HEADER);
                break;
            }
            case CONTROL: read_control(i, &told, &quit); break;
            case PIDFD: drop(i); break;
            case HEADER: read_header(i, token); break;
            case RANKS: read_ranks(i, result); break;
            case LINK: {
                char buf[65536];
                ssize_t n = read(fds[i].fd, buf, sizeof buf);
                if (n <= 0)
                    drop(i);
                else
                    out(i, buf, n);
                break;
            }
            case FREE: break;
            }
        }
        /* compact the tables: dropped slots go */
        int k = 0;
        for (int i = 0; i < nfds; i++) {
            if (slots[i].kind == FREE)
                continue;
            fds[k] = fds[i];
            slots[k] = slots[i];
            k++;
        }
        nfds = k;
    }
}

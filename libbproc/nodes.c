/* libbproc: what a program asks about the cluster, read from the /bproc files.
 * The same rules as bpfs/libbproc/nodes.py (docs/libbproc.md): $BPROC_MOUNT/self names
 * the caller's node (none: the master); BE_INVALIDNODE, BE_NODEDOWN, ENODATA on a node,
 * ENOSYS with no cluster mounted. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bproc.h"
#include "internal.h"

const char *bpfs_mount(void)
{
    const char *m = getenv("BPROC_MOUNT");
    return m && *m ? m : "/bproc";
}

/* Read MOUNT/REL into buf (NUL-terminated); the length, or -1 with errno. */
int bpfs_read(const char *rel, char *buf, size_t size)
{
    char path[4096];
    int fd, n = 0, total = 0;

    snprintf(path, sizeof path, "%s/%s", bpfs_mount(), rel);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    while (total < (int)size - 1 && (n = read(fd, buf + total, size - 1 - total)) > 0)
        total += n;
    close(fd);
    buf[total] = 0;
    return n < 0 ? -1 : total;
}

static int no_cluster(void)
{
    errno = bproc_currnode() >= 0 ? ENODATA : ENOSYS;
    return -1;
}

/* MOUNT/nodes/N/NAME into buf; BE_INVALIDNODE if the cluster has no node N. */
static int node_file(int node, const char *name, char *buf, size_t size)
{
    char rel[64], status[16];

    snprintf(rel, sizeof rel, "nodes/%d/%s", node, name);
    if (bpfs_read(rel, buf, size) >= 0)
        return 0;
    if (errno != ENOENT)
        return -1;
    if (bpfs_read("status", status, sizeof status) < 0)
        return no_cluster();
    errno = BE_INVALIDNODE;
    return -1;
}

static int resolve(int node)
{
    if (node == BPROC_NODE_SELF)
        return bproc_currnode();
    if (node < BPROC_NODE_MASTER) {
        errno = BE_INVALIDNODE;
        return BPROC_NODE_NONE;
    }
    return node;
}

int bproc_currnode(void)
{
    char path[4096], target[32];
    ssize_t n;
    char *end;
    long v;

    snprintf(path, sizeof path, "%s/self", bpfs_mount());
    n = readlink(path, target, sizeof target - 1);
    if (n <= 0)
        return BPROC_NODE_MASTER;
    target[n] = 0;
    v = strtol(target, &end, 10);
    return *end || v < 0 ? BPROC_NODE_MASTER : (int)v;
}

int bproc_numnodes(void)
{
    static char buf[1 << 20];
    int n, lines = 0;

    n = bpfs_read("status", buf, sizeof buf);
    if (n < 0)
        return errno == ENOENT ? no_cluster() : -1;
    for (int i = 0; i < n; i++)
        lines += buf[i] == '\n';
    return lines;
}

int bproc_nodestatus(int node, char *status, int len)
{
    char buf[64];
    int n;

    if ((node = resolve(node)) == BPROC_NODE_NONE)
        return -1;
    if (node == BPROC_NODE_MASTER)
        strcpy(buf, "up");
    else if (node_file(node, "status", buf, sizeof buf) < 0)
        return -1;
    buf[strcspn(buf, "\n")] = 0;
    n = strlen(buf);
    if (n > len) {                   /* as getxattr of bproc.state: ERANGE, nothing copied */
        errno = ERANGE;
        return -1;
    }
    memcpy(status, buf, n);
    if (n < len)
        status[n] = 0;
    return n;
}

/* The address in MOUNT/nodes/N/info ("address: A"), as text; BE_NODEDOWN if none. */
static int info_address(int node, char *out, size_t size)
{
    char buf[4096], *p, *end;

    if (node_file(node, "info", buf, sizeof buf) < 0)
        return -1;
    p = strstr(buf, "address:");
    if (!p || (p != buf && p[-1] != '\n')) {
        errno = EIO;
        return -1;
    }
    p += strlen("address:");
    while (*p == ' ')
        p++;
    end = p + strcspn(p, "\n");
    if (end == p || (end - p == 1 && *p == '-')) {
        errno = BE_NODEDOWN;
        return -1;
    }
    if ((size_t)(end - p) >= size) {
        errno = EIO;
        return -1;
    }
    memcpy(out, p, end - p);
    out[end - p] = 0;
    return 0;
}

static int to_sockaddr(const char *text, struct sockaddr *s, int *size)
{
    struct sockaddr_in in4 = {.sin_family = AF_INET};
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6};
    const void *src = &in4;
    int need = sizeof in4;

    if (inet_pton(AF_INET, text, &in4.sin_addr) != 1) {
        if (inet_pton(AF_INET6, text, &in6.sin6_addr) != 1) {
            errno = EIO;
            return -1;
        }
        src = &in6;
        need = sizeof in6;
    }
    if (*size < need) {
        errno = ERANGE;
        return -1;
    }
    memcpy(s, src, need);
    *size = need;
    return 0;
}

int bproc_nodeaddr(int node, struct sockaddr *s, int *size)
{
    char text[128];

    if ((node = resolve(node)) == BPROC_NODE_NONE)
        return -1;
    if (node == BPROC_NODE_MASTER) {
        errno = EADDRNOTAVAIL;
        return -1;
    }
    if (info_address(node, text, sizeof text) < 0)
        return -1;
    return to_sockaddr(text, s, size);
}

int bproc_nodenumber(struct sockaddr *addr, int size)
{
    static char buf[1 << 20];
    char want[INET6_ADDRSTRLEN] = "", *line, *save = NULL;
    int node;
    char word[64], state[32], mode[16], user[64], group[64], address[128];

    if (addr->sa_family == AF_INET && size >= (int)sizeof(struct sockaddr_in))
        inet_ntop(AF_INET, &((struct sockaddr_in *)addr)->sin_addr, want, sizeof want);
    else if (addr->sa_family == AF_INET6 && size >= (int)sizeof(struct sockaddr_in6))
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)addr)->sin6_addr, want, sizeof want);
    if (!*want || bpfs_read("status", buf, sizeof buf) < 0)
        return BPROC_NODE_NONE;
    for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (sscanf(line, "%63s %31s %15s %63s %63s %127s", word, state, mode, user, group,
                   address) == 6 && strcmp(address, want) == 0) {
            node = atoi(word);
            return node;
        }
    }
    return BPROC_NODE_NONE;
}

int bproc_nodeinfo(int node, struct bproc_node_info_t *info)
{
    char path[4096], text[128];
    struct stat st;
    int size = sizeof info->addr;

    memset(info, 0, sizeof *info);
    if ((node = resolve(node)) == BPROC_NODE_NONE || node == BPROC_NODE_MASTER) {
        errno = BE_INVALIDNODE;
        return -1;
    }
    if (bproc_nodestatus(node, info->status, sizeof info->status) < 0)
        return -1;
    snprintf(path, sizeof path, "%s/nodes/%d", bpfs_mount(), node);
    if (stat(path, &st) < 0)
        return -1;
    info->node = node;
    info->mode = st.st_mode & 0111;
    info->user = st.st_uid;
    info->group = st.st_gid;
    if (info_address(node, text, sizeof text) == 0)
        to_sockaddr(text, &info->addr, &size);   /* an IPv6 address does not fit: left 0 */
    return 0;
}

int bproc_getnodebyname(const char *name)
{
    const char *p = name;
    long v = 0;

    if (!strcmp(name, "master") || !strcmp(name, "-1"))
        return BPROC_NODE_MASTER;
    if (!strcmp(name, "self"))
        return BPROC_NODE_SELF;
    if (*p == 'n' || *p == '.')
        p++;
    if (!*p)
        return BPROC_NODE_NONE;
    for (; *p; p++) {
        if (!isdigit((unsigned char)*p) || v > 99999999)
            return BPROC_NODE_NONE;
        v = v * 10 + (*p - '0');
    }
    return (int)v;
}

int bproc_access(int node, int mode)
{
    char path[4096], status[32];
    struct stat st;
    gid_t groups[1024];
    int bit, n;

    if (mode & ~BPROC_X_OK) {
        errno = EINVAL;
        return -1;
    }
    if ((node = resolve(node)) == BPROC_NODE_NONE)
        return -1;
    if (node == BPROC_NODE_MASTER)
        return 0;
    if (bproc_nodestatus(node, status, sizeof status) < 0)
        return -1;
    if (strcmp(status, "up")) {
        errno = BE_NODEDOWN;
        return -1;
    }
    snprintf(path, sizeof path, "%s/nodes/%d", bpfs_mount(), node);
    if (stat(path, &st) < 0)
        return -1;
    if (geteuid() == 0 || !mode)
        return 0;
    if (geteuid() == st.st_uid)
        bit = 0100;
    else {
        bit = 0001;
        if (getegid() == st.st_gid)
            bit = 0010;
        n = getgroups(1024, groups);
        for (int i = 0; i < n; i++)
            if (groups[i] == st.st_gid)
                bit = 0010;
    }
    if (st.st_mode & bit)
        return 0;
    errno = EACCES;
    return -1;
}

int bproc_pidnode(int pid)
{
    char rel[64], buf[32];

    snprintf(rel, sizeof rel, "procs/%d/node", pid);
    if (bpfs_read(rel, buf, sizeof buf) < 0)
        return BPROC_NODE_MASTER;
    return atoi(buf);
}

const char *bproc_strerror(int err)
{
    if (err < 0)
        err = -err;
    switch (err) {
    case BE_INVALIDNODE: return "Invalid node number";
    case BE_NODEDOWN:    return "Node is down";
    case BE_SAMENODE:    return "Move to same node";
    case BE_SLAVEDIED:   return "Slave node died";
    case BE_INVALIDPROC: return "Invalid process ID";
    default:             return strerror(err);
    }
}

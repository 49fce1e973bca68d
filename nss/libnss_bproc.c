/* libnss_bproc: the cluster's names (n5, .5, master) for glibc's NSS, as BProc's was.
 *
 * `hosts: files bproc` in /etc/nsswitch.conf sends lookups that /etc/hosts did not answer
 * here. The names come from the hosts file the bpfs master writes (bpfs/master/names.py;
 * /run/bpfs/hosts, or $BPFS_HOSTS for programs that are not set-user-ID): lines of
 * "ADDRESS NAME ALIAS..." as in /etc/hosts, '#' starts a comment. The file is replaced
 * atomically by the master, so one open reads one consistent version; nothing is cached
 * and no daemon is asked. Names compare case-insensitively; `getent hosts .5` works as
 * `n5` does because the master writes both.
 *
 * Entry points: gethostbyname_r, gethostbyname2_r, gethostbyname3_r, gethostbyname4_r
 * (getaddrinfo) and gethostbyaddr_r. A name that is not in the file is NOTFOUND (the next
 * source is asked); a missing file is UNAVAIL; a buffer too small is TRYAGAIN with
 * ERANGE, as glibc expects, so the caller retries with a bigger one.
 *
 * Built and installed by bootstrap's install_nss:
 *   gcc -shared -fPIC -O2 -Wall -o libnss_bproc.so.2 libnss_bproc.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <nss.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#define DEFAULT_HOSTS "/run/bpfs/hosts"
#define MAX_NAMES 16

struct entry {
    int family;
    unsigned char addr[16];
    int addrlen;
    char *names[MAX_NAMES + 1];     /* names[0] is the canonical name */
    int count;
};

static const char *hosts_path(void)
{
    const char *p = secure_getenv("BPFS_HOSTS");
    return p && *p ? p : DEFAULT_HOSTS;
}

/* Split one line into `e` (pointing into `line`); 0 if it holds no host. */
static int parse_line(char *line, struct entry *e)
{
    char *save = NULL, *word;
    char *hash = strchr(line, '#');

    if (hash)
        *hash = '\0';
    word = strtok_r(line, " \t\r\n", &save);
    if (!word)
        return 0;
    if (inet_pton(AF_INET, word, e->addr) == 1) {
        e->family = AF_INET;
        e->addrlen = 4;
    } else if (inet_pton(AF_INET6, word, e->addr) == 1) {
        e->family = AF_INET6;
        e->addrlen = 16;
    } else {
        return 0;
    }
    e->count = 0;
    while (e->count < MAX_NAMES && (word = strtok_r(NULL, " \t\r\n", &save)))
        e->names[e->count++] = word;
    e->names[e->count] = NULL;
    return e->count > 0;
}

static int has_name(const struct entry *e, const char *name)
{
    for (int i = 0; i < e->count; i++)
        if (strcasecmp(e->names[i], name) == 0)
            return 1;
    return 0;
}

/* Find the first line matching `name` (af: AF_INET, AF_INET6 or AF_UNSPEC) or, if name
   is NULL, the address addr/len of family af. `line` keeps the strings e points into. */
static enum nss_status find(const char *name, int af, const void *addr, int len,
                            struct entry *e, char *line, size_t size, int *errnop)
{
    FILE *f = fopen(hosts_path(), "re");

    if (!f) {
        *errnop = errno;
        return NSS_STATUS_UNAVAIL;
    }
    while (fgets(line, (int)size, f)) {
        if (!parse_line(line, e))
            continue;
        if (af != AF_UNSPEC && e->family != af)
            continue;
        if (name ? has_name(e, name)
                 : (e->addrlen == len && memcmp(e->addr, addr, len) == 0)) {
            fclose(f);
            return NSS_STATUS_SUCCESS;
        }
    }
    fclose(f);
    *errnop = ENOENT;
    return NSS_STATUS_NOTFOUND;
}

/* Bump-allocate `n` bytes of `buffer`, aligned for pointers. */
static char *take(char **buffer, size_t *left, size_t n)
{
    uintptr_t pad = (sizeof(void *) - ((uintptr_t)*buffer % sizeof(void *))) % sizeof(void *);
    char *p;

    if (*left < pad + n)
        return NULL;
    p = *buffer + pad;
    *buffer += pad + n;
    *left -= pad + n;
    return p;
}

static enum nss_status too_small(int *errnop, int *h_errnop)
{
    *errnop = ERANGE;
    *h_errnop = NETDB_INTERNAL;
    return NSS_STATUS_TRYAGAIN;
}

/* Fill `result` from `e`, its strings and arrays copied into `buffer`. */
static enum nss_status fill(const struct entry *e, struct hostent *result, char *buffer,
                            size_t buflen, int *errnop, int *h_errnop)
{
    char **aliases = (char **)take(&buffer, &buflen, sizeof(char *) * (size_t)e->count);
    char **addrs = (char **)take(&buffer, &buflen, sizeof(char *) * 2);
    char *addr = take(&buffer, &buflen, 16);

    if (!aliases || !addrs || !addr)
        return too_small(errnop, h_errnop);
    for (int i = 0; i < e->count; i++) {
        size_t n = strlen(e->names[i]) + 1;
        char *copy = take(&buffer, &buflen, n);
        if (!copy)
            return too_small(errnop, h_errnop);
        memcpy(copy, e->names[i], n);
        if (i == 0)
            result->h_name = copy;
        else
            aliases[i - 1] = copy;
    }
    aliases[e->count - 1] = NULL;
    memcpy(addr, e->addr, e->addrlen);
    addrs[0] = addr;
    addrs[1] = NULL;
    result->h_aliases = aliases;
    result->h_addrtype = e->family;
    result->h_length = e->addrlen;
    result->h_addr_list = addrs;
    *h_errnop = NETDB_SUCCESS;
    return NSS_STATUS_SUCCESS;
}

static enum nss_status lookup(const char *name, int af, const void *addr, int len,
                              struct hostent *result, char *buffer, size_t buflen,
                              int *errnop, int *h_errnop)
{
    char line[1024];
    struct entry e;
    enum nss_status st = find(name, af, addr, len, &e, line, sizeof line, errnop);

    if (st != NSS_STATUS_SUCCESS) {
        *h_errnop = st == NSS_STATUS_NOTFOUND ? HOST_NOT_FOUND : NO_RECOVERY;
        return st;
    }
    return fill(&e, result, buffer, buflen, errnop, h_errnop);
}

enum nss_status _nss_bproc_gethostbyname3_r(const char *name, int af, struct hostent *result,
                                            char *buffer, size_t buflen, int *errnop,
                                            int *h_errnop, int32_t *ttlp, char **canonp)
{
    enum nss_status st;

    if (af != AF_INET && af != AF_INET6) {
        *errnop = EAFNOSUPPORT;
        *h_errnop = NO_DATA;
        return NSS_STATUS_UNAVAIL;
    }
    st = lookup(name, af, NULL, 0, result, buffer, buflen, errnop, h_errnop);
    if (st == NSS_STATUS_SUCCESS) {
        if (ttlp)
            *ttlp = 0;
        if (canonp)
            *canonp = result->h_name;
    }
    return st;
}

enum nss_status _nss_bproc_gethostbyname2_r(const char *name, int af, struct hostent *result,
                                            char *buffer, size_t buflen, int *errnop,
                                            int *h_errnop)
{
    return _nss_bproc_gethostbyname3_r(name, af, result, buffer, buflen, errnop, h_errnop,
                                       NULL, NULL);
}

enum nss_status _nss_bproc_gethostbyname_r(const char *name, struct hostent *result,
                                           char *buffer, size_t buflen, int *errnop,
                                           int *h_errnop)
{
    return _nss_bproc_gethostbyname3_r(name, AF_INET, result, buffer, buflen, errnop,
                                       h_errnop, NULL, NULL);
}

enum nss_status _nss_bproc_gethostbyname4_r(const char *name, struct gaih_addrtuple **pat,
                                            char *buffer, size_t buflen, int *errnop,
                                            int *herrnop, int32_t *ttlp)
{
    char line[1024];
    struct entry e;
    struct gaih_addrtuple *t;
    char *copy;
    size_t n;
    enum nss_status st = find(name, AF_UNSPEC, NULL, 0, &e, line, sizeof line, errnop);

    if (st != NSS_STATUS_SUCCESS) {
        *herrnop = st == NSS_STATUS_NOTFOUND ? HOST_NOT_FOUND : NO_RECOVERY;
        return st;
    }
    n = strlen(e.names[0]) + 1;
    t = (struct gaih_addrtuple *)take(&buffer, &buflen, sizeof *t);
    copy = take(&buffer, &buflen, n);
    if (!t || !copy)
        return too_small(errnop, herrnop);
    memcpy(copy, e.names[0], n);
    memset(t, 0, sizeof *t);
    t->name = copy;
    t->family = e.family;
    memcpy(t->addr, e.addr, e.addrlen);
    *pat = t;
    if (ttlp)
        *ttlp = 0;
    *herrnop = NETDB_SUCCESS;
    return NSS_STATUS_SUCCESS;
}

enum nss_status _nss_bproc_gethostbyaddr_r(const void *addr, socklen_t len, int af,
                                           struct hostent *result, char *buffer,
                                           size_t buflen, int *errnop, int *h_errnop)
{
    if ((af == AF_INET && len != 4) || (af == AF_INET6 && len != 16)
            || (af != AF_INET && af != AF_INET6)) {
        *errnop = EAFNOSUPPORT;
        *h_errnop = NO_RECOVERY;
        return NSS_STATUS_UNAVAIL;
    }
    return lookup(NULL, af, addr, (int)len, result, buffer, buflen, errnop, h_errnop);
}

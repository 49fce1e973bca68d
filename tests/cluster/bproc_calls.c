/* The C side of tests/cluster/test_libbproc.py: BProc 4's calls from a C program linked
 * with -lbproc, one subcommand each, results on stdout as "name value" lines.
 *   bproc_calls info [NODE]                currnode, numnodes, nodestatus, nodeaddr, access
 *   bproc_calls names NAME...              getnodebyname of each
 *   bproc_calls execmove NODE PATH ARG...  no return on success
 *   bproc_calls vexecmove N,N,.. PATH ARG...   pids, then each one's wait status
 *   bproc_calls samenode                   move, rfork, vrfork to the master, from it
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sys/bproc.h>

extern char **environ;

static int info(int node)
{
    char status[BPROC_STATE_LEN + 1];
    struct sockaddr_in addr;
    int size = sizeof addr;

    printf("currnode %d\n", bproc_currnode());
    int n = bproc_numnodes();
    printf("numnodes %d %d\n", n, n < 0 ? errno : 0);
    n = bproc_nodestatus(node, status, sizeof status);
    printf("nodestatus %d %s %d\n", n, n < 0 ? "-" : status, n < 0 ? errno : 0);
    if (bproc_nodeaddr(node, (struct sockaddr *)&addr, &size) == 0)
        printf("nodeaddr %s %d\n", inet_ntoa(addr.sin_addr), size);
    else
        printf("nodeaddr - %d\n", errno);
    printf("nodenumber %d\n", size == sizeof addr ? bproc_nodenumber((struct sockaddr *)&addr, size) : -3);
    printf("access %d %d\n", bproc_access(node, BPROC_X_OK), errno);
    printf("strerror %s\n", bproc_strerror(BE_NODEDOWN));
    return 0;
}

static int parse_nodes(char *spec, int *nodes)
{
    int n = 0;
    for (char *p = strtok(spec, ","); p; p = strtok(NULL, ","))
        nodes[n++] = atoi(p);
    return n;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "info"))
        return info(argc > 2 ? atoi(argv[2]) : 0);
    if (argc >= 2 && !strcmp(argv[1], "names")) {
        for (int i = 2; i < argc; i++)
            printf("%s %d\n", argv[i], bproc_getnodebyname(argv[i]));
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "execmove")) {
        fflush(stdout);
        bproc_execmove(atoi(argv[2]), argv[3], argv + 4, environ);
        printf("execmove %d %s\n", errno, bproc_strerror(errno));
        return 1;
    }
    if (argc >= 4 && !strcmp(argv[1], "vexecmove")) {
        int nodes[64], pids[64], n = parse_nodes(argv[2], nodes), status;
        int r = bproc_vexecmove(n, nodes, pids, argv[3], argv + 4, environ);
        printf("vexecmove %d %d\n", r, r < 0 ? errno : 0);
        for (int i = 0; r > 0 && i < n; i++) {
            status = -1;
            if (pids[i] > 0)
                waitpid(pids[i], &status, 0);
            printf("rank %d %d %d\n", i, pids[i] > 0 ? 1 : pids[i], status);
        }
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "samenode")) {
        int nodes[2] = {BPROC_NODE_SELF, BPROC_NODE_MASTER}, pids[2], status, r;
        r = bproc_move(BPROC_NODE_MASTER);
        printf("move %d %d\n", r, r < 0 ? errno : 0);
        r = bproc_move(BPROC_NODE_SELF);
        printf("move-self %d %d\n", r, r < 0 ? errno : 0);
        fflush(stdout);
        r = bproc_rfork(BPROC_NODE_MASTER);
        if (r == 0)
            _exit(4);
        waitpid(r, &status, 0);
        printf("rfork %d %d\n", r > 0, WEXITSTATUS(status));
        fflush(stdout);
        r = bproc_vrfork(2, nodes, pids);
        if (r >= 0 && r < 2)
            _exit(5 + r);
        printf("vrfork %d", r);
        for (int i = 0; r == 2 && i < 2; i++) {
            waitpid(pids[i], &status, 0);
            printf(" %d %d", pids[i] > 0, WEXITSTATUS(status));
        }
        printf("\n");
        return 0;
    }
    fprintf(stderr, "usage: bproc_calls info|names|execmove|vexecmove|samenode ...\n");
    return 2;
}

/* The C side of tests/cluster/test_libbproc_move.py: bproc_move, bproc_rfork and
 * bproc_vrfork from a C program linked with -lbproc, results on stdout as lines.
 *   bproc_move move NODE...        moves itself to each node in turn:
 *                                  "move NODE RET ERRNO CURRNODE SUM-OK COUNTER"
 *   bproc_move rfork NODE          "child CURRNODE" from the child (exit 7), then
 *                                  "rfork OK-OR-RET ERRNO PIDNODE STATUS CHILDREN-LEFT"
 *   bproc_move vrfork N,N,..       "child K CURRNODE" from child k (exit 10+k), then
 *                                  "vrfork RET ERRNO", "slot K PID-OR-1 STATUS", "left N"
 * Memory state: 8 MiB filled with a pattern that depends on the address, checked after
 * each move (SUM-OK 1), and a counter bumped before each move.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sys/bproc.h>

#define BIG (8 << 20)

static unsigned char *big;

static void fill(void)
{
    big = malloc(BIG);
    for (size_t i = 0; i < BIG; i++)
        big[i] = (unsigned char)(i * 2654435761u >> 13);
}

static int intact(void)
{
    for (size_t i = 0; i < BIG; i++)
        if (big[i] != (unsigned char)(i * 2654435761u >> 13))
            return 0;
    return 1;
}

static int children_left(void)
{
    return waitpid(-1, NULL, WNOHANG) == -1 && errno == ECHILD ? 0 : 1;
}

static int do_move(int argc, char **argv)
{
    volatile int counter = 0;

    fill();
    for (int i = 2; i < argc; i++) {
        int node = atoi(argv[i]), r, err;
        counter++;
        fflush(stdout);
        r = bproc_move(node);
        err = r < 0 ? errno : 0;     /* before bproc_currnode(), which may set errno */
        printf("move %d %d %d %d %d %d\n", node, r, err, bproc_currnode(), intact(), counter);
        fflush(stdout);
    }
    return 0;
}

static int do_rfork(int node)
{
    int status = -1, pid;

    fill();
    fflush(stdout);
    pid = bproc_rfork(node);
    if (pid == 0) {
        printf("child %d %d\n", bproc_currnode(), intact());
        fflush(stdout);
        _exit(7);
    }
    int err = pid < 0 ? errno : 0, where = pid > 0 ? bproc_pidnode(pid) : -9;
    if (pid > 0)
        waitpid(pid, &status, 0);
    printf("rfork %d %d %d %d %d\n", pid > 0 ? 1 : pid, err, where, status, children_left());
    return 0;
}

static int do_vrfork(char *spec)
{
    int nodes[64], pids[64], n = 0, r;

    for (char *p = strtok(spec, ","); p && n < 64; p = strtok(NULL, ","))
        nodes[n++] = atoi(p);
    fflush(stdout);
    r = bproc_vrfork(n, nodes, pids);
    if (r >= 0 && r < n) {
        printf("child %d %d\n", r, bproc_currnode());
        fflush(stdout);
        _exit(10 + r);
    }
    int err = r < 0 ? errno : 0;
    printf("vrfork %d %d\n", r, err);
    for (int i = 0; r == n && i < n; i++) {
        int status = -1;
        if (pids[i] > 0)
            waitpid(pids[i], &status, 0);
        printf("slot %d %d %d\n", i, pids[i] > 0 ? 1 : pids[i], status);
    }
    printf("left %d\n", children_left());
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "move"))
        return do_move(argc, argv);
    if (argc == 3 && !strcmp(argv[1], "rfork"))
        return do_rfork(atoi(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "vrfork"))
        return do_vrfork(argv[2]);
    fprintf(stderr, "usage: bproc_move move|rfork|vrfork ...\n");
    return 2;
}

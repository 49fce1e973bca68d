/* Programs that do, after migration, what a migrated process must be able to do.
 * Each mode prints a deterministic text so the output can be compared with a local run. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static pthread_t main_thread;
static volatile sig_atomic_t got;

static void on_signal(int sig) { got = sig; }

static void *worker(void *arg) {
    long n = (long)arg, sum = 0;
    for (long i = 0; i <= n * 1000; i++) sum += i;
    return (void *)sum;
}

static void *poke_main(void *arg) {
    (void)arg;
    pthread_kill(main_thread, SIGUSR1);
    return NULL;
}

static int threads(void) {
    pthread_t t[4];
    void *res;
    signal(SIGUSR1, on_signal);
    main_thread = pthread_self();
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, (void *)(i + 1));
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], &res);
        printf("thread %d: %ld\n", i, (long)res);
    }
    pthread_create(&t[0], NULL, poke_main, NULL);
    pthread_join(t[0], NULL);
    while (!got) pause();
    printf("main thread got signal %d\n", got);
    return 0;
}

static int signals(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGUSR2, &sa, NULL);
    raise(SIGUSR2);
    printf("handler saw %d\n", got);
    signal(SIGALRM, on_signal);
    ualarm(20000, 0);
    while (got != SIGALRM) pause();
    printf("alarm %d\n", got);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigprocmask(SIG_BLOCK, &set, NULL);
    kill(getpid(), SIGTERM);
    sigpending(&set);
    printf("pending TERM %d\n", sigismember(&set, SIGTERM));
    return 0;
}

static long deep(int n) {
    volatile char pad[4096];
    pad[0] = (char)n;
    if (n == 0) return pad[0];
    return deep(n - 1) + pad[0];
}

static int stack(void) {
    printf("stack sum %ld\n", deep(1500)); /* about 6 MB of stack */
    return 0;
}

static int alloc(void) {
    size_t size = 100u << 20;
    unsigned char *p = malloc(size);
    if (!p) return 1;
    for (size_t i = 0; i < size; i++) p[i] = (unsigned char)(i * 7);
    unsigned long sum = 0;
    for (size_t i = 0; i < size; i += 4096) sum += p[i];
    printf("allocated 100 MB, checksum %lu\n", sum);
    free(p);
    return 0;
}

static int clocks(void) {
    struct timespec a, b, r;
    clock_gettime(CLOCK_MONOTONIC, &a);
    clock_gettime(CLOCK_MONOTONIC, &b);
    clock_gettime(CLOCK_REALTIME, &r);
    time_t now = time(NULL);
    long diff = (long)(r.tv_sec - now);
    printf("monotonic %s, realtime %s\n",
           (b.tv_sec > a.tv_sec || (b.tv_sec == a.tv_sec && b.tv_nsec >= a.tv_nsec)) ? "ok" : "BAD",
           (diff >= -1 && diff <= 1 && now > 1600000000) ? "ok" : "BAD");
    return 0;
}

static int cpu_mode(void) {
    int cpu = sched_getcpu();
    unsigned c2 = 99;
    syscall(SYS_getcpu, &c2, NULL, NULL);
    long n = sysconf(_SC_NPROCESSORS_CONF);
    printf("sched_getcpu %s\n", (cpu >= 0 && cpu < n && c2 < (unsigned)n) ? "ok" : "BAD");
    return 0;
}

static int proc(void) {
    char buf[4096];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    buf[n < 0 ? 0 : n] = 0;
    printf("exe %s\n", buf);
    FILE *f = fopen("/proc/self/cmdline", "r");
    n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    printf("cmdline");
    for (ssize_t i = 0; i < n; i += strlen(buf + i) + 1) printf(" [%s]", buf + i);
    printf("\n");
    f = fopen("/proc/self/comm", "r");
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    printf("comm %s", buf);
    printf("pid ok %d\n", getpid() == (pid_t)syscall(SYS_gettid));
    return 0;
}

static int pending(void) {
    sigset_t set;
    signal(SIGUSR1, on_signal);
    sigpending(&set);
    printf("USR1 pending at start %d\n", sigismember(&set, SIGUSR1));
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    printf("handler got %d\n", got);
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "hello";
    if (!strcmp(mode, "threads")) return threads();
    if (!strcmp(mode, "signals")) return signals();
    if (!strcmp(mode, "stack")) return stack();
    if (!strcmp(mode, "alloc")) return alloc();
    if (!strcmp(mode, "clocks")) return clocks();
    if (!strcmp(mode, "getcpu")) return cpu_mode();
    if (!strcmp(mode, "proc")) return proc();
    if (!strcmp(mode, "pending")) return pending();
    printf("hello from %s\n", argv[0]);
    return 3;
}

/* hack/bench-runc-timer.c — `hack/bench ctr`'s stand-in for the runc binary:
 * runs the real runc (DEFAULT_RUNC, given when it is compiled) with the same
 * arguments, stdio and environment, and appends "<subcommand> <microseconds>"
 * to DEFAULT_LOG (also given then: the shim that runs it passes on
 * containerd's environment, not the bench's): how long runc itself took,
 * from just before its fork to its exit. The rest of a `ctr run` under runc is what every runtime pays
 * (ctr, containerd, the snapshotter, the shim process), which bounds the
 * ratio any runtime can reach against runc. Compiled by hack/bench-ctr,
 * statically, so its own start costs no dynamic loading. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef DEFAULT_RUNC
#define DEFAULT_RUNC "/usr/sbin/runc"
#endif
#ifndef DEFAULT_LOG
#define DEFAULT_LOG ""
#endif

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    const char *runc = DEFAULT_RUNC;
    const char *log = DEFAULT_LOG;
    /* The first argument that is not an option (or an option's value
     * given with '='): runc's global options come before the command. */
    const char *sub = "?";
    static const char *commands[] = {"create", "start", "delete", "state", "kill", "run",
                                     "exec", "ps", "features", "pause", "resume", "update", 0};
    for (int i = 1; i < argc && !strcmp(sub, "?"); i++)
        for (int c = 0; commands[c]; c++)
            if (!strcmp(argv[i], commands[c]))
                sub = commands[c];
    long long t0 = now_us();
    pid_t pid = fork();
    if (pid < 0)
        return 127;
    if (pid == 0) {
        argv[0] = (char *)runc;
        execv(runc, argv);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    long long t1 = now_us();
    if (*log) {
        FILE *f = fopen(log, "a");
        if (f) {
            fprintf(f, "%s %lld\n", sub, t1 - t0);
            fclose(f);
        }
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}

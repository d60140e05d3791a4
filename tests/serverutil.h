/* Running `qmix serve` for the server test suites: the real binary on a free loopback port, its
 * output in a log in a fresh directory, stopped with SIGTERM (SIGKILL after 20 s). */
#ifndef QMIX_TEST_SERVERUTIL_H
#define QMIX_TEST_SERVERUTIL_H

#include <signal.h>
#include <sys/prctl.h>
#include <time.h>

#include "testutil.h"

typedef struct server {
    pid_t pid;
    int port;
    char *dir;
    int n_files;
} server;

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Starts `qmix serve model --port 0 --threads 1 ...extra` and waits for its "listening" line. */
static inline void tu_serve(server *s, const char *model, const char *const *extra)
{
    memset(s, 0, sizeof *s);
    s->dir = tu_tmpdir();
    char log[1024];
    snprintf(log, sizeof log, "%s/server.log", s->dir);
    const char *argv[64] = {tu_qmix_bin(), "serve", model, "--port", "0", "--threads", "1"};
    int n = 7;
    for (int i = 0; extra && extra[i]; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    s->pid = fork();
    ck_assert_int_ge(s->pid, 0);
    if (s->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a failed test must not leave a server behind */
        FILE *f = fopen(log, "w");
        if (!f) _exit(127);
        dup2(fileno(f), 2);
        dup2(fileno(f), 1);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    double end = now() + 30;
    while (now() < end) {
        size_t len;
        FILE *f = fopen(log, "rb");
        if (f) {
            fclose(f);
            char *text = tu_read(log, &len);
            char *at = strstr(text, "http://127.0.0.1:");
            if (at && strchr(at, '\n')) {
                s->port = atoi(at + strlen("http://127.0.0.1:"));
                free(text);
                return;
            }
            free(text);
        }
        int st;
        ck_assert_msg(waitpid(s->pid, &st, WNOHANG) == 0, "the server exited at start");
        usleep(20000);
    }
    ck_abort_msg("the server did not start");
}

/* SIGTERM, then its exit status (-1 if it had to be killed); the files stay. */
static inline int terminate(server *s)
{
    kill(s->pid, SIGTERM);
    int status = 0;
    double end = now() + 20;
    while (waitpid(s->pid, &status, WNOHANG) == 0) {
        if (now() > end) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, &status, 0);
            return -1;
        }
        usleep(20000);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static inline int stop(server *s)
{
    int rc = terminate(s);
    tu_rmdir(s->dir);
    return rc;
}

#endif

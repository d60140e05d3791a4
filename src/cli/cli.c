#include "cli/cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "util/fileio.h"

int cli_int(const char *cmd, const char *flag, const char *value, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end || v < lo || v > hi) {
        fprintf(stderr, "qmix %s: %s expects an integer in [%ld, %ld], got '%s'\n", cmd, flag, lo,
                hi, value);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_double(const char *cmd, const char *flag, const char *value, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(value, &end);
    if (errno || end == value || *end) {
        fprintf(stderr, "qmix %s: %s expects a number, got '%s'\n", cmd, flag, value);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_tokens(const char *cmd, const char *spec, int32_t **tokens, int *n)
{
    char *owned = NULL;
    if (spec[0] == '@') {
        qmix_err err;
        if (qmix_read_file(spec + 1, 256u << 20, &owned, NULL, &err)) {
            fprintf(stderr, "qmix %s: --tokens: %s\n", cmd, err.msg);
            return -1;
        }
        spec = owned;
    }
    size_t cap = 64;
    int count = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    const char *p = spec;
    int rc = 0;
    while (ids) {
        while (*p == ' ' || *p == ',' || *p == '\n' || *p == '\t' || *p == '\r') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "qmix %s: --tokens: '%.20s' is not a token id\n", cmd, p);
            rc = -1;
            break;
        }
        if ((size_t)count == cap) {
            int32_t *grown = realloc(ids, 2 * cap * sizeof *ids);
            if (!grown) {
                free(ids);
                ids = NULL;
                break;
            }
            ids = grown;
            cap *= 2;
        }
        ids[count++] = (int32_t)v;
        p = end;
    }
    free(owned);
    if (!ids) {
        fprintf(stderr, "qmix %s: out of memory\n", cmd);
        return -1;
    }
    if (!rc && count == 0) {
        fprintf(stderr, "qmix %s: --tokens: no token ids given\n", cmd);
        rc = -1;
    }
    if (rc) {
        free(ids);
        return -1;
    }
    *tokens = ids;
    *n = count;
    return 0;
}

const char *cli_value(const char *cmd, int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        fprintf(stderr, "qmix %s: %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

uint64_t cli_peak_rss(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)ru.ru_maxrss * 1024;
}

void cli_human_bytes(double bytes, char *buf, size_t len)
{
    const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) {
        bytes /= 1024;
        u++;
    }
    snprintf(buf, len, u ? "%.2f %s" : "%.0f %s", bytes, units[u]);
}

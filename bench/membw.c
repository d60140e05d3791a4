/* build/bench/membw [--threads N] [--mib M] [--repeats R] [--copy]
 * Memory read bandwidth (GB/s = 1e9 bytes/s) for 1 and 2 threads, or for 1..N with --threads. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eval/membw.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: membw [--threads N] [--mib M] [--repeats R] [--copy]\n\n"
            "Streams a buffer far larger than the last-level cache and reports read bandwidth\n"
            "(best of R passes, GB/s = 1e9 bytes/s) for 1 and 2 threads, or 1..N with --threads.\n\n"
            "  --threads N   largest thread count to measure (default 2)\n"
            "  --mib M       buffer size in MiB (default 1024)\n"
            "  --repeats R   passes per measurement, best kept (default 5)\n"
            "  --copy        also measure copy bandwidth (read + write bytes counted)\n");
}

static int parse(const char *flag, const char *v, long lo, long hi, long *out)
{
    char *end;
    long x = v ? strtol(v, &end, 10) : 0;
    if (!v || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "membw: %s expects an integer in [%ld, %ld]\n", flag, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

int main(int argc, char **argv)
{
    long threads = 2, mib = 1024, repeats = 5;
    int copy = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--threads")) {
            if (parse(a, v, 1, 1024, &threads)) return 2;
            i++;
        } else if (!strcmp(a, "--mib")) {
            if (parse(a, v, 1, 1 << 20, &mib)) return 2;
            i++;
        } else if (!strcmp(a, "--repeats")) {
            if (parse(a, v, 1, 1000, &repeats)) return 2;
            i++;
        } else if (!strcmp(a, "--copy")) {
            copy = 1;
        } else {
            fprintf(stderr, "membw: unknown argument '%s' (see --help)\n", a);
            return 2;
        }
    }
    size_t bytes = (size_t)mib << 20;
    printf("buffer %ld MiB, best of %ld passes, %s read loop\n", mib, repeats, qmix_membw_isa());
    printf("%8s %14s%s\n", "threads", "read GB/s", copy ? "      copy GB/s" : "");
    for (long t = 1; t <= threads; t++) {
        double r = qmix_membw_read_gbs((int)t, bytes, (int)repeats);
        if (r < 0) {
            fprintf(stderr, "membw: could not allocate %ld MiB or start %ld threads\n", mib, t);
            return 1;
        }
        printf("%8ld %14.2f", t, r);
        if (copy) {
            double c = qmix_membw_copy_gbs((int)t, bytes, (int)repeats);
            printf(" %14.2f", c);
        }
        printf("\n");
        fflush(stdout);
    }
    return 0;
}

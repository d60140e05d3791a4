#include "eval/stats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest value with at least q of the list at or below it. */
static double percentile(const double *sorted, int64_t n, double q)
{
    int64_t rank = (int64_t)ceil(q * (double)n);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

void qmix_summarize(double *values, int64_t n, double trim, qmix_summary *out)
{
    memset(out, 0, sizeof *out);
    out->n = n;
    if (n <= 0) return;
    qsort(values, (size_t)n, sizeof *values, cmp_double);
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += values[i];
    out->mean = sum / (double)n;
    out->median = n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
    out->min = values[0];
    out->max = values[n - 1];
    out->p90 = percentile(values, n, 0.90);
    out->p99 = percentile(values, n, 0.99);
    out->p999 = percentile(values, n, 0.999);

    if (!(trim >= 0 && trim < 0.5)) trim = 0;
    int64_t drop = (int64_t)floor(trim * (double)n);
    if (2 * drop >= n) drop = (n - 1) / 2;
    double tsum = 0;
    for (int64_t i = drop; i < n - drop; i++) tsum += values[i];
    out->trimmed_mean = tsum / (double)(n - 2 * drop);
}

/* Summary statistics over a list of per-window or per-token values, as the seed cards report them. */
#ifndef QMIX_EVAL_STATS_H
#define QMIX_EVAL_STATS_H

#include <stdint.h>

/* Fraction of values dropped at each end for the trimmed mean (seed 000's "Trimmed Mean" drops
 * outlier windows such as WikiText-2's headers and trailers). */
#define QMIX_TRIM_DEFAULT 0.10

typedef struct qmix_summary {
    int64_t n;
    double mean, median, trimmed_mean;
    double min, max, p90, p99, p999;     /* percentiles: nearest rank on the sorted values */
} qmix_summary;

/* Sorts values[n] in place and summarises them; trim in [0, 0.5) is dropped from each end for
 * trimmed_mean (at least one value always remains). n == 0 gives all zeros. */
void qmix_summarize(double *values, int64_t n, double trim, qmix_summary *out);

#endif

/* SVG charts for the measuring commands: `qmix kld --plot` and `qmix sensitivity --plot`. */
#ifndef QMIX_CLI_PLOT_H
#define QMIX_CLI_PLOT_H

#include <stdint.h>

#include "qmix.h"

/* Histogram of per-token KLD on a log axis, with the median and p99 marked. */
int cli_plot_kld_histogram(const char *path, const char *title, const double *kld, int64_t n,
                            double median, double p99, qmix_err *err);

/* Horizontal bars on a log axis: one group per row (e.g. a tensor role), one bar per series
 * (e.g. a bit width); values[row * n_series + series], values ≤ 0 not drawn. At most 6 series. */
int cli_plot_bars(const char *path, const char *title, const char *x_label,
                   const char *const *rows, int n_rows, const char *const *series, int n_series,
                   const double *values, qmix_err *err);

#endif

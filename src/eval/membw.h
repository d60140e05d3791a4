/* A STREAM-like probe of the machine's memory bandwidth, the ceiling a memory-bound decode is
 * measured against. */
#ifndef QMIX_EVAL_MEMBW_H
#define QMIX_EVAL_MEMBW_H

#include <stddef.h>

#define QMIX_MEMBW_DEFAULT_BYTES ((size_t)1 << 30) /* 1 GiB: far beyond any last-level cache */

/* Read bandwidth in GB/s (1e9 bytes/s): n_threads threads (< 1: 1) each sum their own
 * contiguous slice of a bytes-sized buffer (0: QMIX_MEMBW_DEFAULT_BYTES) that was written first so
 * its pages are resident; the best of repeats (< 1: 1) passes. Returns a negative value if the
 * buffer or the threads could not be had. */
double qmix_membw_read_gbs(int n_threads, size_t bytes, int repeats);

/* Copy bandwidth in GB/s, counting the bytes read plus the bytes written (STREAM's convention):
 * each thread copies its slice of one bytes/2 buffer into another. Same arguments. */
double qmix_membw_copy_gbs(int n_threads, size_t bytes, int repeats);

/* The widest read loop this CPU gets ("avx512", "avx2" or "c"). */
const char *qmix_membw_isa(void);

#endif

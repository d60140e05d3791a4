/* What the kernel benchmarks share: a monotonic clock and a fixed-seed generator for test data
 * (the same inputs on every run). */
#ifndef QMIX_BENCH_BENCHUTIL_H
#define QMIX_BENCH_BENCHUTIL_H

#include <stdint.h>
#include <time.h>

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static inline uint64_t next(void) /* xorshift64 */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static inline float frand(void) /* uniform in [-1, 1) */
{
    return (float)((next() >> 40) * (1.0 / (1 << 23)) - 1.0);
}

#endif

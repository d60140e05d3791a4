/* Memory bandwidth probe. Threads are one-shot (created per call), kept across the repeats and
 * released together by a barrier so every pass times all of them streaming at once. */
#include "eval/membw.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MEMBW_X86 1
#endif

#define ALIGN 4096

typedef uint64_t (*read_fn)(const uint8_t *p, size_t n);

/* Plain C: eight independent integer accumulators so loads are never serialised. */
static uint64_t read_c(const uint8_t *p, size_t n)
{
    const uint64_t *q = (const uint64_t *)p;
    size_t words = n / 8;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    size_t i = 0;
    for (; i + 8 <= words; i += 8) {
        a0 += q[i];
        a1 += q[i + 1];
        a2 += q[i + 2];
        a3 += q[i + 3];
        a4 += q[i + 4];
        a5 += q[i + 5];
        a6 += q[i + 6];
        a7 += q[i + 7];
    }
    for (; i < words; i++) a0 += q[i];
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

#ifdef MEMBW_X86
__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, size_t n)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, a0);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + read_c(p + i, n - i);
}

__attribute__((target("avx512f"))) static uint64_t read_avx512(const uint8_t *p, size_t n)
{
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)(p + i)));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(p + i + 64)));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(p + i + 128)));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(p + i + 192)));
    }
    a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
    uint64_t lanes[8], sum = 0; /* summed unsigned: the totals wrap, by design */
    _mm512_storeu_si512((void *)lanes, a0);
    for (int l = 0; l < 8; l++) sum += lanes[l];
    return sum + read_c(p + i, n - i);
}
#endif

static read_fn pick_read(const char **name)
{
#ifdef MEMBW_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        if (name) *name = "avx512";
        return read_avx512;
    }
    if (__builtin_cpu_supports("avx2")) {
        if (name) *name = "avx2";
        return read_avx2;
    }
#endif
    if (name) *name = "c";
    return read_c;
}

const char *qmix_membw_isa(void)
{
    const char *name;
    pick_read(&name);
    return name;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct membw_run {
    pthread_barrier_t barrier;
    pthread_mutex_t gate_mu; /* workers wait here until every thread exists (or one failed) */
    pthread_cond_t gate_cv;
    int gate; /* 0: wait, 1: go, -1: abort */
    int copy, repeats;
    read_fn read;
    uint8_t *src, *dst;
    size_t slice; /* bytes per thread, a multiple of ALIGN */
} membw_run;

typedef struct membw_worker {
    membw_run *run;
    int index;
    uint64_t sink;
} membw_worker;

static void pass(membw_worker *w)
{
    membw_run *r = w->run;
    size_t off = (size_t)w->index * r->slice;
    if (r->copy)
        memcpy(r->dst + off, r->src + off, r->slice);
    else
        w->sink += r->read(r->src + off, r->slice);
}

static void *worker_main(void *arg)
{
    membw_worker *w = arg;
    pthread_mutex_lock(&w->run->gate_mu);
    while (!w->run->gate) pthread_cond_wait(&w->run->gate_cv, &w->run->gate_mu);
    int go = w->run->gate > 0;
    pthread_mutex_unlock(&w->run->gate_mu);
    if (!go) return NULL;
    for (int rep = 0; rep < w->run->repeats; rep++) {
        pthread_barrier_wait(&w->run->barrier); /* start */
        pass(w);
        pthread_barrier_wait(&w->run->barrier); /* done */
    }
    return NULL;
}

static volatile uint64_t membw_sink;

static double measure(int copy, int n_threads, size_t bytes, int repeats)
{
    if (n_threads < 1) n_threads = 1;
    if (repeats < 1) repeats = 1;
    if (!bytes) bytes = QMIX_MEMBW_DEFAULT_BYTES;
    size_t per_buf = copy ? bytes / 2 : bytes;
    size_t slice = per_buf / (size_t)n_threads / ALIGN * ALIGN;
    if (!slice) return -1;
    per_buf = slice * (size_t)n_threads;

    membw_run run = {.copy = copy, .repeats = repeats, .read = pick_read(NULL), .slice = slice,
                     .gate_mu = PTHREAD_MUTEX_INITIALIZER, .gate_cv = PTHREAD_COND_INITIALIZER};
    void *src = NULL, *dst = NULL;
    if (posix_memalign(&src, ALIGN, per_buf)) return -1;
    if (copy && posix_memalign(&dst, ALIGN, per_buf)) {
        free(src);
        return -1;
    }
    run.src = src;
    run.dst = dst;
    /* Write every page first so the passes time DRAM, not page faults or the zero page. */
    memset(src, 1, per_buf);
    if (dst) memset(dst, 2, per_buf);

    double best = -1;
    membw_worker *workers = calloc((size_t)n_threads, sizeof *workers);
    pthread_t *tids = calloc((size_t)n_threads, sizeof *tids);
    if (!workers || !tids || pthread_barrier_init(&run.barrier, NULL, (unsigned)n_threads)) {
        free(workers);
        free(tids);
        free(src);
        free(dst);
        return -1;
    }
    /* Thread 0 is the caller; it also keeps the time. */
    int started = 1;
    for (int t = 0; t < n_threads; t++) {
        workers[t].run = &run;
        workers[t].index = t;
    }
    for (int t = 1; t < n_threads; t++, started++)
        if (pthread_create(&tids[t], NULL, worker_main, &workers[t])) break;
    pthread_mutex_lock(&run.gate_mu);
    run.gate = started == n_threads ? 1 : -1;
    pthread_cond_broadcast(&run.gate_cv);
    pthread_mutex_unlock(&run.gate_mu);
    if (started == n_threads) {
        double best_s = 0;
        for (int rep = 0; rep < repeats; rep++) {
            pthread_barrier_wait(&run.barrier);
            double t0 = now();
            pass(&workers[0]);
            pthread_barrier_wait(&run.barrier);
            double dt = now() - t0;
            if (rep == 0 || dt < best_s) best_s = dt;
        }
        double moved = copy ? 2.0 * (double)per_buf : (double)per_buf;
        best = best_s > 0 ? moved / best_s / 1e9 : -1;
    }
    for (int t = 1; t < started; t++) pthread_join(tids[t], NULL);
    uint64_t s = 0;
    for (int t = 0; t < n_threads; t++) s += workers[t].sink;
    membw_sink = s;
    pthread_barrier_destroy(&run.barrier);
    free(workers);
    free(tids);
    free(src);
    free(dst);
    return best;
}

double qmix_membw_read_gbs(int n_threads, size_t bytes, int repeats)
{
    return measure(0, n_threads, bytes, repeats);
}

double qmix_membw_copy_gbs(int n_threads, size_t bytes, int repeats)
{
    return measure(1, n_threads, bytes, repeats);
}

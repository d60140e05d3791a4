/* build/bench/qmatmul [--isa NAME] [--bits LIST] [--group G] [--time S] [--pool-mib M]
 *
 * Single-thread microbenchmark of the quantized qk_matmul (MLX affine codes, bf16 scales and
 * biases) on an 8192 x 2048 matrix, for every ISA this CPU supports:
 *   decode  (n = 1): GB/s of packed bytes streamed (codes + scales + biases). "cold" rotates
 *                    over distinct copies filling --pool-mib (default 512 MiB), so every call
 *                    reads DRAM like a decoded token does; "hot" repeats one 512-row slice that
 *                    stays in cache (the kernel's compute ceiling for n = 1).
 *   prefill (n = 64, 512): GFLOP/s (2·rows·cols·n per call) over a calibrated prefix of rows. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "benchutil.h"
#include "kernels/kernels_impl.h"

typedef struct pool {
    int64_t rows, cols;
    int bits, gs, copies;
    size_t code_bytes, scale_bytes, mat_bytes; /* per copy: codes, then scales, then biases */
    uint8_t *data;
} pool;

static int pool_make(pool *p, int bits, int gs, int64_t rows, int64_t cols, size_t pool_bytes)
{
    p->rows = rows;
    p->cols = cols;
    p->bits = bits;
    p->gs = gs;
    p->code_bytes = (size_t)rows * (size_t)cols * bits / 8;
    p->scale_bytes = (size_t)rows * (size_t)(cols / gs) * 2;
    p->mat_bytes = p->code_bytes + 2 * p->scale_bytes;
    p->copies = (int)(pool_bytes / p->mat_bytes);
    if (p->copies < 1) p->copies = 1;
    p->data = malloc(p->mat_bytes * (size_t)p->copies);
    if (!p->data) return -1;
    for (int c = 0; c < p->copies; c++) {
        uint8_t *m = p->data + (size_t)c * p->mat_bytes;
        for (size_t i = 0; i + 8 <= p->code_bytes; i += 8) {
            uint64_t v = next();
            memcpy(m + i, &v, 8);
        }
        uint16_t *s = (uint16_t *)(m + p->code_bytes);
        size_t per = p->scale_bytes / 2; /* scales, then as many biases */
        for (size_t i = 0; i < 2 * per; i++)
            s[i] = qk_f32_to_bf16(i < per ? 0.001f + 0.01f * frand() : 0.05f * frand());
    }
    return 0;
}

static qk_mat pool_mat(const pool *p, int i)
{
    const uint8_t *m = p->data + (size_t)(i % p->copies) * p->mat_bytes;
    qk_mat q = {.dtype = QMIX_U32, .rows = p->rows, .cols = p->cols,
                .row_bytes = (size_t)p->cols * p->bits / 8, .data = m, .bits = p->bits,
                .group_size = p->gs, .scale_dtype = QMIX_BF16, .scales = m + p->code_bytes,
                .biases = m + p->code_bytes + p->scale_bytes,
                .scale_row_bytes = (size_t)(p->cols / p->gs) * 2};
    return q;
}

static double min_time = 0.5;

/* Decode: n = 1 over whole matrices rotating through the pool, or (hot) rows [0, hot_rows) of
 * copy 0. GB/s of packed bytes. */
static double bench_decode(qk_matmul_fn fn, const pool *p, int64_t hot_rows, const float *x,
                           float *y)
{
    qk_mat m = pool_mat(p, 0);
    int64_t rows = hot_rows ? hot_rows : m.rows;
    fn(&m, 0, rows, x, 1, m.cols, y, m.rows); /* warm-up */
    long calls = 0;
    double t0 = now(), t;
    do {
        m = pool_mat(p, hot_rows ? 0 : (int)(calls + 1));
        fn(&m, 0, rows, x, 1, m.cols, y, m.rows);
        calls++;
        t = now() - t0;
    } while (t < min_time || calls < 3);
    return (double)calls * (double)p->mat_bytes * ((double)rows / m.rows) / t / 1e9;
}

/* Prefill: n tokens over a calibrated row prefix of copy 0. GFLOP/s. */
static double bench_prefill(qk_matmul_fn fn, const pool *p, int n, const float *x, float *y)
{
    qk_mat m = pool_mat(p, 0);
    int64_t rows = 8;
    double t0 = now();
    fn(&m, 0, rows, x, n, m.cols, y, m.rows);
    double t8 = now() - t0;
    int64_t want = (int64_t)(min_time / 4 / (t8 > 1e-9 ? t8 : 1e-9) * 8);
    rows = want < 8 ? 8 : want > m.rows ? m.rows : want / 8 * 8;
    fn(&m, 0, rows, x, n, m.cols, y, m.rows); /* warm-up */
    long calls = 0;
    double t;
    t0 = now();
    do {
        fn(&m, 0, rows, x, n, m.cols, y, m.rows);
        calls++;
        t = now() - t0;
    } while (t < min_time || calls < 2);
    return 2.0 * (double)rows * (double)m.cols * n * (double)calls / t / 1e9;
}

static int in_list(const char *list, int v)
{
    for (const char *p = list; *p;) {
        if (atoi(p) == v) return 1;
        const char *end = strchr(p, ',');
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmatmul [--isa scalar|avx2|avx512] [--bits LIST] [--group G] [--time S]\n"
            "               [--pool-mib M]\n\n"
            "Single-thread quantized qk_matmul throughput per ISA on an 8192x2048 matrix (MLX\n"
            "affine codes, bf16 scales/biases): decode (n=1) as GB/s of packed bytes incl. scales\n"
            "and biases (cold: rotating over --pool-mib of copies; hot: 512 cache-resident rows),\n"
            "prefill (n=64, 512) as GFLOP/s.\n\n"
            "  --isa NAME     only this ISA (default: every ISA the CPU supports)\n"
            "  --bits LIST    comma-separated of 2,3,4,5,6,8 (default 2,3,4,8)\n"
            "  --group G      32, 64 or 128 (default 64)\n"
            "  --time S       seconds per measurement (default 0.5)\n"
            "  --pool-mib M   bytes of distinct copies for cold decode (default 512)\n");
}

int main(int argc, char **argv)
{
    const char *isa_only = NULL, *bits_list = "2,3,4,8";
    long pool_mib = 512;
    int gs = 64;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--isa") && v) {
            isa_only = v;
            i++;
        } else if (!strcmp(a, "--bits") && v) {
            bits_list = v;
            i++;
        } else if (!strcmp(a, "--group") && v) {
            gs = atoi(v);
            if (gs != 32 && gs != 64 && gs != 128) {
                fprintf(stderr, "qmatmul: --group expects 32, 64 or 128\n");
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--time") && v) {
            min_time = atof(v);
            if (min_time <= 0) {
                fprintf(stderr, "qmatmul: --time expects a positive number\n");
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--pool-mib") && v) {
            pool_mib = atol(v);
            if (pool_mib < 1) {
                fprintf(stderr, "qmatmul: --pool-mib expects a positive integer\n");
                return 2;
            }
            i++;
        } else {
            fprintf(stderr, "qmatmul: bad argument '%s' (see --help)\n", a);
            return 2;
        }
    }
    static const int all_bits[] = {2, 3, 4, 5, 6, 8};
    const int64_t rows = 8192, cols = 2048;
    static const int pre_n[] = {64, 512};
    const int max_n = 512;
    float *x = malloc((size_t)max_n * cols * sizeof *x);
    float *y = malloc((size_t)max_n * rows * sizeof *y);
    if (!x || !y) return 1;
    for (size_t i = 0; i < (size_t)max_n * cols; i++) x[i] = frand();

    printf("single thread, %ldx%ld, group %d, bf16 scales; decode GB/s = packed bytes (codes + "
           "scales + biases) per second (cold: rotating over %ld MiB of copies, hot: 512 "
           "cache-resident rows); prefill GFLOP/s = 2*rows*cols*n/s\n\n",
           (long)rows, (long)cols, gs, pool_mib);
    printf("%-7s %-4s %10s %10s %10s | %10s %10s\n", "isa", "bits", "cold GB/s", "hot GB/s",
           "cold Gw/s", "n=64 GF/s", "n=512 GF/s");
    for (int isa = 0; isa < QK_ISA_COUNT; isa++) {
        if (!qk_isa_supported((qk_isa)isa)) continue;
        if (isa_only && strcmp(isa_only, qk_isa_name((qk_isa)isa))) continue;
        qk_matmul_fn fn = qk_matmul_for((qk_isa)isa);
        if (!fn) continue;
        for (size_t b = 0; b < sizeof all_bits / sizeof all_bits[0]; b++) {
            if (!in_list(bits_list, all_bits[b])) continue;
            pool p;
            if (pool_make(&p, all_bits[b], gs, rows, cols, (size_t)pool_mib << 20)) {
                fprintf(stderr, "qmatmul: out of memory\n");
                return 1;
            }
            printf("%-7s %-4d", qk_isa_name((qk_isa)isa), all_bits[b]);
            fflush(stdout);
            double cold = bench_decode(fn, &p, 0, x, y);
            double hot = bench_decode(fn, &p, 512, x, y);
            /* weights per second: the same rate in dequantized weights (cols·rows per call) */
            double gw = cold / ((double)p.mat_bytes / (double)(rows * cols));
            printf(" %10.2f %10.2f %10.2f |", cold, hot, gw);
            fflush(stdout);
            for (size_t k = 0; k < sizeof pre_n / sizeof pre_n[0]; k++) {
                printf(" %10.2f", bench_prefill(fn, &p, pre_n[k], x, y));
                fflush(stdout);
            }
            printf("\n");
            free(p.data);
        }
    }
    free(x);
    free(y);
    return 0;
}

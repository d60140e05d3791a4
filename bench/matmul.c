/* build/bench/matmul [--isa NAME] [--dtype bf16,f32,f16] [--time S] [--pool-mib M]
 *
 * Single-thread microbenchmark of qk_matmul for every ISA this CPU supports:
 *   decode  (n = 1): GB/s of weights streamed. "cold" rotates over distinct copies of the matrix
 *                    filling --pool-mib (default 512 MiB, far beyond the LLC), so every call reads
 *                    DRAM like a decoded token does; "hot" repeats one small matrix that stays in
 *                    cache, the kernel's compute ceiling for n = 1.
 *   prefill (n = 64, 512): GFLOP/s (2·rows·cols·n per call); weights are read once per 64-token
 *                    chunk, so this is compute-bound.
 * The kernel takes row ranges; prefill runs a calibrated prefix of the rows so that slow ISAs
 * (scalar) finish in about --time seconds too. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "benchutil.h"
#include "kernels/kernels_impl.h"

static void fill(void *data, qmix_dtype dt, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        float v = frand() * 0.05f;
        if (dt == QMIX_F32)
            ((float *)data)[i] = v;
        else if (dt == QMIX_BF16)
            ((uint16_t *)data)[i] = qk_f32_to_bf16(v);
        else
            ((uint16_t *)data)[i] = qk_f32_to_f16(v);
    }
}

typedef struct pool {
    qmix_dtype dt;
    int64_t rows, cols;
    int copies;
    uint8_t *data;
    size_t mat_bytes;
} pool;

static int pool_make(pool *p, qmix_dtype dt, int64_t rows, int64_t cols, size_t pool_bytes)
{
    p->dt = dt;
    p->rows = rows;
    p->cols = cols;
    p->mat_bytes = (size_t)rows * (size_t)cols * qmix_dtype_size(dt);
    p->copies = (int)(pool_bytes / p->mat_bytes);
    if (p->copies < 1) p->copies = 1;
    /* + 64 so the matrices are deliberately a few bytes off alignment, like a checkpoint's */
    p->data = malloc(p->mat_bytes * (size_t)p->copies + 64);
    if (!p->data) return -1;
    fill(p->data, dt, (p->mat_bytes * (size_t)p->copies + 64) / qmix_dtype_size(dt));
    return 0;
}

static qk_mat pool_mat(const pool *p, int i)
{
    qk_mat m = {.dtype = p->dt, .rows = p->rows, .cols = p->cols,
                .row_bytes = (size_t)p->cols * qmix_dtype_size(p->dt),
                .data = p->data + 2 * qmix_dtype_size(p->dt) + (size_t)(i % p->copies) * p->mat_bytes};
    return m;
}

static double min_time = 0.5;

/* Decode: n = 1 over whole matrices, rotating through the pool (hot: copy 0 only). GB/s. */
static double bench_decode(qk_matmul_fn fn, const pool *p, int hot, const float *x, float *y)
{
    qk_mat m = pool_mat(p, 0);
    fn(&m, 0, m.rows, x, 1, m.cols, y, m.rows); /* warm-up: page in, fill caches */
    long calls = 0;
    double t0 = now(), t;
    do {
        m = pool_mat(p, hot ? 0 : (int)(calls + 1));
        fn(&m, 0, m.rows, x, 1, m.cols, y, m.rows);
        calls++;
        t = now() - t0;
    } while (t < min_time || calls < 3);
    return (double)calls * (double)p->mat_bytes / t / 1e9;
}

/* Prefill: n tokens over a calibrated row prefix of copy 0. GFLOP/s. */
static double bench_prefill(qk_matmul_fn fn, const pool *p, int n, const float *x, float *y)
{
    qk_mat m = pool_mat(p, 0);
    int64_t rows = 8;
    double t0 = now();
    fn(&m, 0, rows, x, n, m.cols, y, m.rows);
    double t8 = now() - t0;
    /* aim for about min_time / 4 per call, whole tiles of 8 rows */
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

static int in_list(const char *list, const char *name)
{
    size_t len = strlen(name);
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == len && !strncmp(p, name, n)) return 1;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: matmul [--isa scalar|avx2|avx512] [--dtype LIST] [--time S] [--pool-mib M]\n\n"
            "Single-thread qk_matmul throughput per ISA: decode (n=1) as GB/s of weights streamed\n"
            "(cold: rotating over --pool-mib of copies; hot: one cache-resident matrix), prefill\n"
            "(n=64, 512) as GFLOP/s.\n\n"
            "  --isa NAME     only this ISA (default: every ISA the CPU supports)\n"
            "  --dtype LIST   comma-separated of bf16,f32,f16 (default bf16,f32)\n"
            "  --time S       seconds per measurement (default 0.5)\n"
            "  --pool-mib M   bytes of distinct weight copies for cold decode (default 512)\n");
}

int main(int argc, char **argv)
{
    const char *isa_only = NULL, *dtypes = "bf16,f32";
    long pool_mib = 512;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--isa") && v) {
            isa_only = v;
            i++;
        } else if (!strcmp(a, "--dtype") && v) {
            dtypes = v;
            i++;
        } else if (!strcmp(a, "--time") && v) {
            min_time = atof(v);
            if (min_time <= 0) {
                fprintf(stderr, "matmul: --time expects a positive number\n");
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--pool-mib") && v) {
            pool_mib = atol(v);
            if (pool_mib < 1) {
                fprintf(stderr, "matmul: --pool-mib expects a positive integer\n");
                return 2;
            }
            i++;
        } else {
            fprintf(stderr, "matmul: bad argument '%s' (see --help)\n", a);
            return 2;
        }
    }
    static const struct { const char *name; qmix_dtype dt; } all_dt[] = {
        {"bf16", QMIX_BF16}, {"f32", QMIX_F32}, {"f16", QMIX_F16}};
    /* decode shapes: GDN in_qkv [8192, 2048], out_proj [2048, 4096], one expert's gate [512, 2048]
     * (35B-A3B geometry); prefill: a [4096, 2048] matrix */
    static const int64_t dec_shape[][2] = {{8192, 2048}, {2048, 4096}, {512, 2048}};
    const int n_dec = 3;
    const int64_t pre_rows = 4096, pre_cols = 2048;
    static const int pre_n[] = {64, 512};
    size_t pool_bytes = (size_t)pool_mib << 20;

    int max_cols = 4096, max_n = 512;
    float *x = malloc((size_t)max_n * max_cols * sizeof *x);
    float *y = malloc((size_t)max_n * 8192 * sizeof *y);
    if (!x || !y) return 1;
    for (size_t i = 0; i < (size_t)max_n * max_cols; i++) x[i] = frand();

    printf("single thread; decode GB/s = weight bytes streamed per second (cold: rotating over %ld "
           "MiB of copies, hot: one cache-resident matrix); prefill GFLOP/s = 2*rows*cols*n/s\n\n",
           pool_mib);
    printf("%-7s %-5s %12s %12s %12s %10s | %10s %10s\n", "isa", "dtype", "8192x2048", "2048x4096",
           "512x2048", "512x2048", "4096x2048", "4096x2048");
    printf("%-7s %-5s %12s %12s %12s %10s | %10s %10s\n", "", "", "n=1 GB/s", "n=1 GB/s",
           "n=1 GB/s", "hot GB/s", "n=64 GF/s", "n=512 GF/s");
    for (int isa = 0; isa < QK_ISA_COUNT; isa++) {
        if (!qk_isa_supported((qk_isa)isa)) continue;
        if (isa_only && strcmp(isa_only, qk_isa_name((qk_isa)isa))) continue;
        qk_matmul_fn fn = qk_matmul_for((qk_isa)isa);
        if (!fn) continue;
        for (size_t d = 0; d < sizeof all_dt / sizeof all_dt[0]; d++) {
            if (!in_list(dtypes, all_dt[d].name)) continue;
            qmix_dtype dt = all_dt[d].dt;
            printf("%-7s %-5s", qk_isa_name((qk_isa)isa), all_dt[d].name);
            fflush(stdout);
            for (int s = 0; s < n_dec; s++) {
                pool p;
                if (pool_make(&p, dt, dec_shape[s][0], dec_shape[s][1], pool_bytes)) {
                    fprintf(stderr, "matmul: out of memory\n");
                    return 1;
                }
                printf(" %12.2f", bench_decode(fn, &p, 0, x, y));
                fflush(stdout);
                if (s == n_dec - 1) {
                    printf(" %10.2f", bench_decode(fn, &p, 1, x, y));
                    fflush(stdout);
                }
                free(p.data);
            }
            printf(" |");
            pool p;
            if (pool_make(&p, dt, pre_rows, pre_cols, 1)) return 1;
            for (size_t k = 0; k < sizeof pre_n / sizeof pre_n[0]; k++) {
                printf(" %10.2f", bench_prefill(fn, &p, pre_n[k], x, y));
                fflush(stdout);
            }
            free(p.data);
            printf("\n");
        }
    }
    free(x);
    free(y);
    return 0;
}

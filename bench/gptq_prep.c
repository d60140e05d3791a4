/* GPTQ's per-matrix preparation (spec/quant-formats.md §3.4) at the input widths of Qwen3.5-MoE:
 * the plain Cholesky against the blocked one on 1 and all threads, the triangular inverse, and
 * qmix_gptq_prepare as a whole. One MoE layer of 35B-A3B prepares 512 matrices of k = 2048
 * (expert gate and up) and 256 of k = 512 (expert down), so this is most of GPTQ's time at scale.
 * usage: gptq_prep [K ...] (default 512 2048) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "benchutil.h"
#include "quant/gptq.h"
#include "quant/linalg.h"
#include "runtime/threadpool.h"

static double *spd(int64_t k)
{
    /* H = X Xᵀ-like: diagonally dominant with random off-diagonal structure */
    double *h = malloc((size_t)(k * k) * sizeof *h);
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j <= i; j++) h[i * k + j] = h[j * k + i] = i == j ? (double)k : frand();
    return h;
}

static double time_chol(const double *h, int64_t k, qmix_pool *pool, int ref)
{
    double *a = malloc((size_t)(k * k) * sizeof *a);
    memcpy(a, h, (size_t)(k * k) * sizeof *a);
    double t0 = now();
    int rc = ref ? qmix_cholesky_lower_ref(a, k) : qmix_cholesky_lower(a, k, pool);
    double t = now() - t0;
    if (rc) fprintf(stderr, "not positive definite\n");
    free(a);
    return t;
}

int main(int argc, char **argv)
{
    int64_t ks[8] = {512, 2048};
    int nk = 2;
    if (argc > 1) {
        nk = 0;
        for (int i = 1; i < argc && nk < 8; i++) ks[nk++] = atoll(argv[i]);
    }
    qmix_pool *one = qmix_pool_new(1), *all = qmix_pool_new(0);
    printf("threads: %d\n", qmix_pool_threads(all));
    printf("%6s %12s %12s %12s %12s %12s %12s\n", "k", "chol ref", "chol 1T", "chol all",
           "inv ref", "inv all", "prepare");
    for (int i = 0; i < nk; i++) {
        int64_t k = ks[i];
        double *h = spd(k);
        double c_ref = time_chol(h, k, NULL, 1), c_one = time_chol(h, k, one, 0),
               c_all = time_chol(h, k, all, 0);
        double *l = malloc((size_t)(k * k) * sizeof *l), *inv = malloc((size_t)(k * k) * sizeof *inv);
        memcpy(l, h, (size_t)(k * k) * sizeof *l);
        qmix_cholesky_lower(l, k, all);
        double t0 = now();
        qmix_tri_inverse_lower_ref(l, inv, k);
        double i_ref = now() - t0;
        t0 = now();
        qmix_tri_inverse_lower(l, inv, k, all);
        double i_all = now() - t0;
        qmix_gptq_opts o = {.pool = all};
        qmix_gptq_prep p;
        qmix_err err;
        t0 = now();
        if (qmix_gptq_prepare(NULL, h, k, 64, &o, &p, &err)) fprintf(stderr, "%s\n", err.msg);
        double prep = now() - t0;
        /* one output row's column loop (4-bit, group 64), as many rows as a second holds */
        float *w = malloc((size_t)k * sizeof *w), *work = malloc((size_t)(2 * k + 128) * sizeof *work);
        float sc[4096], bi[4096];
        uint32_t *packed = malloc((size_t)k / 2 + 64);
        for (int64_t c = 0; c < k; c++) w[c] = frand();
        int rows = 0;
        t0 = now();
        while (now() - t0 < 0.5 || rows < 4) {
            qmix_gptq_quantize_row(&p, w, 4, QMIX_BF16, work, packed, sc, bi);
            rows++;
        }
        double per_row = (now() - t0) / rows;
        free(w);
        free(work);
        free(packed);
        qmix_gptq_prep_free(&p);
        printf("%6lld row (4-bit, group 64, 1 thread): %.3f ms\n", (long long)k, 1e3 * per_row);
        double gf = (double)k * k * k / 3 / 1e9; /* Cholesky flops (multiply-adds × 2 / 3) */
        printf("%6lld %9.3f s %9.3f s %9.3f s %9.3f s %9.3f s %9.3f s   (chol %.1f GFLOP/s all)\n",
               (long long)k, c_ref, c_one, c_all, i_ref, i_all, prep, gf / c_all);
        free(h);
        free(l);
        free(inv);
    }
    qmix_pool_free(one);
    qmix_pool_free(all);
    return 0;
}

/* The blocked, threaded factorisations GPTQ uses against their plain references: Cholesky and
 * triangular inverse on random SPD matrices of sizes around the block edges, non-definite input
 * detected, and qmix_gptq_prepare's factor U satisfying (H + λI)·UᵀU = I. */
#include <math.h>

#include "quant/gptq.h"
#include "quant/linalg.h"
#include "runtime/threadpool.h"
#include "testutil.h"

static const int64_t sizes[] = {1, 5, 31, 63, 64, 65, 127, 130, 257};

/* A = B Bᵀ + n·I for random B: positive definite, moderately conditioned. */
static double *random_spd(int64_t n, uint64_t seed)
{
    tu_rng_seed(seed);
    double *b = malloc((size_t)(n * n) * sizeof *b), *a = malloc((size_t)(n * n) * sizeof *a);
    for (int64_t i = 0; i < n * n; i++) b[i] = tu_frand();
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < n; j++) {
            double v = i == j ? (double)n : 0;
            for (int64_t t = 0; t < n; t++) v += b[i * n + t] * b[j * n + t];
            a[i * n + j] = v;
        }
    free(b);
    return a;
}

static double max_rel_diff_lower(const double *x, const double *y, int64_t n)
{
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j <= i; j++) scale = fmax(scale, fabs(y[i * n + j]));
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j <= i; j++) worst = fmax(worst, fabs(x[i * n + j] - y[i * n + j]));
    return worst / scale;
}

START_TEST(cholesky_matches_reference)
{
    qmix_pool *pool = qmix_pool_new(2);
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        double *a = random_spd(n, 100 + s);
        size_t bytes = (size_t)(n * n) * sizeof *a;
        double *ref = malloc(bytes), *blk = malloc(bytes), *ser = malloc(bytes);
        memcpy(ref, a, bytes);
        memcpy(blk, a, bytes);
        memcpy(ser, a, bytes);
        ck_assert_int_eq(qmix_cholesky_lower_ref(ref, n), 0);
        ck_assert_int_eq(qmix_cholesky_lower(blk, n, pool), 0);
        ck_assert_int_eq(qmix_cholesky_lower(ser, n, NULL), 0);
        ck_assert_msg(max_rel_diff_lower(blk, ref, n) < 1e-12, "n %lld: %g", (long long)n,
                      max_rel_diff_lower(blk, ref, n));
        ck_assert_msg(max_rel_diff_lower(ser, blk, n) == 0, "threads changed the result");
        /* L Lᵀ = A */
        double worst = 0;
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j <= i; j++) {
                double v = 0;
                for (int64_t t = 0; t <= j; t++) v += blk[i * n + t] * blk[j * n + t];
                worst = fmax(worst, fabs(v - a[i * n + j]) / a[i * n + i]);
            }
        ck_assert_msg(worst < 1e-12, "n %lld: L Lᵀ off by %g", (long long)n, worst);

        /* the inverse of L, both ways, and L·L⁻¹ = I */
        double *inv = malloc(bytes), *inv_ref = malloc(bytes);
        qmix_tri_inverse_lower(blk, inv, n, pool);
        qmix_tri_inverse_lower_ref(blk, inv_ref, n);
        ck_assert_msg(max_rel_diff_lower(inv, inv_ref, n) < 1e-12, "n %lld: inverse %g",
                      (long long)n, max_rel_diff_lower(inv, inv_ref, n));
        worst = 0;
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) {
                if (j > i) ck_assert(inv[i * n + j] == 0);
                double v = 0;
                for (int64_t t = 0; t < n; t++) v += blk[i * n + t] * (t >= j && t <= i ? inv[t * n + j] : 0);
                worst = fmax(worst, fabs(v - (i == j)));
            }
        ck_assert_msg(worst < 1e-12, "n %lld: L·L⁻¹ off by %g", (long long)n, worst);
        free(a);
        free(ref);
        free(blk);
        free(ser);
        free(inv);
        free(inv_ref);
    }
    qmix_pool_free(pool);
}
END_TEST

START_TEST(not_positive_definite)
{
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int64_t n = sizes[s];
        double *a = random_spd(n, 7 + s);
        a[(n - 1) * n + (n - 1)] = -1; /* the last pivot goes negative: seen only at the end */
        double *b = malloc((size_t)(n * n) * sizeof *b);
        memcpy(b, a, (size_t)(n * n) * sizeof *b);
        ck_assert_int_eq(qmix_cholesky_lower(a, n, NULL), -1);
        ck_assert_int_eq(qmix_cholesky_lower_ref(b, n), -1);
        free(a);
        free(b);
    }
}
END_TEST

/* U from the reversed factorisation: (H + λI) UᵀU = I with λ = damp·mean(diag H), U upper. */
START_TEST(gptq_factor_is_inverse)
{
    qmix_pool *pool = qmix_pool_new(2);
    const int64_t k = 192;
    double *h = random_spd(k, 42);
    qmix_gptq_opts o = {.pool = pool};
    qmix_gptq_prep p;
    qmix_err err;
    ck_assert_msg(qmix_gptq_prepare(NULL, h, k, 64, &o, &p, &err) == 0, "%s", err.msg);
    double mean = 0;
    for (int64_t i = 0; i < k; i++) mean += h[i * k + i] / (double)k;
    for (int64_t i = 0; i < k; i++) h[i * k + i] += p.damp * mean;
    double worst = 0;
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j < i; j++) ck_assert(p.u[i * k + j] == 0);
    double *m = calloc((size_t)(k * k), sizeof *m); /* UᵀU */
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j < k; j++) {
            double v = 0;
            for (int64_t t = 0; t <= (i < j ? i : j); t++) v += (double)p.u[t * k + i] * p.u[t * k + j];
            m[i * k + j] = v;
        }
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j < k; j++) {
            double v = 0;
            for (int64_t t = 0; t < k; t++) v += h[i * k + t] * m[t * k + j];
            worst = fmax(worst, fabs(v - (i == j)));
        }
    ck_assert_msg(worst < 1e-4, "(H + λI)·UᵀU off the identity by %g (U is float32)", worst);
    free(m);
    free(h);
    qmix_gptq_prep_free(&p);
    qmix_pool_free(pool);
}
END_TEST

static Suite *linalg_suite(void)
{
    Suite *s = suite_create("linalg");
    TCase *tc = tcase_create("linalg");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, cholesky_matches_reference);
    tcase_add_test(tc, not_positive_definite);
    tcase_add_test(tc, gptq_factor_is_inverse);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(linalg_suite)

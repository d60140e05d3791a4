/* Sequence-mixing kernels: the chunked delta rule (prefill) against the token-by-token recurrence
 * (decode), and attention over a cache against a double-precision reference. */
#include <math.h>

#include "kernels/kernels.h"
#include "testutil.h"

static uint64_t rng_state = 12345;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static void normalize(float *x, int n)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    for (int i = 0; i < n; i++) x[i] /= (float)sqrt(ss + 1e-6);
}

/* Runs both forms on the same random sequence; n_calls splits the chunked run into pieces to
 * check the carried state. */
static void compare(int dk, int dv, int n, int chunk, int n_calls)
{
    int64_t ld = 2 * dk + dv + 3; /* q | k | v | padding, like rows of the qkv buffer */
    float *qkv = malloc(sizeof(float) * (size_t)(n * ld));
    float *lg = malloc(sizeof(float) * (size_t)n), *beta = malloc(sizeof(float) * (size_t)n);
    for (int t = 0; t < n; t++) {
        for (int64_t i = 0; i < ld; i++) qkv[t * ld + i] = frand();
        normalize(qkv + t * ld, dk);
        normalize(qkv + t * ld + dk, dk);
        lg[t] = -fabsf(frand()) * 0.5f;
        beta[t] = 0.5f + 0.5f * frand();
    }
    float *S1 = calloc((size_t)(dk * dv), sizeof(float)), *S2 = calloc((size_t)(dk * dv), sizeof(float));
    float *o1 = malloc(sizeof(float) * (size_t)(n * dv)), *o2 = malloc(sizeof(float) * (size_t)(n * dv));
    float *scratch = malloc(sizeof(float) * (qk_delta_rule_chunked_scratch(dk, dv, chunk) + (size_t)dv));
    qk_delta_rule_recurrent(S1, dk, dv, n, qkv, qkv + dk, qkv + 2 * dk, ld, ld, lg, beta, o1, dv,
                            scratch);
    int at = 0;
    for (int c = 0; c < n_calls; c++) {
        int len = c == n_calls - 1 ? n - at : n / n_calls;
        qk_delta_rule_chunked(S2, dk, dv, len, qkv + at * ld, qkv + at * ld + dk,
                              qkv + at * ld + 2 * dk, ld, ld, lg + at, beta + at, o2 + at * dv, dv,
                              chunk, scratch);
        at += len;
    }
    double max_o = 0, max_s = 0;
    for (int64_t i = 0; i < (int64_t)n * dv; i++) max_o = fmax(max_o, fabs(o1[i] - o2[i]));
    for (int64_t i = 0; i < (int64_t)dk * dv; i++) max_s = fmax(max_s, fabs(S1[i] - S2[i]));
    ck_assert_msg(max_o < 2e-5 && max_s < 2e-5,
                  "dk %d dv %d n %d chunk %d calls %d: max |Δo| %.3g, max |ΔS| %.3g", dk, dv, n,
                  chunk, n_calls, max_o, max_s);
    free(qkv), free(lg), free(beta), free(S1), free(S2), free(o1), free(o2), free(scratch);
}

START_TEST(chunked_matches_recurrent)
{
    static const int shapes[][2] = {{32, 32}, {16, 48}, {128, 128}};
    static const int chunks[] = {1, 7, 64};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t c = 0; c < sizeof chunks / sizeof chunks[0]; c++) {
            compare(shapes[s][0], shapes[s][1], 150, chunks[c], 1);
            compare(shapes[s][0], shapes[s][1], 150, chunks[c], 3);
        }
}
END_TEST

START_TEST(strong_decay_stays_finite)
{
    /* decays near zero make γ underflow; ratios are taken in log space so nothing blows up */
    int dk = 16, dv = 16, n = 100;
    float *qkv = malloc(sizeof(float) * (size_t)(n * 48)), lg[100], beta[100];
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < 48; i++) qkv[t * 48 + i] = frand();
        normalize(qkv + t * 48, dk);
        normalize(qkv + t * 48 + dk, dk);
        lg[t] = -30.0f; /* exp(-30 · 64) underflows to 0 across a chunk */
        beta[t] = 1.0f;
    }
    float S[256] = {0}, o[1600];
    float *scratch = malloc(sizeof(float) * (qk_delta_rule_chunked_scratch(dk, dv, 64) + 16));
    qk_delta_rule_chunked(S, dk, dv, n, qkv, qkv + dk, qkv + 2 * dk, 48, 48, lg, beta, o, dv, 64,
                          scratch);
    for (int i = 0; i < n * dv; i++) ck_assert_msg(isfinite(o[i]), "o[%d] = %g", i, o[i]);
    free(qkv);
    free(scratch);
}
END_TEST

START_TEST(attend_matches_reference)
{
    static const int dims[] = {1, 15, 16, 17, 64, 256};
    static const int lens[] = {1, 2, 33, 64, 65, 300};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++)
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
            int dim = dims[di], n = lens[li];
            int64_t ld = dim + 5;
            float *kv = malloc(sizeof(float) * (size_t)(2 * n * ld)), *q = malloc(sizeof(float) * dim);
            float *scores = malloc(sizeof(float) * qk_attend_kv_scratch(1, dim));
            float *out = malloc(sizeof(float) * dim);
            double *ref = calloc((size_t)dim, sizeof(double)), *w = malloc(sizeof(double) * n);
            for (int64_t i = 0; i < 2 * n * ld; i++) kv[i] = frand() * 3;
            for (int i = 0; i < dim; i++) q[i] = frand() * 3;
            float *keys = kv, *values = kv + n * ld, scale = 0.37f;
            double mx = -1e300, sum = 0;
            for (int j = 0; j < n; j++) {
                double dot = 0;
                for (int i = 0; i < dim; i++) dot += (double)q[i] * keys[j * ld + i];
                w[j] = dot * scale;
                mx = fmax(mx, w[j]);
            }
            for (int j = 0; j < n; j++) sum += w[j] = exp(w[j] - mx);
            for (int j = 0; j < n; j++)
                for (int i = 0; i < dim; i++) ref[i] += w[j] / sum * values[j * ld + i];
            /* the float32 cache: the online softmax over tiles of the full score row */
            const float *qs[1] = {q};
            float *outs[1] = {out};
            int64_t ns[1] = {n};
            qk_attend_kv(QMIX_KV_F32, 1, qs, outs, ns, keys, values, (size_t)ld * sizeof(float),
                         dim, scale, scores);
            for (int i = 0; i < dim; i++)
                ck_assert_msg(fabs(out[i] - ref[i]) < 1e-5 * (1 + fabs(ref[i])),
                              "dim %d n %d: out[%d] = %.7g, reference %.7g", dim, n, i, out[i], ref[i]);
            free(kv), free(q), free(scores), free(out), free(ref), free(w);
        }
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("sequence_ops");
    TCase *tc = tcase_create("forms");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, chunked_matches_recurrent);
    tcase_add_test(tc, strong_decay_stays_finite);
    tcase_add_test(tc, attend_matches_reference);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)

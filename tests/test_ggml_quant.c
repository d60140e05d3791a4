/* ggml block quantizers (src/quant/ggml_quant.c) against the independent dequantizers of
 * ggml_blocks.c: error bounds on Gaussian rows and their ordering by bit width, exact round
 * trips of rows already on a type's grid (which exercises every packed field), zero rows,
 * outliers, and importance weighting. */
#include <math.h>

#include "kernels/kernels.h"
#include "quant/ggml_blocks.h"
#include "testutil.h"

static float gauss(void)
{
    float u1 = (tu_frand() + 1.0f) * 0.5f, u2 = (tu_frand() + 1.0f) * 0.5f;
    if (u1 < 1e-7f) u1 = 1e-7f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

static int rnd(int lo, int hi) { return lo + (int)(tu_rng_u64() % (uint64_t)(hi - lo + 1)); }

enum { COLS = 1024, ROWS = 48 };

/* Relative RMSE of quantize → dequantize over ROWS Gaussian rows (with importance imp, or
 * NULL); *werr gets the importance-weighted squared error Σ c·(x − y)² when imp is given. */
static double rel_rmse(int type, const float *imp, double *werr, uint64_t seed)
{
    tu_rng_seed(seed);
    float *x = malloc(COLS * sizeof *x), *y = malloc(COLS * sizeof *y);
    uint8_t *q = malloc(qmix_ggml_row_bytes(type, COLS));
    double se = 0, sx = 0, we = 0;
    for (int r = 0; r < ROWS; r++) {
        for (int j = 0; j < COLS; j++) x[j] = gauss();
        ck_assert_int_eq(qmix_ggml_quantize_row(type, x, COLS, imp, q), 0);
        qmix_ggml_dequant_row(type, q, COLS, y);
        for (int j = 0; j < COLS; j++) {
            double d = (double)x[j] - y[j];
            ck_assert(isfinite(y[j]));
            se += d * d;
            sx += (double)x[j] * x[j];
            if (imp) we += imp[j] * d * d;
        }
    }
    free(x);
    free(y);
    free(q);
    if (werr) *werr = we;
    return sqrt(se / sx);
}

static const int TYPES[] = {QMIX_GGML_Q8_0, QMIX_GGML_Q4_0, QMIX_GGML_Q4_1, QMIX_GGML_Q5_0,
                            QMIX_GGML_Q5_1, QMIX_GGML_Q2_K, QMIX_GGML_Q3_K, QMIX_GGML_Q4_K,
                            QMIX_GGML_Q5_K, QMIX_GGML_Q6_K, QMIX_GGML_IQ4_NL, QMIX_GGML_IQ4_XS};
#define N_TYPES (int)(sizeof TYPES / sizeof TYPES[0])

/* Bounds: the measured relative RMSE on N(0, 1) rows (printed by the test; seed 7, 48 × 1024) plus
 * ~20 % headroom. Measured: Q8_0 0.0054, Q6_K 0.0178, Q5_1 0.0341, Q5_K 0.0361, Q5_0 0.0414,
 * Q4_1 0.0704, Q4_K 0.0714, Q4_0 0.0845, Q3_K 0.154, Q2_K 0.288, IQ4_NL 0.0762, IQ4_XS 0.0766. Sanity check: a uniform
 * quantizer's error is step/sqrt(12); with the step set by a 32-element block's range (≈ ±2σ
 * → 4σ/15 for 4 bits) that is 7.7 %, matching the 4-bit types; each bit halves it. */
START_TEST(error_bounds_and_order)
{
    static const struct { int type; double bound; } B[] = {
        {QMIX_GGML_Q8_0, 0.0065}, {QMIX_GGML_Q6_K, 0.0215}, {QMIX_GGML_Q5_K, 0.0435},
        {QMIX_GGML_Q5_1, 0.041},  {QMIX_GGML_Q5_0, 0.050},  {QMIX_GGML_Q4_K, 0.086},
        {QMIX_GGML_Q4_1, 0.085},  {QMIX_GGML_Q4_0, 0.102},  {QMIX_GGML_Q3_K, 0.185},
        {QMIX_GGML_Q2_K, 0.345},  {QMIX_GGML_IQ4_NL, 0.092}, {QMIX_GGML_IQ4_XS, 0.092},
    };
    double e[64] = {0};
    for (size_t i = 0; i < sizeof B / sizeof B[0]; i++) {
        e[B[i].type] = rel_rmse(B[i].type, NULL, NULL, 7);
        fprintf(stderr, "ggml_quant: %-5s relative RMSE %.4f (bound %.4f)\n",
                qmix_ggml_type_name(B[i].type), e[B[i].type], B[i].bound);
        ck_assert_msg(e[B[i].type] < B[i].bound, "%s: %.4f", qmix_ggml_type_name(B[i].type),
                      e[B[i].type]);
    }
    ck_assert(e[QMIX_GGML_Q8_0] < e[QMIX_GGML_Q6_K]);
    ck_assert(e[QMIX_GGML_Q6_K] < e[QMIX_GGML_Q5_K]);
    ck_assert(e[QMIX_GGML_Q5_K] < e[QMIX_GGML_Q4_K]);
    ck_assert(e[QMIX_GGML_Q4_K] < e[QMIX_GGML_Q3_K]);
    ck_assert(e[QMIX_GGML_Q3_K] < e[QMIX_GGML_Q2_K]);
    ck_assert(e[QMIX_GGML_Q5_0] < e[QMIX_GGML_Q4_0]);
    ck_assert(e[QMIX_GGML_Q5_1] < e[QMIX_GGML_Q4_1]);
    /* the K-quants' searched sub-block scales beat the one-scale-per-32 types of equal bits */
    ck_assert(e[QMIX_GGML_Q4_K] < e[QMIX_GGML_Q4_0]);
    /* the non-linear grid fits Gaussian weights better than the uniform one at equal or fewer
     * bits (IQ4_NL 4.5, IQ4_XS 4.25 vs Q4_0 4.5 bits per weight) */
    ck_assert(e[QMIX_GGML_IQ4_NL] < e[QMIX_GGML_Q4_0]);
    ck_assert(e[QMIX_GGML_IQ4_XS] < e[QMIX_GGML_Q4_0]);
}
END_TEST

static void put16(uint8_t *p, float v)
{
    uint16_t h = qk_f32_to_f16(v);
    ck_assert_float_eq(qk_f16_to_f32(h), v); /* the grid's scales are exact fp16 values */
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* codes[n] random in [lo, hi] with `must` present, and `also` too unless it is below lo */
static void codes(int *c, int n, int lo, int hi, int must, int also)
{
    for (int j = 0; j < n; j++) c[j] = rnd(lo, hi);
    int k1 = rnd(0, n - 1);
    c[k1] = must;
    if (also >= lo) c[(k1 + rnd(1, n - 1)) % n] = also;
}

/* One block of `type` whose values lie on the grid the quantizer searches: scales exact in fp16,
 * the scale of largest magnitude at the end of its range, every sub-block using both ends of its
 * code range (asymmetric types) or the most negative code as its largest magnitude (signed). */
static void grid_block(int type, uint8_t *b)
{
    int c[256];
    memset(b, 0, qmix_ggml_block_bytes(type));
    switch (type) {
    case QMIX_GGML_Q4_0:
    case QMIX_GGML_Q5_0: {
        int half = type == QMIX_GGML_Q4_0 ? 8 : 16;
        put16(b, 1.0f / 64);
        codes(c, 32, 1, 2 * half - 1, 0, -1); /* stored code 0 = -half, the largest magnitude */
        uint8_t *qs = b + (half == 8 ? 2 : 6);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            qs[j] = (uint8_t)((c[j] & 15) | (c[j + 16] & 15) << 4);
            qh |= (uint32_t)(c[j] >> 4 & 1) << j | (uint32_t)(c[j + 16] >> 4 & 1) << (j + 16);
        }
        if (half == 16) memcpy(b + 2, &qh, 4);
        break;
    }
    case QMIX_GGML_Q4_1:
    case QMIX_GGML_Q5_1: {
        int nmax = type == QMIX_GGML_Q4_1 ? 15 : 31;
        put16(b, 1.0f / 32);
        put16(b + 2, -0.375f);
        codes(c, 32, 0, nmax, 0, nmax);
        uint8_t *qs = b + (nmax == 15 ? 4 : 8);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            qs[j] = (uint8_t)((c[j] & 15) | (c[j + 16] & 15) << 4);
            qh |= (uint32_t)(c[j] >> 4 & 1) << j | (uint32_t)(c[j + 16] >> 4 & 1) << (j + 16);
        }
        if (nmax == 31) memcpy(b + 4, &qh, 4);
        break;
    }
    case QMIX_GGML_Q4_K:
    case QMIX_GGML_Q5_K: {
        int nmax = type == QMIX_GGML_Q4_K ? 15 : 31, sc[8], mn[8];
        put16(b, 1.0f / 1024);
        put16(b + 2, 1.0f / 2048);
        for (int s = 0; s < 8; s++) {
            sc[s] = s ? rnd(1, 63) : 63;
            mn[s] = s ? rnd(0, 63) : 63;
        }
        for (int s = 0; s < 4; s++) {
            b[4 + s] = (uint8_t)(sc[s] | (sc[s + 4] >> 4) << 6);
            b[8 + s] = (uint8_t)(mn[s] | (mn[s + 4] >> 4) << 6);
            b[12 + s] = (uint8_t)((sc[s + 4] & 15) | (mn[s + 4] & 15) << 4);
        }
        uint8_t *qs = b + (nmax == 15 ? 16 : 48);
        for (int s = 0; s < 8; s++) {
            codes(c, 32, 0, nmax, 0, nmax);
            for (int l = 0; l < 32; l++) {
                qs[32 * (s / 2) + l] |= (uint8_t)((c[l] & 15) << (s % 2 ? 4 : 0));
                if (nmax == 31) b[16 + l] |= (uint8_t)((c[l] >> 4 & 1) << s);
            }
        }
        break;
    }
    case QMIX_GGML_Q6_K: {
        put16(b + 208, 1.0f / 4096);
        for (int s = 0; s < 16; s++) {
            int sc = s ? rnd(1, 127) * (rnd(0, 1) ? 1 : -1) : -128;
            b[192 + s] = (uint8_t)(int8_t)sc;
            codes(c + 16 * s, 16, 1, 63, 0, -1); /* stored 0 = -32 */
        }
        for (int j = 0; j < 256; j++) {
            int h = j / 128, t = (j % 128) / 32, l = j % 32;
            b[64 * h + 32 * (t & 1) + l] |= (uint8_t)((c[j] & 15) << (t < 2 ? 0 : 4));
            b[128 + 32 * h + l] |= (uint8_t)((c[j] >> 4) << (2 * t));
        }
        break;
    }
    case QMIX_GGML_Q3_K: {
        put16(b + 108, 1.0f / 256);
        for (int s = 0; s < 16; s++) {
            int v = (s ? rnd(1, 31) * (rnd(0, 1) ? 1 : -1) : -32) + 32;
            if (s < 8) b[96 + s] |= (uint8_t)(v & 15);
            else b[96 + s - 8] |= (uint8_t)((v & 15) << 4);
            b[104 + s % 4] |= (uint8_t)((v >> 4) << (2 * (s / 4)));
            codes(c + 16 * s, 16, 1, 7, 0, -1); /* stored 0 = -4 */
        }
        for (int j = 0; j < 256; j++) {
            int h = j / 128, t = (j % 128) / 32, l = j % 32;
            b[32 + 32 * h + l] |= (uint8_t)((c[j] & 3) << (2 * t));
            b[j % 32] |= (uint8_t)((c[j] >> 2) << (j / 32));
        }
        break;
    }
    case QMIX_GGML_Q2_K: {
        put16(b + 80, 1.0f / 256);
        put16(b + 82, 1.0f / 512);
        for (int s = 0; s < 16; s++) {
            int sc = s ? rnd(1, 15) : 15, mn = s ? rnd(0, 15) : 15;
            b[s] = (uint8_t)(sc | mn << 4);
            codes(c + 16 * s, 16, 0, 3, 0, 3);
        }
        for (int j = 0; j < 256; j++) {
            int h = j / 128, t = (j % 128) / 32, l = j % 32;
            b[16 + 32 * h + l] |= (uint8_t)(c[j] << (2 * t));
        }
        break;
    }
    case QMIX_GGML_Q8_0: {
        put16(b, 1.0f / 128);
        codes(c, 32, -126, 126, 127, -1);
        for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)c[j];
        break;
    }
    /* the non-linear types: index 0 (the table's −127, its largest magnitude) in every block of
     * 32 anchors that block's scale */
    case QMIX_GGML_IQ4_NL: {
        put16(b, 1.0f / 256);
        codes(c, 32, 0, 15, 0, -1);
        for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(c[j] | c[j + 16] << 4);
        break;
    }
    case QMIX_GGML_IQ4_XS: {
        put16(b, 1.0f / 4096);
        int ls[8];
        for (int s8 = 0; s8 < 8; s8++) { /* signed sub-block scales in [−31, 31] \ {0}, one −32 */
            do ls[s8] = rnd(-31, 31);
            while (ls[s8] == 0);
        }
        ls[rnd(0, 7)] = -32;
        unsigned h = 0;
        for (int s8 = 0; s8 < 8; s8++) {
            int code = ls[s8] + 32;
            b[4 + s8 / 2] = (uint8_t)(b[4 + s8 / 2] | (code & 15) << (4 * (s8 % 2)));
            h |= (unsigned)(code >> 4) << (2 * s8);
            codes(c, 32, 0, 15, 0, -1);
            for (int j = 0; j < 16; j++) b[8 + 16 * s8 + j] = (uint8_t)(c[j] | c[j + 16] << 4);
        }
        b[2] = (uint8_t)h;
        b[3] = (uint8_t)(h >> 8);
        break;
    }
    }
}

START_TEST(on_grid_round_trip)
{
    tu_rng_seed(11);
    for (int t = 0; t < N_TYPES; t++) {
        int type = TYPES[t], be = qmix_ggml_block_elems(type);
        size_t bb = qmix_ggml_block_bytes(type);
        int64_t cols = 4 * 256;
        uint8_t *src = calloc((size_t)(cols / be), bb), *q = malloc((size_t)(cols / be) * bb);
        float *x = malloc((size_t)cols * 4), *y = malloc((size_t)cols * 4);
        for (int64_t k = 0; k < cols / be; k++) grid_block(type, src + k * bb);
        qmix_ggml_dequant_row(type, src, cols, x);
        for (int with_imp = 0; with_imp < 2; with_imp++) {
            float *imp = NULL;
            if (with_imp) {
                imp = malloc((size_t)cols * 4);
                for (int64_t j = 0; j < cols; j++) imp[j] = 0.5f + (tu_frand() + 1.0f);
            }
            ck_assert_int_eq(qmix_ggml_quantize_row(type, x, cols, imp, q), 0);
            qmix_ggml_dequant_row(type, q, cols, y);
            for (int64_t j = 0; j < cols; j++)
                ck_assert_msg(x[j] == y[j], "%s (importance %d): element %lld: %g -> %g",
                              qmix_ggml_type_name(type), with_imp, (long long)j, x[j], y[j]);
            free(imp);
        }
        free(src);
        free(q);
        free(x);
        free(y);
    }
}
END_TEST

START_TEST(zero_rows)
{
    float x[512] = {0}, y[512], imp[512];
    for (int j = 0; j < 512; j++) imp[j] = (float)(j % 3);
    uint8_t q[1024];
    for (int t = 0; t < N_TYPES; t++)
        for (int with_imp = 0; with_imp < 2; with_imp++) {
            ck_assert_int_eq(qmix_ggml_quantize_row(TYPES[t], x, 512, with_imp ? imp : NULL, q), 0);
            qmix_ggml_dequant_row(TYPES[t], q, 512, y);
            for (int j = 0; j < 512; j++)
                ck_assert_msg(y[j] == 0, "%s: %g", qmix_ggml_type_name(TYPES[t]), y[j]);
        }
}
END_TEST

/* One element 1000σ: it must come back close (it sets its block's scale, so 2 % — far more than
 * the measured ≤ 0.0003 — catches a scale search that clips it), nothing may turn non-finite, and
 * the other elements may lose their resolution (a sub-block scale rounding to 0 against the
 * outlier's super-scale; the non-linear IQ4 grid has no zero, so its smallest step, 1/127 of
 * the outlier, lands on every small neighbour: ~1.9σ) but must not be pushed further than a few
 * σ: their RMS error below 3σ
 * (measured ≤ 1.5σ for Q2_K, Q4_K, Q5_K; ≤ 0.73σ for Q3_K, Q6_K; ≤ 0.27σ for 32-element types). */
START_TEST(outlier)
{
    tu_rng_seed(3);
    float x[512], y[512];
    uint8_t q[1024];
    for (int t = 0; t < N_TYPES; t++) {
        for (int j = 0; j < 512; j++) x[j] = gauss();
        x[300] = 1000.0f;
        ck_assert_int_eq(qmix_ggml_quantize_row(TYPES[t], x, 512, NULL, q), 0);
        qmix_ggml_dequant_row(TYPES[t], q, 512, y);
        double se = 0;
        for (int j = 0; j < 512; j++) {
            ck_assert(isfinite(y[j]));
            if (j != 300) se += ((double)x[j] - y[j]) * ((double)x[j] - y[j]);
        }
        double rel = fabs(y[300] - 1000.0) / 1000.0, others = sqrt(se / 511);
        fprintf(stderr, "ggml_quant: %-5s outlier relative error %.4f, others RMS error %.3f\n",
                qmix_ggml_type_name(TYPES[t]), rel, others);
        ck_assert_msg(rel < 0.02, "%s: outlier %g", qmix_ggml_type_name(TYPES[t]), y[300]);
        ck_assert_msg(others < 3.0, "%s: others %g", qmix_ggml_type_name(TYPES[t]), others);
    }
}
END_TEST

/* Importance spread over four decades: quantizing with it must lower the importance-weighted
 * error (the quantity the imatrix asks to minimise) against quantizing without it. Measured
 * ratios with/without: 0.46 (Q2_K) … 0.74 (Q5_0); the bound asks for a clear ≥ 15 % gain. */
START_TEST(importance_lowers_weighted_error)
{
    float *imp = malloc(COLS * sizeof *imp);
    tu_rng_seed(5);
    for (int j = 0; j < COLS; j++) imp[j] = powf(10.0f, 2.0f * tu_frand());
    for (int t = 0; t < N_TYPES; t++) {
        if (TYPES[t] == QMIX_GGML_Q8_0) continue; /* bit-exact reference: importance unused */
        double w_with, w_without;
        rel_rmse(TYPES[t], imp, &w_with, 9);
        /* unweighted quantization, scored with the same weights */
        tu_rng_seed(9);
        float x[COLS], y[COLS];
        uint8_t *q = malloc(qmix_ggml_row_bytes(TYPES[t], COLS));
        w_without = 0;
        for (int r = 0; r < ROWS; r++) {
            for (int j = 0; j < COLS; j++) x[j] = gauss();
            qmix_ggml_quantize_row(TYPES[t], x, COLS, NULL, q);
            qmix_ggml_dequant_row(TYPES[t], q, COLS, y);
            for (int j = 0; j < COLS; j++) w_without += imp[j] * ((double)x[j] - y[j]) * (x[j] - y[j]);
        }
        free(q);
        fprintf(stderr, "ggml_quant: %-5s weighted error with/without importance %.3f\n",
                qmix_ggml_type_name(TYPES[t]), w_with / w_without);
        ck_assert_msg(w_with < 0.85 * w_without, "%s: %g vs %g", qmix_ggml_type_name(TYPES[t]),
                      w_with, w_without);
    }
    free(imp);
}
END_TEST

START_TEST(bad_shapes_refused)
{
    float x[64] = {0};
    uint8_t q[512];
    ck_assert_int_eq(qmix_ggml_quantize_row(QMIX_GGML_Q4_K, x, 64, NULL, q), -1);
    ck_assert_int_eq(qmix_ggml_quantize_row(QMIX_GGML_Q4_0, x, 48, NULL, q), -1);
    ck_assert_int_eq(qmix_ggml_quantize_row(QMIX_GGML_IQ4_XS, x, 64, NULL, q), -1);
    ck_assert_int_eq(qmix_ggml_quantize_row(999, x, 64, NULL, q), -1);
    ck_assert(qmix_ggml_can_quantize(QMIX_GGML_IQ4_NL));
    ck_assert(!qmix_ggml_can_quantize(21)); /* IQ3_S: read only */
    ck_assert(qmix_ggml_can_quantize(QMIX_GGML_Q3_K));
}
END_TEST

static Suite *ggml_quant_suite(void)
{
    Suite *s = suite_create("ggml_quant");
    TCase *tc = tcase_create("ggml_quant");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, error_bounds_and_order);
    tcase_add_test(tc, on_grid_round_trip);
    tcase_add_test(tc, zero_rows);
    tcase_add_test(tc, outlier);
    tcase_add_test(tc, importance_lowers_weighted_error);
    tcase_add_test(tc, bad_shapes_refused);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(ggml_quant_suite)

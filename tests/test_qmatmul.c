/* Quantized matmul (dtype QMIX_U32, MLX affine codes): the scalar reference against
 * dequantize_row + a float64 dot; every SIMD path against the scalar reference for every
 * bits × group pair and scale dtype, odd row counts, token counts around the tile and chunk
 * sizes, row ranges not starting at 0 with sentinels around the outputs, padded ldx/ldy, weights
 * ending exactly at the end of their allocation; row- and token-split invariance (bitwise). */
#include <math.h>

#include "kernels/kernels_impl.h"
#include "quant/affine.h"
#include "testutil.h"

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))


static const uint32_t SENTINEL = 0x7fa1b2c3u; /* a NaN no kernel produces */
static const int BITS[] = {2, 3, 4, 5, 6, 8};
static const int GROUPS[] = {32, 64, 128};
static const int NS[] = {1, 2, 3, 4, 5, 17, 64, 65};
static const qmix_dtype SDT[] = {QMIX_BF16, QMIX_F16, QMIX_F32};

/* A random quantized matrix: codes at an odd address with the last row ending exactly at the end
 * of its allocation (ASan catches any read past it), scales/biases of sdt at an unaligned
 * address with padded rows; deq[rows][cols] its dequantized values (qmix_affine_dequantize_row),
 * mag[rows][cols] = |s·q| + |β| for error bounds. */
typedef struct qmat {
    qk_mat m;
    uint8_t *cblock, *sblock, *bblock;
    float *deq, *mag;
} qmat;

static void put_scale(uint8_t *p, qmix_dtype dt, float v)
{
    if (dt == QMIX_F32) {
        memcpy(p, &v, 4);
    } else {
        uint16_t h = dt == QMIX_BF16 ? qk_f32_to_bf16(v) : qk_f32_to_f16(v);
        memcpy(p, &h, 2);
    }
}

static void qmat_make(qmat *t, int bits, int gs, qmix_dtype sdt, int64_t rows, int64_t cols,
                      int pad_bytes)
{
    size_t code_bytes = (size_t)cols * bits / 8, row_bytes = code_bytes + (size_t)pad_bytes;
    size_t csize = 1 + (size_t)rows * row_bytes - (size_t)pad_bytes;
    t->cblock = malloc(csize);
    ck_assert_ptr_nonnull(t->cblock);
    memset(t->cblock, 0xff, csize);
    uint8_t *data = t->cblock + 1;
    for (int64_t r = 0; r < rows; r++)
        for (size_t i = 0; i < code_bytes; i++)
            data[(size_t)r * row_bytes + i] = (uint8_t)tu_rng_u64();
    int64_t ng = cols / gs;
    size_t esz = sdt == QMIX_F32 ? 4 : 2, srb = (size_t)(ng + 1) * esz;
    size_t ssize = 2 + (size_t)rows * srb;
    t->sblock = malloc(ssize);
    t->bblock = malloc(ssize);
    ck_assert(t->sblock && t->bblock);
    memset(t->sblock, 0xff, ssize);
    memset(t->bblock, 0xff, ssize);
    float nb = (float)((1 << bits) - 1);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < ng; g++) {
            float s = (0.002f + 0.05f * fabsf(tu_frand())) * (tu_frand() < 0 ? -1.0f : 1.0f);
            /* mostly a zero point inside the range (mixed-sign groups), sometimes anything */
            float b = g % 5 == 4 ? tu_frand() : -s * nearbyintf(nb * 0.5f * (1.0f + tu_frand()));
            put_scale(t->sblock + 2 + (size_t)r * srb + (size_t)g * esz, sdt, s);
            put_scale(t->bblock + 2 + (size_t)r * srb + (size_t)g * esz, sdt, b);
        }
    t->m = (qk_mat){.dtype = QMIX_U32, .rows = rows, .cols = cols, .row_bytes = row_bytes,
                    .data = data, .bits = bits, .group_size = gs, .scale_dtype = sdt,
                    .scales = t->sblock + 2, .biases = t->bblock + 2, .scale_row_bytes = srb};
    t->deq = malloc(sizeof(float) * (size_t)(rows * cols));
    t->mag = malloc(sizeof(float) * (size_t)(rows * cols));
    ck_assert(t->deq && t->mag);
    uint32_t *words = malloc(code_bytes);
    ck_assert_ptr_nonnull(words);
    for (int64_t r = 0; r < rows; r++) {
        memcpy(words, data + (size_t)r * row_bytes, code_bytes);
        const uint8_t *sr = t->sblock + 2 + (size_t)r * srb, *br = t->bblock + 2 + (size_t)r * srb;
        qmix_affine_dequantize_row(words, sr, br, sdt, cols, bits, gs, t->deq + r * cols);
        for (int64_t k = 0; k < cols; k++) {
            float s = qk_qmat_scale(sr + (size_t)(k / gs) * esz, sdt);
            float b = qk_qmat_scale(br + (size_t)(k / gs) * esz, sdt);
            float q = (float)qmix_affine_get_code(words, k, bits);
            t->mag[r * cols + k] = fabsf(s * q) + fabsf(b);
        }
    }
    free(words);
}

static void qmat_free(qmat *t)
{
    free(t->cblock);
    free(t->sblock);
    free(t->bblock);
    free(t->deq);
    free(t->mag);
}

static float *new_y(int n, int64_t ldy)
{
    float *y = malloc(sizeof(float) * (size_t)(n * ldy));
    ck_assert_ptr_nonnull(y);
    for (int64_t i = 0; i < n * ldy; i++) y[i] = tu_u2f(SENTINEL);
    return y;
}

/* Outputs outside [rb, re) × [0, n) and the ldy padding still hold the sentinel. */
static void check_sentinels(const float *y, int n, int64_t ldy, int64_t rb, int64_t re,
                            const char *what)
{
    for (int t = 0; t < n; t++)
        for (int64_t o = 0; o < ldy; o++) {
            int inside = o >= rb && o < re;
            uint32_t u = tu_f2u(y[t * ldy + o]);
            CHECK(inside ? u != SENTINEL : u == SENTINEL, "%s: output t %d o %ld %s", what, t,
                  (long)o, inside ? "not written" : "overwritten");
        }
}

static int cases_run;

/* One shape: the matrix has rows_total = rows + 3 rows and the kernels compute the last rows
 * [3, rows_total) (so the range starts past 0 and ends at the end of the codes' allocation). */
static void run_case(int bits, int gs, qmix_dtype sdt, int64_t rows, int64_t cols, int n,
                     int pad_bytes)
{
    const int64_t rows_total = rows + 3, rb = 3, re = rows_total;
    const int64_t ldx = cols + 5, ldy = rows_total + 2;
    qmat w;
    qmat_make(&w, bits, gs, sdt, rows_total, cols, pad_bytes);
    float *x = malloc(sizeof(float) * (size_t)(n * ldx));
    ck_assert_ptr_nonnull(x);
    for (int t = 0; t < n; t++)
        for (int64_t k = 0; k < ldx; k++) x[t * ldx + k] = k < cols ? tu_frand() : NAN;

    char what[160];
    snprintf(what, sizeof what, "bits %d g %d sdt %s rows %ld cols %ld n %d pad %d", bits, gs,
             qmix_dtype_name(sdt), (long)rows, (long)cols, n, pad_bytes);

    /* the scalar reference against dequantize_row + float64 */
    float *ys = new_y(n, ldy);
    qk_qmatmul_scalar(&w.m, rb, re, x, n, ldx, ys, ldy);
    check_sentinels(ys, n, ldy, rb, re, what);
    double *bound = malloc(sizeof(double) * (size_t)(n * rows_total));
    ck_assert_ptr_nonnull(bound);
    for (int t = 0; t < n; t++)
        for (int64_t o = rb; o < re; o++) {
            double exact = 0, mag = 0;
            for (int64_t k = 0; k < cols; k++) {
                exact += (double)w.deq[o * cols + k] * x[t * ldx + k];
                mag += (double)w.mag[o * cols + k] * fabs(x[t * ldx + k]);
            }
            bound[t * rows_total + o] = 1e-5 * mag + 1e-30;
            double err = fabs(ys[t * ldy + o] - exact);
            CHECK(err <= bound[t * rows_total + o], "%s: scalar t %d o %ld: %.9g vs exact %.9g",
                  what, t, (long)o, ys[t * ldy + o], exact);
        }

    for (int isa = 0; isa < QK_ISA_COUNT; isa++) {
        if (!qk_isa_supported((qk_isa)isa)) continue;
        qk_matmul_fn fn = qk_matmul_for((qk_isa)isa);
        if (!fn) continue;
        /* through the dense entry point, which must hand U32 to the quantized path */
        float *y = new_y(n, ldy);
        fn(&w.m, rb, re, x, n, ldx, y, ldy);
        check_sentinels(y, n, ldy, rb, re, what);
        for (int t = 0; t < n; t++)
            for (int64_t o = rb; o < re; o++) {
                double err = fabs((double)y[t * ldy + o] - ys[t * ldy + o]);
                CHECK(err <= 2 * bound[t * rows_total + o],
                      "%s: %s t %d o %ld: %.9g vs scalar %.9g", what,
                      qk_isa_name((qk_isa)isa), t, (long)o, y[t * ldy + o], ys[t * ldy + o]);
            }
        /* invariance: rows split in three ranges, tokens in calls of 1, 3 and the rest */
        float *yp = new_y(n, ldy);
        int64_t m1 = rb + 1 < re ? rb + 1 : re;
        int64_t m2 = m1 + (re - m1) / 2;
        int64_t cuts[4] = {rb, m1, m2, re};
        for (int p = 0; p < 3; p++) {
            int t = 0;
            static const int parts[] = {1, 3, 1 << 30};
            for (int q = 0; q < 3 && t < n; q++) {
                int len = n - t < parts[q] ? n - t : parts[q];
                if (cuts[p + 1] > cuts[p])
                    fn(&w.m, cuts[p], cuts[p + 1], x + (int64_t)t * ldx, len, ldx,
                       yp + (int64_t)t * ldy, ldy);
                t += len;
            }
        }
        for (int t = 0; t < n; t++)
            for (int64_t o = rb; o < re; o++)
                CHECK(tu_f2u(yp[t * ldy + o]) == tu_f2u(y[t * ldy + o]),
                      "%s: %s split t %d o %ld: %.9g vs whole %.9g", what, qk_isa_name((qk_isa)isa),
                      t, (long)o, yp[t * ldy + o], y[t * ldy + o]);
        free(yp);
        free(y);
    }
    free(bound);
    free(ys);
    free(x);
    qmat_free(&w);
    cases_run++;
}

/* Every bits × group (loop index), every n of NS twice, every row count 1..13, cols of 1..4
 * groups, each scale dtype and both row strides (packed, padded) in rotation. */
START_TEST(qmatmul_all)
{
    int bits = BITS[_i / 3], gs = GROUPS[_i % 3];
    tu_rng_state = 1000 + (uint64_t)_i;
    cases_run = 0;
    int j = 0; /* 16 cases: j·5 mod 13 takes every row count 1..13 */
    for (size_t ni = 0; ni < COUNT(NS); ni++)
        for (int rep = 0; rep < 2; rep++, j++) {
            int64_t rows = 1 + (j * 5 + _i) % 13;
            int64_t cols = gs * (1 + (j + _i) % 4);
            qmix_dtype sdt = SDT[(j + _i) % 3];
            run_case(bits, gs, sdt, rows, cols, NS[ni], ((j / 3) % 2) * 4);
        }
    ck_assert_int_eq(cases_run, 2 * (int)COUNT(NS));
}
END_TEST

/* A decode-sized shape: many rows (the 8-row decode tile and its prefetch of the next block),
 * 2048 columns (many whole groups between the padded tail ones). */
START_TEST(qmatmul_wide)
{
    tu_rng_state = 77;
    for (size_t b = 0; b < COUNT(BITS); b++) run_case(BITS[b], 64, QMIX_BF16, 29, 2048, 1, 0);
    run_case(4, 128, QMIX_F16, 21, 2048, 6, 0);
    run_case(3, 32, QMIX_F32, 21, 1024, 9, 0);
}
END_TEST

/* qk_matmul (the run-time dispatch) takes the active ISA's quantized path, bit for bit. */
START_TEST(qmatmul_dispatch)
{
    tu_rng_state = 3;
    qmat w;
    qmat_make(&w, 4, 64, QMIX_BF16, 11, 256, 0);
    float x[3 * 256], y1[3 * 11], y2[3 * 11];
    for (int i = 0; i < 3 * 256; i++) x[i] = tu_frand();
    qk_matmul(&w.m, 0, 11, x, 3, 256, y1, 11);
    qk_matmul_for(qk_isa_active())(&w.m, 0, 11, x, 3, 256, y2, 11);
    ck_assert_int_eq(memcmp(y1, y2, sizeof y1), 0);
    qmat_free(&w);
}
END_TEST

/* Unsupported parameters (bits 7, group 16, a U8 scale dtype) give NaN rather than garbage. */
START_TEST(qmatmul_invalid)
{
    tu_rng_state = 4;
    qmat w;
    qmat_make(&w, 4, 32, QMIX_BF16, 4, 64, 0);
    float x[64], y[4];
    for (int i = 0; i < 64; i++) x[i] = tu_frand();
    for (int v = 0; v < 3; v++) {
        qk_mat m = w.m;
        if (v == 0) m.bits = 7;
        if (v == 1) m.group_size = 16;
        if (v == 2) m.scale_dtype = QMIX_U8;
        for (int isa = 0; isa < QK_ISA_COUNT; isa++) {
            if (!qk_isa_supported((qk_isa)isa) || !qk_matmul_for((qk_isa)isa)) continue;
            qk_matmul_for((qk_isa)isa)(&m, 0, 4, x, 1, 64, y, 4);
            for (int o = 0; o < 4; o++) ck_assert(isnan(y[o]));
        }
    }
    qmat_free(&w);
}
END_TEST

/* Int8-activation decode: the scalar reference within the exact bound that rounding x to int8
 * allows (|x − d·xq| ≤ d/2 per element) of the float result, and the VNNI (2/4/8 bits) and VBMI
 * (3/5/6 bits) kernels equal to the reference up to float summation order, over every width and
 * group, partial spans, padded rows, an all-zero block of x and row ranges not starting at 0. */
START_TEST(q8_decode)
{
    static const int q8_bits[] = {2, 3, 4, 5, 6, 8};
    int cases = 0;
    for (size_t bi = 0; bi < COUNT(q8_bits); bi++)
        for (size_t gi = 0; gi < COUNT(GROUPS); gi++)
            for (int shape = 0; shape < 3; shape++) {
                int bits = q8_bits[bi], gs = GROUPS[gi];
                tu_rng_state = 500 + (uint64_t)(bi * 31 + gi * 7 + shape);
                int64_t rows = shape == 0 ? 1 : shape == 1 ? 7 : 13;
                /* the VBMI kernel takes whole spans of 64 codes (else the float path) */
                int64_t cols = shape == 0 ? (gs < 64 ? 64 : gs) : shape == 1 ? 3 * gs : 2048 + gs;
                qmat w;
                qmat_make(&w, bits, gs, SDT[(bi + gi + shape) % 3], rows, cols, shape == 1 ? 4 : 0);
                ck_assert(qk_q8_supported(&w.m));
                float *x = malloc(sizeof(float) * (size_t)cols);
                for (int64_t k = 0; k < cols; k++) x[k] = k >= 32 && k < 64 ? 0 : tu_frand();
                float *yr = new_y(1, rows), *yv = new_y(1, rows);
                int64_t rb = rows > 1 ? 1 : 0;
                qk_qmatvec_q8_scalar(&w.m, rb, rows, x, yr);
                check_sentinels(yr, 1, rows, rb, rows, "q8 scalar");
                for (int64_t o = rb; o < rows; o++) {
                    double exact = 0, bound = 0, mag = 0;
                    for (int64_t b = 0; b < cols / 32; b++) {
                        float amax = 0;
                        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
                        for (int i = 0; i < 32; i++) {
                            int64_t k = b * 32 + i;
                            exact += (double)w.deq[o * cols + k] * x[k];
                            bound += fabs(w.deq[o * cols + k]) * amax / 127.0 / 2;
                            mag += (double)w.mag[o * cols + k] * fabs(x[k]);
                        }
                    }
                    CHECK(fabs(yr[o] - exact) <= bound * 1.0001 + 1e-5 * mag + 1e-6,
                          "q8 ref b%d g%d cols %ld row %ld: %g vs %g (bound %g)", bits, gs,
                          (long)cols, (long)o, yr[o], exact, bound);
                    CHECK(bound > 0, "the bound is not vacuous");
                }
                int plane_bits = bits == 2 || bits == 4 || bits == 8;
                int simd = qk_isa_supported(QK_ISA_AVX512) && __builtin_cpu_supports("avx512vnni") &&
                           (plane_bits || __builtin_cpu_supports("avx512vbmi"));
                if (simd) {
                    if (plane_bits) qk_qmatvec_q8_vnni(&w.m, rb, rows, x, yv);
                    else qk_qmatvec_q8_vbmi(&w.m, rb, rows, x, yv);
                    check_sentinels(yv, 1, rows, rb, rows, "q8 vnni");
                    for (int64_t o = rb; o < rows; o++) {
                        double mag = 0;
                        for (int64_t k = 0; k < cols; k++) mag += (double)w.mag[o * cols + k] * fabs(x[k]);
                        CHECK(fabs(yv[o] - yr[o]) <= 1e-5 * mag + 1e-6,
                              "q8 vnni b%d g%d cols %ld row %ld: %g vs reference %g", bits, gs,
                              (long)cols, (long)o, yv[o], yr[o]);
                    }
                    /* the dispatcher takes this path for n = 1 when int8 activations are on
                     * (3/5/6 bits: whole 64-code spans; else the float path, tested above) */
                    if (!plane_bits && cols % 64) goto next;
                    qk_set_act_int8(1);
                    float *yd = new_y(1, rows);
                    qk_matmul_for(QK_ISA_AVX512)(&w.m, rb, rows, x, 1, cols, yd, rows);
                    ck_assert_int_eq(memcmp(yd + rb, yv + rb, sizeof(float) * (size_t)(rows - rb)), 0);
                    free(yd);
                }
            next:
                free(yr);
                free(yv);
                free(x);
                qmat_free(&w);
                cases++;
            }
    ck_assert_int_eq(cases, 54);
}
END_TEST

/* The float-activation tests above compare against the float reference: int8 activations off. */
static void float_activations(void) { qk_set_act_int8(0); }

static Suite *qmatmul_suite(void)
{
    Suite *s = suite_create("qmatmul");
    TCase *tq8 = tcase_create("q8");
    tcase_set_timeout(tq8, 120);
    tcase_add_test(tq8, q8_decode);
    suite_add_tcase(s, tq8);
    TCase *tc = tcase_create("qmatmul");
    tcase_add_checked_fixture(tc, float_activations, NULL);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, qmatmul_all, 0, (int)(COUNT(BITS) * COUNT(GROUPS)));
    tcase_add_test(tc, qmatmul_wide);
    tcase_add_test(tc, qmatmul_dispatch);
    tcase_add_test(tc, qmatmul_invalid);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(qmatmul_suite)

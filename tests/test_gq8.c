/* Int8-activation decode of ggml blocks (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, Q5_0): the scalar reference within the
 * exact bound that rounding x to int8 allows of the float64 dot with the dequantized rows; the
 * AVX-512 VNNI kernel equal to the reference up to float summation order, and bitwise equal where
 * every float in the sums is an exact integer (so any difference in an int32 sub-block sum
 * shows); the dispatcher choosing it for n = 1 only while int8 activations are on. */
#include <math.h>

#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"
#include "testutil.h"

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static const int TYPES[] = {QMIX_GGML_Q4_K, QMIX_GGML_Q5_K, QMIX_GGML_Q6_K,
                            QMIX_GGML_Q8_0, QMIX_GGML_Q4_0, QMIX_GGML_Q5_0};
static const uint32_t SENTINEL = 0x7fa1b2c3u;

static void put_f16(uint8_t *p, float v)
{
    uint16_t h = qk_f32_to_f16(v);
    memcpy(p, &h, 2);
}

/* Offsets of a block's fp16 fields (d, and dmin where the format has mins); -1 if none. */
static void f16_fields(int type, int off[2])
{
    off[0] = type == QMIX_GGML_Q6_K ? 208 : 0;
    off[1] = type == QMIX_GGML_Q4_K || type == QMIX_GGML_Q5_K ? 2 : -1;
}

/* Random blocks; the fp16 fields get small finite values (or `fixed` when it is non-zero). */
static uint8_t *random_rows(int type, int64_t rows, int64_t cols, size_t *rb, float fixed)
{
    *rb = qmix_ggml_row_bytes(type, cols);
    size_t bb = qmix_ggml_block_bytes(type), n = (size_t)rows * *rb;
    uint8_t *w = malloc(n);
    ck_assert_ptr_nonnull(w);
    for (size_t i = 0; i < n; i++) w[i] = (uint8_t)tu_rng_u64();
    int off[2];
    f16_fields(type, off);
    for (size_t b = 0; b < n / bb; b++)
        for (int i = 0; i < 2; i++)
            if (off[i] >= 0)
                put_f16(w + b * bb + (size_t)off[i],
                        fixed != 0 ? fixed : (float)((int)(tu_rng_u64() % 2001) - 1000) / 64000.0f);
    return w;
}

/* Row r dequantized (w), and its part that multiplies x through the int8 codes (wq: w without
 * the −dmin·m term of Q4_K/Q5_K, found by dequantizing with dmin = 0). */
static void dequant(int type, const uint8_t *row, int64_t cols, float *w, float *wq)
{
    qmix_ggml_dequant_row(type, row, cols, w);
    size_t rb = qmix_ggml_row_bytes(type, cols), bb = qmix_ggml_block_bytes(type);
    uint8_t *copy = malloc(rb);
    memcpy(copy, row, rb);
    if (type == QMIX_GGML_Q4_K || type == QMIX_GGML_Q5_K)
        for (size_t b = 0; b < rb / bb; b++) put_f16(copy + b * bb + 2, 0.0f);
    qmix_ggml_dequant_row(type, copy, cols, wq);
    free(copy);
}

static float *new_y(int64_t rows)
{
    float *y = malloc(sizeof(float) * (size_t)rows);
    for (int64_t o = 0; o < rows; o++) memcpy(y + o, &SENTINEL, 4);
    return y;
}

static void check_sentinels(const float *y, int64_t rb, const char *what)
{
    for (int64_t o = 0; o < rb; o++) {
        uint32_t u;
        memcpy(&u, y + o, 4);
        CHECK(u == SENTINEL, "%s wrote row %ld outside its range", what, (long)o);
    }
}

static int have_vnni(void)
{
    return qk_isa_supported(QK_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
}

START_TEST(gq8_vs_float)
{
    int cases = 0;
    for (size_t ti = 0; ti < COUNT(TYPES); ti++)
        for (int shape = 0; shape < 3; shape++) {
            int type = TYPES[ti], be = qmix_ggml_block_elems(type);
            tu_rng_seed(900 + ti * 11 + (uint64_t)shape);
            int64_t rows = shape == 0 ? 1 : shape == 1 ? 7 : 13;
            /* Q8_0 runs in 64-wide steps, Q4_0/Q5_0 in 128-wide ones */
            int64_t step = be == 256 ? 256 : type == QMIX_GGML_Q8_0 ? 64 : 128;
            int64_t cols = shape == 0 ? step : shape == 1 ? 3 * step : 2048 + step;
            size_t rb;
            uint8_t *wb = random_rows(type, rows, cols, &rb, 0);
            qk_mat m = {.dtype = QMIX_U8, .ggml_type = type, .rows = rows, .cols = cols,
                        .row_bytes = rb, .data = wb};
            ck_assert(qk_gq8_supported(&m));
            float *x = malloc(sizeof(float) * (size_t)cols);
            /* an all-zero block of x (d = 0) and one of mixed magnitudes */
            for (int64_t k = 0; k < cols; k++)
                x[k] = k >= 32 && k < 64 ? 0 : tu_frand() * (k >= 64 && k < 96 ? 30.0f : 1.0f);
            float *w = malloc(sizeof(float) * (size_t)cols), *wq = malloc(sizeof(float) * (size_t)cols);
            float *yr = new_y(rows), *yv = new_y(rows);
            int64_t r0 = rows > 1 ? 1 : 0;
            qk_gmatvec_q8_scalar(&m, r0, rows, x, yr);
            check_sentinels(yr, r0, "gq8 scalar");
            int simd = have_vnni();
            if (simd) {
                qk_gmatvec_q8_vnni(&m, r0, rows, x, yv);
                check_sentinels(yv, r0, "gq8 vnni");
            }
            for (int64_t o = r0; o < rows; o++) {
                dequant(type, wb + (size_t)o * rb, cols, w, wq);
                double exact = 0, bound = 0, mag = 0;
                for (int64_t b = 0; b < cols / 32; b++) {
                    float amax = 0;
                    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
                    for (int i = 0; i < 32; i++) {
                        int64_t k = b * 32 + i;
                        exact += (double)w[k] * x[k];
                        /* |x − d·xq| ≤ d/2 with d = amax/127, for the part through the codes */
                        bound += fabs(wq[k]) * amax / 127.0 / 2;
                        mag += (fabs(wq[k]) + fabs(w[k] - wq[k])) * fabs(x[k]);
                    }
                }
                CHECK(bound > 0, "the bound is not vacuous");
                CHECK(fabs(yr[o] - exact) <= bound * 1.0001 + 1e-5 * mag + 1e-6,
                      "%s ref cols %ld row %ld: %g vs float %g (bound %g)",
                      qmix_ggml_type_name(type), (long)cols, (long)o, yr[o], exact, bound);
                if (simd)
                    CHECK(fabs(yv[o] - yr[o]) <= 1e-5 * mag + 1e-6,
                          "%s vnni cols %ld row %ld: %g vs reference %g",
                          qmix_ggml_type_name(type), (long)cols, (long)o, yv[o], yr[o]);
            }
            if (simd) {
                /* the dispatcher: int8 for n = 1 while on (bitwise the kernel), float when off */
                float *yd = new_y(rows), *yf = new_y(rows), *ys = new_y(rows);
                qk_set_act_int8(1);
                qk_matmul_for(QK_ISA_AVX512)(&m, r0, rows, x, 1, cols, yd, rows);
                ck_assert_int_eq(memcmp(yd + r0, yv + r0, sizeof(float) * (size_t)(rows - r0)), 0);
                qk_set_act_int8(0);
                qk_matmul_for(QK_ISA_AVX512)(&m, r0, rows, x, 1, cols, yf, rows);
                qk_gmatmul_scalar(&m, r0, rows, x, 1, cols, ys, rows);
                for (int64_t o = r0; o < rows; o++) {
                    double mag = 0;
                    dequant(type, wb + (size_t)o * rb, cols, w, wq);
                    for (int64_t k = 0; k < cols; k++) mag += fabs((double)w[k] * x[k]);
                    CHECK(fabs(yf[o] - ys[o]) <= 1e-5 * mag + 1e-7,
                          "%s with int8 off: %g vs float reference %g",
                          qmix_ggml_type_name(type), yf[o], ys[o]);
                }
                free(yd);
                free(yf);
                free(ys);
            }
            free(yr);
            free(yv);
            free(w);
            free(wq);
            free(x);
            free(wb);
            cases++;
        }
    ck_assert_int_eq(cases, 18);
}
END_TEST

/* Integer x with one ±127 per block of 32 (so d_b = 1 and xq = x exactly), fp16 fields 1 or 2:
 * every float the kernels form is an integer below 2^24, so any order of summation gives the
 * same float and the VNNI result must equal the reference bit for bit. */
START_TEST(gq8_exact)
{
    if (!have_vnni()) {
        printf("note: this CPU lacks AVX-512 VNNI; the int8 ggml kernel is not tested\n");
        return;
    }
    for (size_t ti = 0; ti < COUNT(TYPES); ti++)
        for (int rep = 0; rep < 4; rep++) {
            int type = TYPES[ti];
            tu_rng_seed(1700 + ti * 13 + (uint64_t)rep);
            int64_t rows = 9, cols = 512;
            size_t rb;
            uint8_t *wb = random_rows(type, rows, cols, &rb, rep % 2 ? 2.0f : 1.0f);
            qk_mat m = {.dtype = QMIX_U8, .ggml_type = type, .rows = rows, .cols = cols,
                        .row_bytes = rb, .data = wb};
            float x[512];
            for (int64_t k = 0; k < cols; k++) x[k] = (float)((int)(tu_rng_u64() % 5) - 2);
            for (int64_t b = 0; b < cols / 32; b++)
                x[b * 32 + (int)(tu_rng_u64() % 32)] = tu_rng_u64() % 2 ? 127.0f : -127.0f;
            float *yr = new_y(rows), *yv = new_y(rows);
            qk_gmatvec_q8_scalar(&m, 0, rows, x, yr);
            qk_gmatvec_q8_vnni(&m, 0, rows, x, yv);
            for (int64_t o = 0; o < rows; o++)
                CHECK(yv[o] == yr[o] && yr[o] == nearbyintf(yr[o]),
                      "%s exact rep %d row %ld: vnni %.1f vs reference %.1f",
                      qmix_ggml_type_name(type), rep, (long)o, yv[o], yr[o]);
            free(yr);
            free(yv);
            free(wb);
        }
}
END_TEST

/* Types and shapes the int8 path does not take: not supported, NaN from the kernels. */
START_TEST(gq8_unsupported)
{
    uint8_t blk[210 * 2] = {0};
    float x[512] = {0}, y[2];
    qk_mat m = {.dtype = QMIX_U8, .ggml_type = QMIX_GGML_Q4_1, .rows = 1, .cols = 32,
                .row_bytes = 20, .data = blk};
    ck_assert(!qk_gq8_supported(&m));
    m.ggml_type = QMIX_GGML_Q8_0, m.cols = 32, m.row_bytes = 34; /* half a 64-wide vector */
    ck_assert(!qk_gq8_supported(&m));
    m.ggml_type = QMIX_GGML_Q4_0, m.cols = 64, m.row_bytes = 36; /* half of 4 blocks */
    ck_assert(!qk_gq8_supported(&m));
    m.ggml_type = QMIX_GGML_Q6_K, m.cols = 256, m.row_bytes = 200; /* row too short */
    ck_assert(!qk_gq8_supported(&m));
    qk_gmatvec_q8_scalar(&m, 0, 1, x, y);
    ck_assert(isnan(y[0]));
    if (have_vnni()) {
        qk_gmatvec_q8_vnni(&m, 0, 1, x, y);
        ck_assert(isnan(y[0]));
    }
    m.row_bytes = 210;
    ck_assert(qk_gq8_supported(&m));
}
END_TEST

static Suite *gq8_suite(void)
{
    Suite *s = suite_create("gq8");
    TCase *tc = tcase_create("gq8");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, gq8_vs_float);
    tcase_add_test(tc, gq8_exact);
    tcase_add_test(tc, gq8_unsupported);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(gq8_suite)

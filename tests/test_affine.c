/* MLX affine quantization (spec/quant-formats.md §1): the worked bytes of §1.4 for every bit
 * width, code set/get round trips at every position (straddles included), the worked examples of
 * §1.2 bit-exactly, quantize→dequantize error bounds, single-signed and all-zero groups, and
 * dequantization with bf16/f16/f32 scales. */
#include <math.h>

#include "kernels/kernels.h"
#include "quant/affine.h"
#include "testutil.h"

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)


static const int BITS[] = {2, 3, 4, 5, 6, 8};
#define NBITS 6

/* Packs codes[0..count) into a zeroed 32-code row (bits words) with set_code. */
static void pack(uint32_t *row, int bits, const uint32_t *codes, int count)
{
    memset(row, 0, (size_t)bits * 4);
    for (int k = 0; k < count; k++) qmix_affine_set_code(row, k, bits, codes[k]);
}

static void expect_bytes(const uint32_t *row, const uint8_t *want, int count, const char *what)
{
    const uint8_t *got = (const uint8_t *)row;
    for (int i = 0; i < count; i++)
        CHECK(got[i] == want[i], "%s: byte %d is %02x, want %02x", what, i, got[i], want[i]);
}

START_TEST(params)
{
    for (int b = 0; b <= 9; b++)
        for (int g = 16; g <= 256; g *= 2) {
            int ok = (b >= 2 && b <= 8 && b != 7) && (g == 32 || g == 64 || g == 128);
            ck_assert_int_eq(qmix_affine_valid(b, g), ok);
        }
    ck_assert_int_eq(qmix_affine_row_words(2048, 4), 256);
    ck_assert_int_eq(qmix_affine_row_words(2048, 3), 192);
    ck_assert_int_eq(qmix_affine_row_words(32, 5), 5);
    ck_assert_int_eq(qmix_affine_row_words(64, 6), 12);
}
END_TEST

START_TEST(worked_bytes)
{
    uint32_t row[8];
    {
        const uint32_t c[] = {1, 2, 3, 4, 5, 6, 7, 8};
        pack(row, 4, c, 8);
        ck_assert_uint_eq(row[0], 0x87654321u);
        const uint8_t want[] = {0x21, 0x43, 0x65, 0x87};
        expect_bytes(row, want, 4, "4-bit");
    }
    {
        const uint32_t c[] = {0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 1, 1, 2, 2, 2, 2};
        pack(row, 2, c, 16);
        ck_assert_uint_eq(row[0], 0xAA551BE4u);
        const uint8_t want[] = {0xe4, 0x1b, 0x55, 0xaa};
        expect_bytes(row, want, 4, "2-bit");
    }
    {
        const uint32_t c[] = {1, 2, 3, 4, 5, 6, 7, 0, 7, 6, 5, 4, 3, 2, 1, 0};
        pack(row, 3, c, 16);
        const uint8_t want[] = {0xd1, 0x58, 0x1f};
        expect_bytes(row, want, 3, "3-bit");
        ck_assert_uint_eq(row[0], 0x771F58D1u);
        ck_assert_uint_eq(row[1], 0x00000539u);
        ck_assert_uint_eq(row[2], 0);
        /* straddles: code 10 covers stream bits 30..32, code 21 bits 63..65 */
        uint32_t one[32] = {0};
        one[10] = 5;
        pack(row, 3, one, 32);
        ck_assert_uint_eq(row[0], 0x40000000u);
        ck_assert_uint_eq(row[1], 0x00000001u);
        ck_assert_uint_eq(row[2], 0);
        one[10] = 0;
        one[21] = 6;
        pack(row, 3, one, 32);
        ck_assert_uint_eq(row[0], 0);
        ck_assert_uint_eq(row[1], 0);
        ck_assert_uint_eq(row[2], 0x00000003u);
        ck_assert_uint_eq(qmix_affine_get_code(row, 21, 3), 6);
    }
    {
        const uint32_t c[] = {1, 2, 3, 4, 5, 6, 7, 31};
        pack(row, 5, c, 8);
        const uint8_t want[] = {0x41, 0x0c, 0x52, 0xcc, 0xf9};
        expect_bytes(row, want, 5, "5-bit");
    }
    {
        const uint32_t c[] = {1, 2, 3, 63};
        pack(row, 6, c, 4);
        const uint8_t want[] = {0x81, 0x30, 0xfc};
        expect_bytes(row, want, 3, "6-bit");
    }
    {
        const uint32_t c[] = {1, 2, 3, 255, 0x80};
        pack(row, 8, c, 5);
        const uint8_t want[] = {0x01, 0x02, 0x03, 0xff, 0x80};
        expect_bytes(row, want, 5, "8-bit");
        ck_assert_uint_eq(row[0], 0xff030201u);
    }
}
END_TEST

/* Every bits, every position of a 128-code row: random codes written in a scrambled order read
 * back exactly; then rewriting one code at each position (straddling ones included) leaves all
 * its neighbours untouched, and the byte-wise reading algorithm of §1.4 agrees. */
START_TEST(set_get_round_trip)
{
    tu_rng_state = 7;
    enum { K = 128 };
    for (int bi = 0; bi < NBITS; bi++) {
        int bits = BITS[bi];
        uint32_t maxq = (1u << bits) - 1, codes[K], row[K * 8 / 32 + 1];
        for (int rep = 0; rep < 4; rep++) {
            memset(row, 0xa5, sizeof row); /* set_code must clear what it overwrites */
            for (int k = 0; k < K; k++) codes[k] = (uint32_t)tu_rng_u64() & maxq;
            uint32_t guard = row[K * bits / 32];
            for (int j = 0; j < K; j++) {
                int k = (j * 37 + rep) % K; /* 37 is coprime with 128: a permutation */
                qmix_affine_set_code(row, k, bits, codes[k]);
            }
            CHECK(row[K * bits / 32] == guard || bits == 8, "bits %d wrote past the row", bits);
            for (int k = 0; k < K; k++) {
                uint32_t got = qmix_affine_get_code(row, k, bits);
                CHECK(got == codes[k], "bits %d code %d: %u != %u", bits, k, got, codes[k]);
                const uint8_t *bytes = (const uint8_t *)row;
                unsigned o = (unsigned)(k * bits), sh = o % 8;
                uint32_t v = bytes[o / 8];
                if (sh + (unsigned)bits > 8) v |= (uint32_t)bytes[o / 8 + 1] << 8;
                v = (v >> sh) & maxq;
                CHECK(v == codes[k], "bits %d code %d byte-wise: %u", bits, k, v);
            }
            for (int k = 0; k < K; k++) {
                uint32_t nv = (codes[k] + 1 + (uint32_t)(tu_rng_u64() % maxq)) & maxq;
                qmix_affine_set_code(row, k, bits, nv);
                codes[k] = nv;
                for (int j = k > 2 ? k - 2 : 0; j < K && j <= k + 2; j++)
                    CHECK(qmix_affine_get_code(row, j, bits) == codes[j],
                          "bits %d: setting code %d disturbed code %d", bits, k, j);
            }
        }
    }
}
END_TEST

static void quant1(const float *w, int bits, uint32_t *packed, float *s, float *b)
{
    qmix_affine_quantize_row(w, 32, bits, 32, packed, s, b);
}

START_TEST(worked_examples)
{
    float w[32] = {0}, s, b;
    uint32_t packed[8];
    /* 4-bit, min -0.6, max 0.9 */
    w[0] = -0.6f;
    w[1] = 0.9f;
    w[2] = 0.37f;
    quant1(w, 4, packed, &s, &b);
    ck_assert(b == 0.9f);
    ck_assert(s == 0.9f / -9.0f);
    ck_assert_uint_eq(qmix_affine_get_code(packed, 0, 4), 15);
    ck_assert_uint_eq(qmix_affine_get_code(packed, 1, 4), 0);
    ck_assert_uint_eq(qmix_affine_get_code(packed, 2, 4), 5);
    for (int k = 3; k < 32; k++) ck_assert_uint_eq(qmix_affine_get_code(packed, k, 4), 9);
    float out[32];
    qmix_affine_dequantize_row(packed, &s, &b, QMIX_F32, 32, 4, 32, out);
    ck_assert(out[1] == 0.9f);
    ck_assert(fabsf(out[2] - 0.4f) < 1e-6f);
    ck_assert(fabsf(out[0] + 0.6f) < 1e-6f);
    ck_assert(fabsf(out[3]) < 1e-7f); /* the code -q0 is (about) zero */

    /* 4-bit, min -0.7, max 0.5: positive scale, the far edge clips */
    memset(w, 0, sizeof w);
    w[0] = -0.7f;
    w[1] = 0.5f;
    quant1(w, 4, packed, &s, &b);
    ck_assert(b == -0.7f);
    ck_assert(s == -0.7f / -9.0f);
    ck_assert(fabs(s - 0.0777777) < 1e-6);
    ck_assert_uint_eq(qmix_affine_get_code(packed, 0, 4), 0);
    ck_assert_uint_eq(qmix_affine_get_code(packed, 1, 4), 15);
    ck_assert_uint_eq(qmix_affine_get_code(packed, 2, 4), 9);
    qmix_affine_dequantize_row(packed, &s, &b, QMIX_F32, 32, 4, 32, out);
    ck_assert(fabsf(out[1] - 0.46667f) < 1e-4f);

    /* single-signed: values in [0.9, 1.0] at 4 bits give q0 = -150 */
    for (int k = 0; k < 32; k++) w[k] = 0.9f + 0.1f * (float)k / 31.0f;
    w[31] = 1.0f;
    quant1(w, 4, packed, &s, &b);
    float s0 = -((1.0f - 0.9f) / 15.0f);
    ck_assert(nearbyintf(1.0f / s0) == -150.0f);
    ck_assert(b == 1.0f);
    ck_assert(s == 1.0f / -150.0f);
    qmix_affine_dequantize_row(packed, &s, &b, QMIX_F32, 32, 4, 32, out);
    for (int k = 0; k < 32; k++) {
        uint32_t q = qmix_affine_get_code(packed, k, 4);
        float want = nearbyintf((w[k] - b) / s);
        want = want < 0 ? 0 : want > 15 ? 15 : want;
        ck_assert_uint_eq(q, (uint32_t)want);
        ck_assert(fabsf(out[k] - w[k]) <= fabsf(s) * 0.5001f);
    }
    /* all negative: edge = min, positive scale */
    for (int k = 0; k < 32; k++) w[k] = -2.0f + (float)k / 64.0f;
    quant1(w, 4, packed, &s, &b);
    ck_assert(b == -2.0f);
    ck_assert(s > 0);

    /* all-zero group: q0 = 0, so s = s0 = -eps, β = 0, codes 0, dequantized exactly 0 */
    memset(w, 0, sizeof w);
    for (int bi = 0; bi < NBITS; bi++) {
        quant1(w, BITS[bi], packed, &s, &b);
        ck_assert(s == -1e-7f);
        ck_assert(b == 0.0f);
        for (int k = 0; k < 32; k++)
            ck_assert_uint_eq(qmix_affine_get_code(packed, k, BITS[bi]), 0);
        qmix_affine_dequantize_row(packed, &s, &b, QMIX_F32, 32, BITS[bi], 32, out);
        for (int k = 0; k < 32; k++) ck_assert(out[k] == 0.0f);
    }
    /* a constant nonzero group reproduces its value exactly */
    for (int k = 0; k < 32; k++) w[k] = 0.25f;
    quant1(w, 3, packed, &s, &b);
    qmix_affine_dequantize_row(packed, &s, &b, QMIX_F32, 32, 3, 32, out);
    for (int k = 0; k < 32; k++) ck_assert(fabsf(out[k] - 0.25f) < 1e-6f);
}
END_TEST

/* Mixed-sign random groups at every bits × group: codes in range, the edge element exact, every
 * element inside the representable range [β, β + n_bins·s] within |s|/2 of its value, clipped
 * ones (the far edge, §1.2) within |s|; with scale and bias widened from float32 exactly. */
START_TEST(error_bounds)
{
    tu_rng_state = 11;
    enum { COLS = 256 };
    static const int GROUPS[] = {32, 64, 128};
    float w[COLS], out[COLS], s[COLS / 32], b[COLS / 32];
    uint32_t packed[COLS * 8 / 32];
    for (int bi = 0; bi < NBITS; bi++)
        for (int gi = 0; gi < 3; gi++)
            for (int rep = 0; rep < 20; rep++) {
                int bits = BITS[bi], gs = GROUPS[gi];
                float amp = rep % 2 ? 0.02f : 3.0f;
                for (int k = 0; k < COLS; k++) w[k] = tu_frand() * amp + (rep % 3) * 0.3f * amp;
                for (int g = 0; g < COLS / gs; g++) { /* force mixed signs */
                    w[g * gs] = -amp * 0.5f;
                    w[g * gs + 1] = amp * 0.5f;
                }
                qmix_affine_quantize_row(w, COLS, bits, gs, packed, s, b);
                qmix_affine_dequantize_row(packed, s, b, QMIX_F32, COLS, bits, gs, out);
                float nb = (float)((1 << bits) - 1);
                for (int k = 0; k < COLS; k++) {
                    int g = k / gs;
                    float as = fabsf(s[g]);
                    float lo = fminf(b[g], b[g] + nb * s[g]), hi = fmaxf(b[g], b[g] + nb * s[g]);
                    float err = fabsf(out[k] - w[k]);
                    float slack = 1e-6f * (fabsf(b[g]) + as * nb);
                    if (w[k] >= lo && w[k] <= hi)
                        CHECK(err <= as * 0.5f + slack, "bits %d g %d k %d: err %g > |s|/2 = %g",
                              bits, gs, k, err, as * 0.5f);
                    else
                        CHECK(err <= as + slack, "bits %d g %d k %d: clipped err %g > |s| %g",
                              bits, gs, k, err, as);
                    /* zero representable: the code -q0 = -β/s is an integer in [0, n_bins] */
                    float z = -b[g] / s[g];
                    CHECK(fabsf(z - nearbyintf(z)) < 1e-3f && z > -0.5f && z < nb + 0.5f,
                          "bits %d g %d: zero point %g", bits, gs, z);
                }
            }
}
END_TEST

/* Scales and biases stored as bf16 / f16: dequantize_row widens them exactly, w = s·q + β. */
START_TEST(dequant_scale_dtypes)
{
    tu_rng_state = 5;
    enum { COLS = 128, GS = 32, NG = COLS / GS };
    float w[COLS], s[NG], b[NG], out[COLS];
    uint32_t packed[COLS * 8 / 32];
    for (int bi = 0; bi < NBITS; bi++) {
        int bits = BITS[bi];
        for (int k = 0; k < COLS; k++) w[k] = tu_frand();
        qmix_affine_quantize_row(w, COLS, bits, GS, packed, s, b);
        for (int d = 0; d < 2; d++) {
            uint16_t sh[NG], bh[NG];
            for (int g = 0; g < NG; g++) {
                sh[g] = d ? qk_f32_to_f16(s[g]) : qk_f32_to_bf16(s[g]);
                bh[g] = d ? qk_f32_to_f16(b[g]) : qk_f32_to_bf16(b[g]);
            }
            qmix_affine_dequantize_row(packed, sh, bh, d ? QMIX_F16 : QMIX_BF16, COLS, bits, GS,
                                       out);
            for (int k = 0; k < COLS; k++) {
                int g = k / GS;
                float sf = d ? qk_f16_to_f32(sh[g]) : qk_bf16_to_f32(sh[g]);
                float bf = d ? qk_f16_to_f32(bh[g]) : qk_bf16_to_f32(bh[g]);
                float want = sf * (float)qmix_affine_get_code(packed, k, bits) + bf;
                CHECK(out[k] == want, "bits %d %s k %d: %g != %g", bits, d ? "f16" : "bf16", k,
                      out[k], want);
                /* the rounded scale/bias still reconstruct w to within a few percent of range */
                CHECK(fabsf(out[k] - w[k]) <= fabsf(s[g]) * 1.5f + 0.02f, "bits %d k %d: %g vs %g",
                      bits, k, out[k], w[k]);
            }
        }
    }
}
END_TEST

static Suite *affine_suite(void)
{
    Suite *s = suite_create("affine");
    TCase *tc = tcase_create("affine");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, params);
    tcase_add_test(tc, worked_bytes);
    tcase_add_test(tc, set_get_round_trip);
    tcase_add_test(tc, worked_examples);
    tcase_add_test(tc, error_bounds);
    tcase_add_test(tc, dequant_scale_dtypes);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(affine_suite)

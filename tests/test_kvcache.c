/* The quantized KV cache: its row formats (round trip within half a quantization step, sizes,
 * names), the attention kernels over every format (the scalar reference against float64
 * attention over the dequantized rows, every SIMD kernel against the scalar one, the scratch
 * bound), and what a quantized cache costs the demo model: KLD against the float32 cache on
 * held-out text at 1K context, in order f16 < q8_0 < q4_0 and within bounds. */
#include <math.h>

#include "kernels/kernels_impl.h"
#include "qmix.h"
#include "model/geometry.h"
#include "runtime/session.h"
#include "testutil.h"

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)

static const qmix_kv_type TYPES[] = {QMIX_KV_F32, QMIX_KV_F16, QMIX_KV_Q8_0, QMIX_KV_Q4_0};
#define N_TYPES 4

/* ---- formats ----------------------------------------------------------------------------- */

START_TEST(names_sizes)
{
    static const char *names[] = {"f32", "f16", "q8_0", "q4_0"}, *bits[] = {"32", "16", "8", "4"};
    static const size_t block_bytes[] = {128, 64, 34, 18};
    static const double per_value[] = {32, 16, 8.5, 4.5};
    for (int t = 0; t < N_TYPES; t++) {
        ck_assert_str_eq(qmix_kv_type_name(TYPES[t]), names[t]);
        ck_assert_int_eq(qmix_kv_type_parse(names[t]), TYPES[t]);
        ck_assert_int_eq(qmix_kv_type_parse(bits[t]), TYPES[t]);
        ck_assert_uint_eq(qk_kv_bytes(TYPES[t], 32), block_bytes[t]);
        ck_assert_uint_eq(qk_kv_bytes(TYPES[t], 256), 8 * block_bytes[t]);
        ck_assert(qmix_kv_type_bits(TYPES[t]) == per_value[t]);
        ck_assert(qk_kv_valid(TYPES[t], 64));
    }
    ck_assert_int_eq(qmix_kv_type_parse("q4_1"), QMIX_KV_DEFAULT);
    ck_assert_int_eq(qmix_kv_type_parse("5"), QMIX_KV_DEFAULT);
    ck_assert_int_eq(qmix_kv_type_parse(NULL), QMIX_KV_DEFAULT);
    ck_assert_str_eq(qmix_kv_type_name(QMIX_KV_DEFAULT), "f32");
    /* quantized rows are whole blocks */
    ck_assert(!qk_kv_valid(QMIX_KV_Q8_0, 40));
    ck_assert(!qk_kv_valid(QMIX_KV_Q4_0, 16));
    ck_assert(qk_kv_valid(QMIX_KV_F16, 40));
    ck_assert(!qk_kv_valid(QMIX_KV_COUNT, 64));
}
END_TEST

/* Every value comes back within half a step of its block's scale (q4_0: one step for the value
 * at the far end from the block's extreme, which has 7 levels on that side and 8 on the other),
 * f16 exactly as the scalar conversion rounds it, f32 bit for bit; an all-zero block stays zero. */
START_TEST(round_trip)
{
    enum { N = 256 };
    float x[N], back[N];
    uint8_t buf[4 * N];
    tu_rng_seed(5);
    for (int rep = 0; rep < 50; rep++) {
        float mag = rep < 10 ? 1e-3f : rep < 40 ? 1.0f : 300.0f;
        for (int i = 0; i < N; i++) x[i] = tu_frand() * mag * (i % 7 == 0 ? 4 : 1);
        if (rep == 0)
            for (int i = 32; i < 64; i++) x[i] = 0; /* a zero block */
        for (int t = 0; t < N_TYPES; t++) {
            qmix_kv_type kv = TYPES[t];
            qk_kv_quantize(kv, x, N, buf);
            qk_kv_dequantize(kv, buf, N, back);
            for (int b = 0; b < N; b += 32) {
                float amax = 0;
                for (int i = b; i < b + 32; i++) amax = fmaxf(amax, fabsf(x[i]));
                for (int i = b; i < b + 32; i++) {
                    double err = fabs((double)back[i] - x[i]);
                    switch (kv) {
                    case QMIX_KV_F32: CHECK(back[i] == x[i], "f32 value %d changed", i); break;
                    case QMIX_KV_F16:
                        CHECK(back[i] == qk_f16_to_f32(qk_f32_to_f16(x[i])), "f16 value %d", i);
                        break;
                    case QMIX_KV_Q8_0: {
                        /* the scale is amax/127 rounded to float16 (relative 2^-11) */
                        double step = amax / 127.0 * (1 + 1.0 / 1024);
                        CHECK(err <= step / 2 + 1e-7 * amax, "q8_0 value %d: %.9g -> %.9g (step %.3g)",
                              i, x[i], back[i], step);
                        break;
                    }
                    default: {
                        double step = amax / 8.0 * (1 + 1.0 / 1024);
                        CHECK(err <= step + 1e-7 * amax, "q4_0 value %d: %.9g -> %.9g (step %.3g)", i,
                              x[i], back[i], step);
                        if (x[i] * back[i] >= 0 && fabsf(x[i]) < amax * 0.85f)
                            CHECK(err <= step / 2 + 1e-7 * amax, "q4_0 value %d: %.9g -> %.9g", i,
                                  x[i], back[i]);
                    }
                    }
                    if (amax == 0) CHECK(back[i] == 0, "%s: zero block came back %.9g",
                                         qmix_kv_type_name(kv), back[i]);
                }
            }
        }
    }
}
END_TEST

/* ---- attention kernels ------------------------------------------------------------------- */

/* float64 attention over the rows as stored (dequantized): what every kernel must compute. */
static void reference(qmix_kv_type kv, const float *q, const uint8_t *keys, const uint8_t *values,
                      size_t ld, int n, int dim, float scale, double *out)
{
    float *row = malloc(sizeof(float) * (size_t)dim);
    double *w = malloc(sizeof(double) * (size_t)n), mx = -1e300, sum = 0;
    for (int j = 0; j < n; j++) {
        qk_kv_dequantize(kv, keys + (size_t)j * ld, dim, row);
        double dot = 0;
        for (int i = 0; i < dim; i++) dot += (double)q[i] * row[i];
        w[j] = dot * scale;
        mx = fmax(mx, w[j]);
    }
    for (int j = 0; j < n; j++) sum += w[j] = exp(w[j] - mx);
    for (int i = 0; i < dim; i++) out[i] = 0;
    for (int j = 0; j < n; j++) {
        qk_kv_dequantize(kv, values + (size_t)j * ld, dim, row);
        for (int i = 0; i < dim; i++) out[i] += w[j] / sum * row[i];
    }
    free(row);
    free(w);
}

/* Rows of one head inside a wider cache row (ld > the head's bytes, an offset so nothing is
 * aligned beyond what the type's values need), keys drawn so that the score maximum moves between tiles. NQ queries see
 * n, n − 1, ... keys (a causal block of rows), each checked against float64 attention, every
 * SIMD kernel against the scalar one, and each query of the group against itself alone. */
enum { NQ = 5 };
static void check_kernel(qmix_kv_type kv, int dim, int n, uint64_t seed)
{
    size_t head = qk_kv_bytes(kv, dim), ld = 3 * head + (kv == QMIX_KV_F32 ? 8 : 6);
    size_t bytes = (size_t)n * ld + 64;
    uint8_t *kbuf = malloc(bytes), *vbuf = malloc(bytes);
    /* the second head of three, at an address only as aligned as the type's values need */
    size_t off = kv == QMIX_KV_F32 ? 4 : 2;
    uint8_t *keys = kbuf + off + head, *values = vbuf + off + head;
    float *x = malloc(sizeof(float) * (size_t)dim), *qbuf = malloc(sizeof(float) * NQ * dim);
    float *obuf = malloc(sizeof(float) * NQ * dim), *wbuf = malloc(sizeof(float) * NQ * dim);
    float *alone = malloc(sizeof(float) * (size_t)dim);
    size_t scratch_n = qk_attend_kv_scratch(NQ, dim);
    float *scratch = malloc(sizeof(float) * (scratch_n + 8));
    double *ref = malloc(sizeof(double) * (size_t)dim);
    const float *q[NQ];
    float *out[NQ], *want[NQ];
    int64_t nn[NQ];
    tu_rng_seed(seed);
    for (int j = 0; j < n; j++) {
        float grow = 0.5f + 2.0f * (float)j / (float)n; /* later keys score higher */
        for (int i = 0; i < dim; i++) x[i] = tu_frand() * grow;
        qk_kv_quantize(kv, x, dim, keys + (size_t)j * ld);
        for (int i = 0; i < dim; i++) x[i] = tu_frand() * 2;
        qk_kv_quantize(kv, x, dim, values + (size_t)j * ld);
    }
    for (int k = 0; k < NQ; k++) {
        for (int i = 0; i < dim; i++) qbuf[k * dim + i] = tu_frand() * 2;
        q[k] = qbuf + k * dim;
        out[k] = obuf + k * dim;
        want[k] = wbuf + k * dim;
        nn[k] = n - k > 1 ? n - k : 1;
    }
    float scale = 1.0f / sqrtf((float)dim);

    qk_attend_kv_scalar(kv, NQ, q, want, nn, keys, values, ld, dim, scale, scratch);
    for (int k = 0; k < NQ; k++) {
        reference(kv, q[k], keys, values, ld, (int)nn[k], dim, scale, ref);
        for (int i = 0; i < dim; i++)
            CHECK(fabs(want[k][i] - ref[i]) <= 2e-5 * (1 + fabs(ref[i])),
                  "%s dim %d n %lld: scalar out[%d] = %.7g, float64 reference %.7g",
                  qmix_kv_type_name(kv), dim, (long long)nn[k], i, want[k][i], ref[i]);
    }
    for (int isa = QK_ISA_SCALAR; isa < QK_ISA_COUNT; isa++) {
        if (!qk_isa_supported((qk_isa)isa)) continue;
        qk_attend_kv_fn fn = qk_attend_kv_for((qk_isa)isa);
        for (size_t i = 0; i < scratch_n + 8; i++) scratch[i] = -7.0f;
        fn(kv, NQ, q, out, nn, keys, values, ld, dim, scale, scratch);
        for (int k = 0; k < NQ; k++)
            for (int i = 0; i < dim; i++)
                CHECK(fabs(out[k][i] - want[k][i]) <= 1e-5 * (1 + fabs(want[k][i])),
                      "%s %s dim %d n %lld: out[%d] = %.7g, scalar %.7g", qk_isa_name((qk_isa)isa),
                      qmix_kv_type_name(kv), dim, (long long)nn[k], i, out[k][i], want[k][i]);
        /* the scratch bound: nothing past qk_attend_kv_scratch(nq, dim) is touched, whatever n */
        for (size_t i = scratch_n; i < scratch_n + 8; i++)
            CHECK(scratch[i] == -7.0f, "%s %s n %d: scratch[%zu] written", qk_isa_name((qk_isa)isa),
                  qmix_kv_type_name(kv), n, i);
        /* grouping changes nothing: each query alone gives the same bits */
        for (int k = 0; k < NQ; k++) {
            fn(kv, 1, &q[k], &alone, &nn[k], keys, values, ld, dim, scale, scratch);
            CHECK(!memcmp(alone, out[k], sizeof(float) * (size_t)dim),
                  "%s %s dim %d: query %d alone differs from its group", qk_isa_name((qk_isa)isa),
                  qmix_kv_type_name(kv), dim, k);
        }
    }
    /* the dispatched entry point is the active ISA's kernel, bit for bit */
    qk_attend_kv(kv, NQ, q, out, nn, keys, values, ld, dim, scale, scratch);
    qk_attend_kv_for(qk_isa_active())(kv, NQ, q, want, nn, keys, values, ld, dim, scale, scratch);
    CHECK(!memcmp(obuf, wbuf, sizeof(float) * NQ * (size_t)dim), "qk_attend_kv differs from %s",
          qk_isa_name(qk_isa_active()));
    free(kbuf), free(vbuf), free(x), free(qbuf), free(obuf), free(wbuf), free(alone);
    free(scratch), free(ref);
}

START_TEST(kernels_vs_reference)
{
    static const int dims[] = {32, 64, 256, 40, 17};
    static const int lens[] = {1, 2, 63, 64, 65, 200, 1000};
    int cases = 0;
    for (int t = 0; t < N_TYPES; t++)
        for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++) {
            if (!qk_kv_valid(TYPES[t], dims[d])) continue;
            for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++, cases++)
                check_kernel(TYPES[t], dims[d], lens[l], 1000 + (uint64_t)cases);
        }
    printf("info: %d attention cases, SIMD:%s%s\n", cases,
           qk_isa_supported(QK_ISA_AVX2) ? " avx2" : "",
           qk_isa_supported(QK_ISA_AVX512) ? " avx512" : "");
}
END_TEST

/* ---- the runtime's sizes ----------------------------------------------------------------- */

START_TEST(row_sizes_and_checks)
{
    qmix_config c = {0};
    c.n_layers = 8;
    c.n_kv_heads = 2;
    c.head_dim = 64;
    c.layer_is_full[3] = c.layer_is_full[7] = 1;
    /* 2 heads x 64 values: f32 512 bytes, q8_0 2 x 2 blocks x 34, q4_0 2 x 2 x 18 */
    ck_assert_uint_eq(qmix_kv_row_bytes(&c, QMIX_KV_DEFAULT), 512);
    ck_assert_uint_eq(qmix_kv_row_bytes(&c, QMIX_KV_F16), 256);
    ck_assert_uint_eq(qmix_kv_row_bytes(&c, QMIX_KV_Q8_0), 136);
    ck_assert_uint_eq(qmix_kv_row_bytes(&c, QMIX_KV_Q4_0), 72);
    /* per token: 2 full layers x K and V */
    ck_assert_uint_eq(qmix_kv_token_bytes(&c, QMIX_KV_Q4_0), 4 * 72);
    qmix_err err;
    ck_assert_int_eq(qmix_kv_check(&c, QMIX_KV_Q4_0, &err), 0);
    c.head_dim = 80;
    ck_assert_int_eq(qmix_kv_check(&c, QMIX_KV_F16, &err), 0);
    ck_assert_int_eq(qmix_kv_check(&c, QMIX_KV_Q8_0, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "multiple of 32"));
    ck_assert_int_eq(qmix_kv_check(&c, (qmix_kv_type)99, &err), -1);
}
END_TEST

/* Long context needs no context-sized scratch: at 262,144 tokens a 35B-A3B session's scratch is
 * what it is at 4,096, and only the cache grows, by exactly its rows. */
START_TEST(scratch_independent_of_context)
{
    qmix_config c;
    qmix_geometry_config(qmix_geometry_find("35b-a3b"), &c);
    for (int t = 0; t < N_TYPES; t++) {
        qmix_session_sizes a, b;
        qmix_session_size(&c, 4096, 2, TYPES[t], &a);
        qmix_session_size(&c, 262144, 2, TYPES[t], &b);
        ck_assert_uint_eq(a.scratch, b.scratch);
        ck_assert_uint_eq(a.state, b.state);
        ck_assert_uint_eq(b.kv - a.kv, (262144 - 4096) * qmix_kv_token_bytes(&c, TYPES[t]));
    }
    qmix_session_sizes q4;
    qmix_session_size(&c, 262144, 2, QMIX_KV_Q4_0, &q4);
    ck_assert_uint_eq(q4.kv, 262144ull * 5760); /* 1.41 GiB: 10 layers x K, V x 2 heads x 144 B */
}
END_TEST

/* ---- what it costs ----------------------------------------------------------------------- */

/* KL(float32 cache || quantized cache) of the demo model on held-out text, two windows of 1024
 * tokens: each narrower cache costs more, 8-bit below 0.005 and 4-bit below 0.05. */
START_TEST(kld_on_demo)
{
    if (tu_light_skip("KV cache KLD on the demo model")) return;
    static const char *fmt = "kld testdata/demo testdata/demo --text testdata/demo/heldout.txt "
                             "--ctx 1024 --windows 2 --threads 2 --kv-bits %d --json";
    double k16 = tu_kld_mean(fmt, 16), k8 = tu_kld_mean(fmt, 8), k4 = tu_kld_mean(fmt, 4);
    double k32 = tu_kld_mean(fmt, 32);
    printf("info: demo model, 2 x 1024 held-out tokens: KLD f16 %.3g, q8_0 %.3g, q4_0 %.3g\n", k16,
           k8, k4);
    ck_assert_msg(k32 == 0, "the float32 cache against itself: %g", k32);
    ck_assert_msg(k16 >= 0 && k16 < k8 && k8 < k4, "not ordered: f16 %g, q8_0 %g, q4_0 %g", k16,
                  k8, k4);
    ck_assert_msg(k8 < 0.005, "q8_0 cache KLD %g", k8);
    ck_assert_msg(k4 < 0.05, "q4_0 cache KLD %g", k4);
    ck_assert_msg(k4 > 1e-6, "q4_0 cache KLD %g: is the cache quantized at all?", k4);
}
END_TEST

START_TEST(cli_flags)
{
    tu_expect("generate testdata/demo --tokens 1,2,3 -n 2 --kv-type q4_0", 0, NULL);
    tu_expect("generate testdata/demo --tokens 1,2,3 -n 2 --kv-bits 5", 2, "32, 16, 8 or 4");
    tu_expect("generate testdata/demo --tokens 1,2,3 -n 2 --kv-type 8", 2, "f32, f16, q8_0");
    tu_expect("ppl testdata/demo --text testdata/demo/heldout.txt --ctx 64 --windows 1 "
              "--kv-type q9",
              2, "f32, f16, q8_0 or q4_0");
    tu_expect("generate --help", 0, "--kv-bits");
    tu_expect("bench --help", 0, "--kv-type");
    tu_expect("serve --help", 0, "--kv-bits");
    tu_expect("chat --help", 0, "--kv-bits");
    tu_expect("kld --help", 0, "--kv-bits");
    tu_expect("ppl --help", 0, "--kv-bits");
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("kvcache");
    TCase *tc = tcase_create("kv");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, names_sizes);
    tcase_add_test(tc, round_trip);
    tcase_add_test(tc, kernels_vs_reference);
    tcase_add_test(tc, row_sizes_and_checks);
    tcase_add_test(tc, scratch_independent_of_context);
    tcase_add_test(tc, kld_on_demo);
    tcase_add_test(tc, cli_flags);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(make_suite)

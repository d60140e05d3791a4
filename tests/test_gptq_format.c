/* The GPTQ checkpoint format (spec/quant-formats.md §2): packing against the spec's worked
 * examples, the layout qmix quantize --format gptq writes, loading it back (logits equal to the
 * MLX path at the same codes), GPTQ <-> MLX round trips, and hostile modules. */
#include <math.h>

#include "formats/safetensors.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "qmix.h"
#include "quant/affine.h"
#include "quant/gptq.h"
#include "quant/gptq_format.h"
#include "quant/quantize.h"
#include "quant/recipe.h"
#include "testutil.h"

#define FIXTURE "testdata/fixtures/tiny-a"

/* ---- packing (§2.2, §2.3 worked examples) ---- */

START_TEST(sym_zero_words)
{
    uint32_t w[3];
    qmix_gptq_zeros_row(8, 4, 8, 1, w);
    ck_assert_uint_eq(w[0], 0x77777777u);
    qmix_gptq_zeros_row(16, 2, 2, 1, w);
    ck_assert_uint_eq(w[0], 0x55555555u);
    qmix_gptq_zeros_row(4, 8, 128, 1, w);
    ck_assert_uint_eq(w[0], 0x7F7F7F7Fu);
    qmix_gptq_zeros_row(32, 3, 4, 1, w);
    ck_assert_uint_eq(w[0], 0xDB6DB6DBu);
    ck_assert_uint_eq(w[1], 0xB6DB6DB6u);
    ck_assert_uint_eq(w[2], 0x6DB6DB6Du);
    qmix_gptq_zeros_row(8, 4, 8, 0, w); /* v2: the true zero */
    ck_assert_uint_eq(w[0], 0x88888888u);
}
END_TEST

/* A hand-made module: K = 32 inputs, N = 8 outputs, 4-bit, one group. */
typedef struct fake_mod {
    int32_t qweight[4 * 8], qzeros[1], g_idx[32];
    uint16_t scales[8];
    qmix_tensor t[4];
} fake_mod;

static void fake_init(fake_mod *f)
{
    memset(f, 0, sizeof *f);
    for (int n = 0; n < 8; n++) f->scales[n] = qk_f32_to_f16(0.01f);
    f->qzeros[0] = 0x77777777;
    f->qweight[0] = (int32_t)0x87654321u; /* column 0, inputs 0-7: codes 1..8 */
    f->t[0] = (qmix_tensor){.name = "m.qweight", .dtype = QMIX_I32, .ndim = 2, .shape = {4, 8},
                            .data = f->qweight, .nbytes = sizeof f->qweight};
    f->t[1] = (qmix_tensor){.name = "m.qzeros", .dtype = QMIX_I32, .ndim = 2, .shape = {1, 1},
                            .data = f->qzeros, .nbytes = sizeof f->qzeros};
    f->t[2] = (qmix_tensor){.name = "m.scales", .dtype = QMIX_F16, .ndim = 2, .shape = {1, 8},
                            .data = f->scales, .nbytes = sizeof f->scales};
    f->t[3] = (qmix_tensor){.name = "m.g_idx", .dtype = QMIX_I32, .ndim = 1, .shape = {32},
                            .data = f->g_idx, .nbytes = sizeof f->g_idx};
}

START_TEST(worked_example_dequant)
{
    fake_mod f;
    fake_init(&f);
    qmix_gptq_info info = {.bits = 4, .group = 32, .sym = 1, .v1 = 1};
    qmix_gptq_unpacked u;
    qmix_err err;
    ck_assert_msg(qmix_gptq_unpack("m", &f.t[0], &f.t[1], &f.t[2], &f.t[3], 8, 32, &info, &u,
                                   &err) == 0, "%s", err.msg);
    ck_assert_int_eq(u.bits, 4);
    ck_assert_int_eq(u.group, 32);
    ck_assert(u.sym);
    ck_assert_uint_eq(u.codes[0], 0x87654321u); /* MLX row 0 = qweight column 0 */
    float row[32];
    qmix_affine_dequantize_row(u.codes, u.scales, u.biases, QMIX_F32, 32, 4, 32, row);
    float s = qk_f16_to_f32(qk_f32_to_f16(0.01f));
    for (int k = 0; k < 8; k++) /* (1 − 8)·0.01 … (8 − 8)·0.01 */
        ck_assert_float_eq_tol(row[k], (float)(k + 1 - 8) * s, 1e-7f);
    ck_assert_float_eq_tol(row[8], -8 * s, 1e-7f); /* code 0 */
    qmix_gptq_unpacked_free(&u);
}
END_TEST

static void expect_unpack_error(fake_mod *f, int drop, const char *needle)
{
    qmix_gptq_info info = {.bits = 4, .group = 32, .sym = 1, .v1 = 1};
    qmix_gptq_unpacked u;
    qmix_err err = {0};
    const qmix_tensor *t[4] = {&f->t[0], &f->t[1], &f->t[2], &f->t[3]};
    if (drop >= 0) t[drop] = NULL;
    ck_assert_int_eq(qmix_gptq_unpack("m", t[0], t[1], t[2], t[3], 8, 32, &info, &u, &err), -1);
    ck_assert_msg(strstr(err.msg, needle), "'%s' lacks '%s'", err.msg, needle);
}

START_TEST(hostile_modules)
{
    fake_mod f;
    fake_init(&f);
    expect_unpack_error(&f, 3, "missing m.g_idx");
    f.t[0].shape[0] = 5; /* 5 words per 32 inputs: 5 bits */
    expect_unpack_error(&f, -1, "2, 3, 4 or 8 bits");
    fake_init(&f);
    f.t[0].shape[1] = 7; /* wrong output count */
    expect_unpack_error(&f, -1, "output channels");
    fake_init(&f);
    f.t[0].dtype = QMIX_F32;
    expect_unpack_error(&f, -1, "must be I32");
    fake_init(&f);
    f.g_idx[5] = 1; /* act-order: scattered groups */
    expect_unpack_error(&f, -1, "act-order");
    fake_init(&f);
    f.t[1].shape[1] = 2;
    expect_unpack_error(&f, -1, "qzeros shape");
    /* config-level variants */
    qmix_gptq_info info;
    qmix_err err;
    json_t *j = tu_json("{\"quant_method\":\"gptq\",\"bits\":5,\"group_size\":128}");
    ck_assert_int_eq(qmix_gptq_info_parse(j, "cfg", &info, &err), -1);
    ck_assert(strstr(err.msg, "bits=5"));
    json_decref(j);
    j = tu_json("{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":128,\"format\":\"gptq_p\"}");
    ck_assert_int_eq(qmix_gptq_info_parse(j, "cfg", &info, &err), -1);
    ck_assert(strstr(err.msg, "gptq_p"));
    json_decref(j);
    j = tu_json("{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":128,"
                "\"checkpoint_format\":\"gptq_v2\"}");
    ck_assert_int_eq(qmix_gptq_info_parse(j, "cfg", &info, &err), 1);
    ck_assert_int_eq(info.v1, 0);
    json_decref(j);
    j = tu_json("{\"quant_method\":\"awq\",\"bits\":4}");
    ck_assert_int_eq(qmix_gptq_info_parse(j, "cfg", &info, &err), 0);
    json_decref(j);
}
END_TEST

/* ---- the symmetric grid: biases are exactly −s·2^(b−1) ---- */

START_TEST(sym_grid_exact)
{
    float w[64], sc[2], bi[2];
    uint32_t packed[16];
    for (int i = 0; i < 64; i++) w[i] = sinf((float)i * 0.7f) * (i % 5 == 0 ? 3.0f : 1.0f);
    for (int bits = 2; bits <= 8; bits *= 2) {
        qmix_sym_quantize_row(w, NULL, 64, bits, 32, QMIX_F16, 0, packed, sc, bi);
        for (int g = 0; g < 2; g++) {
            ck_assert(sc[g] > 0);
            ck_assert(qk_f16_to_f32(qk_f32_to_f16(sc[g])) == sc[g]);
            ck_assert(bi[g] == -sc[g] * (float)(1 << (bits - 1)));
            /* both extremes of the group are represented (no clipping with RTN) */
            for (int k = g * 32; k < g * 32 + 32; k++) {
                float q = (float)qmix_affine_get_code(packed, k, bits);
                ck_assert_float_le(fabsf(sc[g] * q + bi[g] - w[k]), 0.5f * sc[g] * 1.0001f);
            }
        }
    }
}
END_TEST

/* ---- a checkpoint written from the fixture ---- */

static char *tmp;

/* A printf'd command line for tu_expect (static buffer: one at a time). */
static const char *tu_fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static const char *tu_fmt(const char *f, ...)
{
    static char buf[2048];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

static void write_gptq(const char *recipe_text, const char *out)
{
    qmix_recipe r;
    qmix_err err;
    ck_assert_msg(qmix_recipe_parse(recipe_text, "test", &r, &err) == 0, "%s", err.msg);
    qmix_quant_opts o = {.recipe = &r, .dtype = QMIX_BF16, .format = QMIX_QFORMAT_GPTQ,
                         .n_threads = 1};
    qmix_quant_report rep;
    ck_assert_msg(qmix_quantize(FIXTURE, out, &o, &rep, &err) == 0, "%s", err.msg);
}

static const qmix_tensor *need(const qmix_st_store *st, const char *name, qmix_dtype dt, int nd,
                               int64_t d0, int64_t d1)
{
    const qmix_tensor *t = qmix_st_find(st, name);
    ck_assert_msg(t != NULL, "missing %s", name);
    ck_assert_msg(t->dtype == dt && t->ndim == nd && t->shape[0] == d0 && (nd < 2 || t->shape[1] == d1),
                  "%s: dtype %s shape [%lld, %lld]", name, qmix_dtype_st_name(t->dtype),
                  (long long)t->shape[0], (long long)(nd > 1 ? t->shape[1] : 0));
    return t;
}

START_TEST(layout_experts_4)
{
    char out[600];
    snprintf(out, sizeof out, "%s/g", tmp);
    write_gptq("default keep\nexperts_gate_up,experts_down bits=4 group=32\n", out);
    qmix_st_store *st, *src;
    qmix_err err;
    ck_assert_msg(qmix_st_open(out, &st, &err) == 0, "%s", err.msg);
    ck_assert(qmix_st_open(FIXTURE, &src, &err) == 0);
    const char *p = "model.language_model.layers";
    char nm[700];
    for (int L = 0; L < 4; L++)
        for (int e = 0; e < 8; e++) {
            static const char *proj[3] = {"gate_proj", "up_proj", "down_proj"};
            for (int k = 0; k < 3; k++) {
                int64_t K = k == 2 ? 32 : 64, N = k == 2 ? 64 : 32;
                snprintf(nm, sizeof nm, "%s.%d.mlp.experts.%d.%s.qweight", p, L, e, proj[k]);
                need(st, nm, QMIX_I32, 2, K * 4 / 32, N);
                snprintf(nm, sizeof nm, "%s.%d.mlp.experts.%d.%s.qzeros", p, L, e, proj[k]);
                const qmix_tensor *z = need(st, nm, QMIX_I32, 2, K / 32, N * 4 / 32);
                for (uint64_t i = 0; i < z->nbytes / 4; i++) {
                    uint32_t v;
                    memcpy(&v, (const uint8_t *)z->data + 4 * i, 4);
                    ck_assert_uint_eq(v, 0x77777777u); /* sym, v1 */
                }
                snprintf(nm, sizeof nm, "%s.%d.mlp.experts.%d.%s.scales", p, L, e, proj[k]);
                need(st, nm, QMIX_F16, 2, K / 32, N);
                snprintf(nm, sizeof nm, "%s.%d.mlp.experts.%d.%s.g_idx", p, L, e, proj[k]);
                const qmix_tensor *gi = need(st, nm, QMIX_I32, 1, K, 0);
                for (int64_t i = 0; i < K; i++) {
                    int32_t v;
                    memcpy(&v, (const uint8_t *)gi->data + 4 * i, 4);
                    ck_assert_int_eq(v, (int32_t)(i / 32));
                }
            }
        }
    /* no fused or MLX names; kept modules as plain BF16 weights; MTP exactly as the source */
    for (uint64_t i = 0; i < qmix_st_count(st); i++) {
        const char *n = qmix_st_at(st, i)->name;
        ck_assert_msg(!strstr(n, "switch_mlp") && !strstr(n, "gate_up_proj") &&
                      strncmp(n, "language_model.", 15), "%s", n);
    }
    need(st, "model.language_model.layers.0.mlp.gate.weight", QMIX_BF16, 2, 8, 64);
    need(st, "model.language_model.layers.3.self_attn.q_proj.weight", QMIX_BF16, 2, 4096, 64);
    need(st, "model.language_model.layers.0.linear_attn.conv1d.weight", QMIX_BF16, 3, 256, 1);
    for (uint64_t i = 0; i < qmix_st_count(src); i++) {
        const qmix_tensor *s = qmix_st_at(src, i);
        if (strncmp(s->name, "mtp.", 4)) continue;
        const qmix_tensor *t = qmix_st_find(st, s->name);
        ck_assert_msg(t && t->dtype == s->dtype && t->nbytes == s->nbytes &&
                      !memcmp(t->data, s->data, s->nbytes), "%s not copied", s->name);
    }
    qmix_st_close(st);
    qmix_st_close(src);
    /* config: §2.5 keys, dynamic rules for the 16-bit classes */
    snprintf(nm, sizeof nm, "%s/config.json", out);
    json_error_t je;
    json_t *root = json_load_file(nm, 0, &je);
    ck_assert_ptr_nonnull(root);
    json_t *q = json_object_get(root, "quantization_config");
    ck_assert_str_eq(json_string_value(json_object_get(q, "quant_method")), "gptq");
    ck_assert_int_eq(json_integer_value(json_object_get(q, "bits")), 4);
    ck_assert_int_eq(json_integer_value(json_object_get(q, "group_size")), 32);
    ck_assert(json_is_true(json_object_get(q, "sym")));
    ck_assert(json_is_false(json_object_get(q, "desc_act")));
    ck_assert(json_is_false(json_object_get(q, "lm_head")));
    ck_assert_str_eq(json_string_value(json_object_get(q, "checkpoint_format")), "gptq");
    ck_assert_str_eq(json_string_value(json_object_get(q, "pack_dtype")), "int32");
    ck_assert_ptr_null(json_object_get(root, "quantization"));
    json_t *dyn = json_object_get(q, "dynamic");
    ck_assert(json_is_object(dyn));
    ck_assert_ptr_nonnull(json_object_get(dyn, "-:.*mtp\\..*"));
    int neg_attn = 0;
    const char *key;
    json_t *v;
    json_object_foreach(dyn, key, v) neg_attn += !strncmp(key, "-:", 2) && strstr(key, "qkv_proj");
    ck_assert_int_eq(neg_attn, 1);
    json_decref(root);
    snprintf(nm, sizeof nm, "%s/quantize_config.json", out);
    ck_assert_int_eq(access(nm, F_OK), 0);
}
END_TEST

static float *prefill(const char *dir, int n, int *V)
{
    static const int32_t tokens[] = {1, 17, 300, 5, 42, 900, 7, 64, 3, 128};
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(dir, &m, &err) == 0, "%s", err.msg);
    *V = qmix_model_config(m)->vocab_size;
    qmix_session *s;
    qmix_session_opts opts = {.max_ctx = n, .n_threads = 1};
    ck_assert_msg(qmix_session_new(m, &opts, &s, &err) == 0, "%s", err.msg);
    float *got = malloc((size_t)n * (size_t)*V * sizeof *got);
    ck_assert_msg(qmix_session_prefill(s, tokens, n, got, &err) == 0, "%s", err.msg);
    qmix_session_free(s);
    qmix_model_close(m);
    return got;
}

static int same_tensors(const char *a_dir, const char *b_dir, int skip_mtp)
{
    qmix_st_store *a, *b;
    qmix_err err;
    ck_assert(qmix_st_open(a_dir, &a, &err) == 0 && qmix_st_open(b_dir, &b, &err) == 0);
    int diff = 0;
    for (uint64_t i = 0; i < qmix_st_count(a); i++) {
        const qmix_tensor *x = qmix_st_at(a, i), *y = qmix_st_find(b, x->name);
        if (skip_mtp && !strncmp(x->name, "mtp.", 4)) continue;
        if (!y || x->dtype != y->dtype || x->nbytes != y->nbytes || memcmp(x->data, y->data, x->nbytes)) {
            printf("differs: %s\n", x->name);
            diff++;
        }
    }
    qmix_st_close(a);
    qmix_st_close(b);
    return diff;
}

START_TEST(loads_and_round_trips)
{
    char g[600], mlx[600], g2[600], mlx2[600];
    snprintf(g, sizeof g, "%s/g8", tmp);
    snprintf(mlx, sizeof mlx, "%s/m", tmp);
    snprintf(g2, sizeof g2, "%s/g2", tmp);
    snprintf(mlx2, sizeof mlx2, "%s/m2", tmp);
    /* experts at 4 bits, attention/GDN/shared experts at 8 (per layer class: dynamic rules),
     * the router and embedding asked for 8 bits but kept 16-bit for vLLM */
    write_gptq("default bits=8 group=32\nexperts_gate_up,experts_down bits=4 group=32\n"
               "gdn_a,gdn_b keep\nlm_head keep\n", g);
    int V, n = 10;
    float *ref = prefill(FIXTURE, n, &V);
    float *lg = prefill(g, n, &V);
    tu_expect(tu_fmt("convert %s %s --to mlx --quiet", g, mlx), 0, NULL);
    float *lm = prefill(mlx, n, &V);
    double d_mlx = 0, d_ref = 0;
    for (size_t i = 0; i < (size_t)n * (size_t)V; i++) {
        d_mlx = fmax(d_mlx, fabs((double)lg[i] - lm[i]));
        d_ref = fmax(d_ref, fabs((double)lg[i] - ref[i]));
    }
    printf("info: logits max |GPTQ - MLX at the same codes| = %.3g, |GPTQ - bf16| = %.3g\n",
           d_mlx, d_ref);
    ck_assert_msg(d_mlx <= 1e-5, "GPTQ vs MLX path: %g", d_mlx);
    ck_assert_msg(d_ref > 0 && d_ref < 20, "GPTQ vs bf16: %g (not quantized, or broken)", d_ref);
    /* GPTQ → MLX → GPTQ gives back every tensor (MLX drops MTP); MLX → GPTQ → MLX likewise */
    tu_expect(tu_fmt("convert %s %s --to gptq --quiet", mlx, g2), 0, NULL);
    ck_assert_int_eq(same_tensors(g, g2, 1), 0);
    tu_expect(tu_fmt("convert %s %s --to mlx --quiet", g2, mlx2), 0, NULL);
    ck_assert_int_eq(same_tensors(mlx, mlx2, 0), 0);
    free(ref);
    free(lg);
    free(lm);
}
END_TEST

START_TEST(recipes_outside_vllm)
{
    qmix_recipe r;
    qmix_err err;
    char out[600];
    static const struct { const char *recipe, *needle; } cases[] = {
        {"default keep\nexperts_gate_up,experts_down bits=3 group=32\n", "cannot be served"},
        {"default keep\nexperts_gate_up bits=4 group=32\nexperts_down bits=8 group=32\n",
         "one quantization setting"},
        {"default keep\nattn_q bits=4 group=32\nattn_k,attn_v bits=8 group=32\n", "qkv_proj"},
        {"default keep\nattn_o bits=6 group=32\n", "2, 3, 4 or 8 bits"},
        {"default keep\ngdn_a,gdn_b bits=4 group=32\n", "qzeros"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(out, sizeof out, "%s/bad%zu", tmp, i);
        ck_assert(qmix_recipe_parse(cases[i].recipe, "t", &r, &err) == 0);
        qmix_quant_opts o = {.recipe = &r, .dtype = QMIX_BF16, .format = QMIX_QFORMAT_GPTQ,
                             .n_threads = 1};
        qmix_quant_report rep;
        ck_assert_int_eq(qmix_quantize(FIXTURE, out, &o, &rep, &err), -1);
        ck_assert_msg(strstr(err.msg, cases[i].needle), "case %zu: '%s' lacks '%s'", i, err.msg,
                      cases[i].needle);
    }
}
END_TEST

static void setup(void) { tmp = tu_tmpdir(); }
static void teardown(void) { tu_rmdir(tmp); }

static Suite *suite(void)
{
    Suite *s = suite_create("gptq_format");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, sym_zero_words);
    tcase_add_test(tc, worked_example_dequant);
    tcase_add_test(tc, hostile_modules);
    tcase_add_test(tc, sym_grid_exact);
    tcase_add_test(tc, layout_experts_4);
    tcase_add_test(tc, loads_and_round_trips);
    tcase_add_test(tc, recipes_outside_vllm);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(suite)

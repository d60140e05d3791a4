/* qmix quantize: every fixture with every preset, loaded back and compared with the golden
 * full-precision logits (mean KL divergence, top-1 agreement); bpw agreement with qmix info;
 * MLX configs that disagree with their packed widths; re-quantization refused. */
#include <jansson.h>
#include <math.h>
#include <sys/wait.h>

#include "model/model.h"
#include "quant/quantize.h"
#include "quant/recipe.h"
#include "testutil.h"

static const char *fixtures[] = {"tiny-a", "tiny-b"};
#define N_FIX 2
#define KEEP_MAX_KLD 0.02 /* measured 0.0001 / 0.008: the 1 + w norms rounded to bf16 */

static void quantize_to(const char *fixture, const char *recipe, const char *out, int allow,
                        qmix_quant_report *rep)
{
    char in[256];
    snprintf(in, sizeof in, "testdata/fixtures/%s", fixture);
    qmix_recipe r;
    qmix_err err;
    ck_assert_msg(qmix_recipe_get(recipe, &r, &err) == 0, "%s", err.msg);
    qmix_quant_opts o = {.recipe = &r, .dtype = QMIX_BF16, .allow_requant = allow};
    ck_assert_msg(qmix_quantize(in, out, &o, rep, &err) == 0, "%s/%s: %s", fixture, recipe,
                  err.msg);
}

/* Mean KL(golden || quantized) over the prefill positions, and top-1 agreement. */
static void measure(const char *fixture, const char *dir, double *kld, double *top1)
{
    int n;
    char tokens_path[256];
    snprintf(tokens_path, sizeof tokens_path, "testdata/fixtures/%s/golden/tokens.txt", fixture);
    int32_t *tokens = tu_read_ids(tokens_path, &n);
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(dir, &m, &err) == 0, "%s", err.msg);
    int V = qmix_model_config(m)->vocab_size;
    qmix_session *s;
    qmix_session_opts opts = {.max_ctx = n, .n_threads = 1};
    ck_assert_msg(qmix_session_new(m, &opts, &s, &err) == 0, "%s", err.msg);
    float *got = malloc((size_t)n * V * sizeof *got);
    ck_assert_msg(qmix_session_prefill(s, tokens, n, got, &err) == 0, "%s", err.msg);
    char path[256];
    size_t size;
    snprintf(path, sizeof path, "testdata/fixtures/%s/golden/logits_prefill.f32", fixture);
    float *want = tu_read(path, &size);
    ck_assert_uint_eq(size, (size_t)n * V * sizeof(float));
    double sum = 0;
    int agree = 0;
    for (int t = 0; t < n; t++) {
        const float *a = want + (size_t)t * V, *b = got + (size_t)t * V;
        double ma = a[0], mb = b[0];
        int ia = 0, ib = 0;
        for (int v = 1; v < V; v++) {
            if (a[v] > ma) ma = a[v], ia = v;
            if (b[v] > mb) mb = b[v], ib = v;
        }
        double za = 0, zb = 0;
        for (int v = 0; v < V; v++) {
            za += exp(a[v] - ma);
            zb += exp(b[v] - mb);
        }
        double lza = log(za), lzb = log(zb), k = 0;
        for (int v = 0; v < V; v++) {
            double lp = a[v] - ma - lza, lq = b[v] - mb - lzb;
            k += exp(lp) * (lp - lq);
        }
        sum += k;
        agree += ia == ib;
    }
    *kld = sum / n;
    *top1 = (double)agree / n;
    free(want);
    free(got);
    free(tokens);
    qmix_session_free(s);
    qmix_model_close(m);
}

/* Per preset and fixture: mean-KLD upper bounds about twice what was measured (see the info:
 * lines; the random-weight fixtures amplify quantization error through routing flips), and top-1
 * agreement lower bounds somewhat under the measured values. */
static const struct { const char *preset; double max_kld[N_FIX]; double min_top1[N_FIX]; } bounds[] = {
    {"dynamic-2.6", {3.0, 4.0}, {0.0, 0.0}},
    {"tiered-4.7", {0.15, 0.5}, {0.6, 0.3}},
    {"unsloth-4", {0.3, 0.75}, {0.4, 0.3}},
    {"experts-4", {0.15, 0.35}, {0.6, 0.4}},
    {"uniform-2", {5.0, 6.0}, {0.0, 0.0}},
    {"uniform-3", {3.0, 4.0}, {0.0, 0.0}},
    {"uniform-4", {1.2, 2.5}, {0.2, 0.0}},
    {"uniform-5", {0.45, 1.3}, {0.4, 0.15}},
    {"uniform-6", {0.25, 0.5}, {0.5, 0.4}},
    {"uniform-8", {0.06, 0.17}, {0.6, 0.5}},
};
#define N_PRESETS (sizeof bounds / sizeof bounds[0])

START_TEST(every_fixture_every_preset)
{
    const char *fx = fixtures[_i];
    double kld[N_PRESETS], top1[N_PRESETS];
    for (size_t p = 0; p < N_PRESETS; p++) {
        char *dir = tu_tmpdir();
        char out[600];
        snprintf(out, sizeof out, "%s/q", dir);
        qmix_quant_report rep;
        quantize_to(fx, bounds[p].preset, out, 0, &rep);
        measure(fx, out, &kld[p], &top1[p]);
        printf("info: %s %-12s bpw %6.3f  KLD %.6f  top-1 %.3f\n", fx, bounds[p].preset, rep.bpw,
               kld[p], top1[p]);
        ck_assert_msg(kld[p] <= bounds[p].max_kld[_i], "%s %s: KLD %g above %g", fx,
                      bounds[p].preset, kld[p], bounds[p].max_kld[_i]);
        ck_assert_msg(top1[p] >= bounds[p].min_top1[_i], "%s %s: top-1 %g below %g", fx,
                      bounds[p].preset, top1[p], bounds[p].min_top1[_i]);
        /* the written checkpoint's bpw, read back as qmix info computes it */
        qmix_model *m;
        qmix_err err;
        ck_assert_msg(qmix_model_open(out, &m, &err) == 0, "%s", err.msg);
        double bpw;
        uint64_t params, bytes;
        ck_assert_msg(qmix_store_bpw(m->store, m->qconfig, &bpw, &params, &bytes, &err) == 0,
                      "%s", err.msg);
        ck_assert_uint_eq(params, rep.params);
        ck_assert_uint_eq(bytes, rep.bytes);
        qmix_model_close(m);
        tu_rmdir(dir);
    }
    /* uniform-2 > 3 > 4 > 6 > 8 */
    static const int order[] = {4, 5, 6, 8, 9};
    for (int k = 0; k + 1 < 5; k++)
        ck_assert_msg(kld[order[k]] > kld[order[k + 1]], "%s: KLD(%s) = %g not above KLD(%s) = %g",
                      fx, bounds[order[k]].preset, kld[order[k]], bounds[order[k + 1]].preset,
                      kld[order[k + 1]]);
}
END_TEST

START_TEST(info_reports_the_same_bpw)
{
    char *dir = tu_tmpdir();
    char out[600], cmd[1400];
    snprintf(out, sizeof out, "%s/q", dir);
    qmix_quant_report rep;
    quantize_to("tiny-b", "dynamic-2.6", out, 0, &rep);
    snprintf(cmd, sizeof cmd, "%s info '%s'", tu_qmix_bin(), out);
    FILE *f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    char line[512], want[64];
    snprintf(want, sizeof want, "bits per weight %.3f ", rep.bpw);
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, want)) found = 1;
    ck_assert_int_eq(pclose(f), 0);
    ck_assert_msg(found, "qmix info does not print '%s'", want);
    tu_rmdir(dir);
}
END_TEST

/* Rewrites OUT/config.json's default bits. */
static void set_default_bits(const char *out, int bits)
{
    char path[700];
    snprintf(path, sizeof path, "%s/config.json", out);
    json_t *root = json_load_file(path, 0, NULL);
    ck_assert_ptr_nonnull(root);
    json_object_set_new(json_object_get(root, "quantization"), "bits", json_integer(bits));
    ck_assert_int_eq(json_dump_file(root, path, JSON_INDENT(4)), 0);
    json_decref(root);
}

START_TEST(config_disagreeing_with_packed_widths)
{
    char *dir = tu_tmpdir();
    char out[600];
    snprintf(out, sizeof out, "%s/q", dir);
    qmix_quant_report rep;
    quantize_to("tiny-a", "uniform-4", out, 0, &rep);
    set_default_bits(out, 3);
    qmix_model *m;
    qmix_err err;
    ck_assert_int_eq(qmix_model_open(out, &m, &err), -1);
    ck_assert_msg(strstr(err.msg, "module '") && strstr(err.msg, "bits=3") &&
                      strstr(err.msg, "bits=4"),
                  "unclear error: %s", err.msg);
    printf("info: mismatch error: %s\n", err.msg);
    tu_rmdir(dir);
}
END_TEST

START_TEST(requant_refused_unless_allowed)
{
    char *dir = tu_tmpdir();
    char a[600], b[600], c[600];
    snprintf(a, sizeof a, "%s/a", dir);
    snprintf(b, sizeof b, "%s/b", dir);
    snprintf(c, sizeof c, "%s/c", dir);
    qmix_quant_report rep;
    quantize_to("tiny-a", "uniform-8", a, 0, &rep);
    qmix_recipe r;
    qmix_err err;
    ck_assert(qmix_recipe_preset("uniform-4", &r, &err) == 0);
    qmix_quant_opts o = {.recipe = &r, .dtype = QMIX_BF16};
    ck_assert_int_eq(qmix_quantize(a, b, &o, &rep, &err), -1);
    ck_assert_msg(strstr(err.msg, "--allow-requant") != NULL, "%s", err.msg);
    o.allow_requant = 1;
    ck_assert_msg(qmix_quantize(a, c, &o, &rep, &err) == 0, "%s", err.msg);
    double kld, top1;
    measure("tiny-a", c, &kld, &top1);
    printf("info: tiny-a uniform-8 then uniform-4: KLD %.6f top-1 %.3f\n", kld, top1);
    ck_assert(kld < 1.0);
    tu_rmdir(dir);
}
END_TEST

/* Nothing quantized: only the layout changes (names, stacked experts, 1 + w norms stored in bf16,
 * [C, K, 1] conv) — the MLX round trip itself. */
START_TEST(unquantized_mlx_roundtrip)
{
    const char *fx = fixtures[_i];
    char *dir = tu_tmpdir();
    char out[600], recipe[600];
    snprintf(out, sizeof out, "%s/q", dir);
    snprintf(recipe, sizeof recipe, "%s/keep.recipe", dir);
    const char *text = "# nothing quantized\ndefault keep\n";
    tu_write(recipe, text, strlen(text));
    qmix_quant_report rep;
    quantize_to(fx, recipe, out, 0, &rep);
    ck_assert(fabs(rep.bpw - 16.0) < 0.2);
    double kld, top1;
    measure(fx, out, &kld, &top1);
    printf("info: %s keep-all (MLX layout, bf16) bpw %.3f KLD %.6f top-1 %.3f\n", fx, rep.bpw,
           kld, top1);
    ck_assert_msg(kld < KEEP_MAX_KLD, "%s: KLD %g", fx, kld);
    /* an unquantized MLX checkpoint is an input too: the same bytes as from the HF original */
    char from_mlx[600], from_hf[600], pa[700], pb[700];
    snprintf(from_mlx, sizeof from_mlx, "%s/m4", dir);
    snprintf(from_hf, sizeof from_hf, "%s/h4", dir);
    qmix_recipe r;
    qmix_err err;
    ck_assert(qmix_recipe_preset("uniform-4", &r, &err) == 0);
    qmix_quant_opts o = {.recipe = &r, .dtype = QMIX_BF16};
    ck_assert_msg(qmix_quantize(out, from_mlx, &o, &rep, &err) == 0, "%s", err.msg);
    quantize_to(fx, "uniform-4", from_hf, 0, &rep);
    snprintf(pa, sizeof pa, "%s/model.safetensors", from_mlx);
    snprintf(pb, sizeof pb, "%s/model.safetensors", from_hf);
    size_t na, nb;
    char *da = tu_read(pa, &na), *db = tu_read(pb, &nb);
    ck_assert_msg(na == nb && memcmp(da, db, na) == 0, "%s: MLX-input quantization differs", fx);
    free(da);
    free(db);
    tu_rmdir(dir);
}
END_TEST

/* Shards: a small limit gives several files and an index; the model loads the same. */
START_TEST(sharded_output)
{
    char *dir = tu_tmpdir();
    char out[600];
    snprintf(out, sizeof out, "%s/q", dir);
    qmix_recipe r;
    qmix_err err;
    ck_assert(qmix_recipe_preset("tiered-4.7", &r, &err) == 0);
    qmix_quant_opts o = {.recipe = &r, .dtype = QMIX_BF16, .shard_bytes = 100 << 10};
    qmix_quant_report rep;
    ck_assert_msg(qmix_quantize("testdata/fixtures/tiny-b", out, &o, &rep, &err) == 0, "%s",
                  err.msg);
    ck_assert_int_gt(rep.n_shards, 3);
    char path[700];
    snprintf(path, sizeof path, "%s/model-00001-of-%05d.safetensors", out, rep.n_shards);
    ck_assert_int_eq(access(path, F_OK), 0);
    double kld, top1;
    measure("tiny-b", out, &kld, &top1);
    printf("info: tiny-b tiered-4.7 in %d shards: KLD %.6f top-1 %.3f\n", rep.n_shards, kld, top1);
    ck_assert(kld < 0.5);
    /* OUT now exists and is not empty: refused without force */
    ck_assert_int_eq(qmix_quantize("testdata/fixtures/tiny-b", out, &o, &rep, &err), -1);
    ck_assert_msg(strstr(err.msg, "--force") != NULL, "%s", err.msg);
    o.force = 1;
    ck_assert_msg(qmix_quantize("testdata/fixtures/tiny-b", out, &o, &rep, &err) == 0, "%s",
                  err.msg);
    tu_rmdir(dir);
}
END_TEST

/* An HF checkpoint with per-expert tensors is stacked into the same switch_mlp tensors as the
 * fused layout: the same bytes, the same logits. */
START_TEST(per_expert_input_stacks_like_fused)
{
    char *dir = tu_tmpdir();
    char cmd[2048], fused[600], per[600], fq[600], pq[600];
    snprintf(fused, sizeof fused, "%s/fused", dir);
    snprintf(per, sizeof per, "%s/per", dir);
    snprintf(fq, sizeof fq, "%s/fq", dir);
    snprintf(pq, sizeof pq, "%s/pq", dir);
    snprintf(cmd, sizeof cmd, "%s synth --like tiny '%s' >/dev/null 2>&1 && %s synth --like tiny "
             "--expert-layout per-expert '%s' >/dev/null 2>&1", tu_qmix_bin(), fused,
             tu_qmix_bin(), per);
    ck_assert_int_eq(system(cmd), 0);
    qmix_recipe r;
    qmix_err err;
    ck_assert(qmix_recipe_preset("uniform-4", &r, &err) == 0);
    qmix_quant_opts o = {.recipe = &r, .dtype = QMIX_BF16};
    qmix_quant_report a, b;
    ck_assert_msg(qmix_quantize(fused, fq, &o, &a, &err) == 0, "%s", err.msg);
    ck_assert_msg(qmix_quantize(per, pq, &o, &b, &err) == 0, "%s", err.msg);
    ck_assert_uint_eq(a.bytes, b.bytes);
    ck_assert_uint_eq(a.params, b.params);
    char pa[700], pb[700];
    snprintf(pa, sizeof pa, "%s/model.safetensors", fq);
    snprintf(pb, sizeof pb, "%s/model.safetensors", pq);
    size_t na, nb;
    char *da = tu_read(pa, &na), *db = tu_read(pb, &nb);
    ck_assert_uint_eq(na, nb);
    ck_assert_msg(memcmp(da, db, na) == 0, "stacked per-expert output differs from fused");
    free(da);
    free(db);
    tu_rmdir(dir);
}
END_TEST

/* Legacy boolean entries (§1.6): true = quantized with the defaults, false = plain. */
START_TEST(boolean_entries)
{
    char *dir = tu_tmpdir();
    char out[600], path[700];
    snprintf(out, sizeof out, "%s/q", dir);
    snprintf(path, sizeof path, "%s/config.json", out);
    qmix_quant_report rep;
    quantize_to("tiny-a", "uniform-4", out, 0, &rep);
    json_t *root = json_load_file(path, 0, NULL);
    json_t *q = json_object_get(root, "quantization");
    json_object_set_new(q, "language_model.model.layers.0.linear_attn.in_proj_z", json_true());
    json_object_set_new(q, "language_model.model.layers.0.input_layernorm", json_false());
    ck_assert_int_eq(json_dump_file(root, path, JSON_INDENT(4)), 0);
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(out, &m, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(m->layers[0].in_z.dtype, QMIX_U32);
    ck_assert_int_eq(m->layers[0].in_z.bits, 4);
    ck_assert_int_eq(m->embed.dtype, QMIX_U32);
    qmix_model_close(m);
    /* false on a packed module contradicts the weights */
    json_object_set_new(q, "language_model.model.layers.0.linear_attn.in_proj_z", json_false());
    ck_assert_int_eq(json_dump_file(root, path, JSON_INDENT(4)), 0);
    ck_assert_int_eq(qmix_model_open(out, &m, &err), -1);
    ck_assert_msg(strstr(err.msg, "in_proj_z") && strstr(err.msg, "not say it is quantized"), "%s",
                  err.msg);
    /* an object entry for a module stored in bf16 contradicts the weights too */
    json_object_del(q, "language_model.model.layers.0.linear_attn.in_proj_z");
    json_t *e = json_object();
    json_object_set_new(e, "bits", json_integer(4));
    json_object_set_new(q, "language_model.model.layers.0.mlp.shared_expert.down_proj", e);
    ck_assert_int_eq(json_dump_file(root, path, JSON_INDENT(4)), 0);
    ck_assert_int_eq(qmix_model_open(out, &m, &err), -1);
    ck_assert_msg(strstr(err.msg, "shared_expert.down_proj") && strstr(err.msg, "BF16"), "%s",
                  err.msg);
    json_decref(root);
    tu_rmdir(dir);
}
END_TEST

/* The CLI: quantize prints the report; a bad recipe is exit 1 with its line; presets lists all. */
START_TEST(cli_quantize_and_presets)
{
    char *dir = tu_tmpdir();
    char cmd[2048], line[512];
    snprintf(cmd, sizeof cmd, "%s quantize testdata/fixtures/tiny-a '%s/q' --recipe dynamic-2.6 "
             "--quiet", tu_qmix_bin(), dir);
    FILE *f = popen(cmd, "r");
    int bpw = 0, router = 0;
    while (fgets(line, sizeof line, f)) {
        if (strstr(line, "bits per weight 4.487")) bpw = 1;
        if (!strncmp(line, "router ", 7) && strstr(line, " 16 ")) router = 1;
    }
    ck_assert_int_eq(pclose(f), 0);
    ck_assert(bpw && router);
    snprintf(cmd, sizeof cmd, "printf 'default bits=4\nrouter bits=1\n' > '%s/bad.recipe' && "
             "%s quantize testdata/fixtures/tiny-a '%s/q2' --recipe '%s/bad.recipe' 2>&1",
             dir, tu_qmix_bin(), dir, dir);
    f = popen(cmd, "r");
    int lineno = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "bad.recipe:2: bits=1")) lineno = 1;
    ck_assert_int_eq(WEXITSTATUS(pclose(f)), 1);
    ck_assert(lineno);
    snprintf(cmd, sizeof cmd, "%s presets", tu_qmix_bin());
    f = popen(cmd, "r");
    int n = 0;
    while (fgets(line, sizeof line, f))
        for (int i = 0; qmix_recipe_preset_names[i]; i++)
            if (!strncmp(line, qmix_recipe_preset_names[i], strlen(qmix_recipe_preset_names[i])) &&
                strstr(line, " bpw "))
                n++;
    ck_assert_int_eq(pclose(f), 0);
    ck_assert_int_eq(n, 10);
    tu_rmdir(dir);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("quantize");
    TCase *tc = tcase_create("quantize");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, every_fixture_every_preset, 0, N_FIX);
    tcase_add_loop_test(tc, unquantized_mlx_roundtrip, 0, N_FIX);
    tcase_add_test(tc, info_reports_the_same_bpw);
    tcase_add_test(tc, sharded_output);
    tcase_add_test(tc, per_expert_input_stacks_like_fused);
    tcase_add_test(tc, boolean_entries);
    tcase_add_test(tc, cli_quantize_and_presets);
    tcase_add_test(tc, config_disagreeing_with_packed_widths);
    tcase_add_test(tc, requant_refused_unless_allowed);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(suite)

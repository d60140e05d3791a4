/* qmix sensitivity: weight error falls with bits for every role, KLD and output error small at 8
 * bits and larger at 2, the model bitwise restored afterwards (also when stopped), the JSON and
 * the suggested recipe well formed, bad input refused with a clear message. */
#include <jansson.h>
#include <math.h>

#include "eval/sensitivity.h"
#include "model/model.h"
#include "quant/calib.h"
#include "quant/recipe.h"
#include "testutil.h"

#define TOKENS_B "testdata/fixtures/tiny-b/golden/tokens.txt"

static qmix_model *open_fixture(const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "testdata/fixtures/%s", name);
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(path, &m, &err) == 0, "%s", err.msg);
    return m;
}

static qmix_sens_opts opts_bits(const int *bits, int n, int group)
{
    qmix_sens_opts o = {.n_bits = n, .group_size = group, .n_threads = 2};
    for (int i = 0; i < n; i++) o.bits[i] = bits[i];
    return o;
}

static void run(qmix_model *m, const qmix_sens_opts *o, qmix_sens_result *res)
{
    qmix_err err;
    ck_assert_msg(qmix_sensitivity_run(m, o, res, &err) == 0, "%s", err.msg);
}

static const char *role(const qmix_sens_row *r) { return qmix_role_name(r->role); }

START_TEST(weight_error_falls_with_bits)
{
    static const char *fx[] = {"tiny-a", "tiny-b"};
    qmix_model *m = open_fixture(fx[_i]);
    int bits[] = {8, 2, 4, 3}; /* any order: the result is sorted by bits */
    qmix_sens_opts o = opts_bits(bits, 4, 32);
    qmix_sens_result res;
    run(m, &o, &res);
    ck_assert_int_eq(res.bits[0], 2);
    ck_assert_int_eq(res.bits[3], 8);
    /* every matmul role of these fixtures (tiny-b: lm_head untied) is present and quantizable */
    ck_assert_int_ge(res.n_rows, 15);
    for (int k = 0; k < res.n_rows; k++) {
        const qmix_sens_row *r = &res.rows[k];
        ck_assert_msg(r->quantizable, "%s: %s not quantizable at group 32", fx[_i], role(r));
        ck_assert_int_eq(r->params, r->params_measured);
        double e[4];
        for (int b = 0; b < 4; b++) {
            e[b] = qmix_sens_weight_error(&r->cell[b]);
            ck_assert_msg(!isnan(e[b]), "%s: %s at %d bits not measured", fx[_i], role(r),
                          res.bits[b]);
            ck_assert(!r->cell[b].has_kld && !r->cell[b].has_output); /* no calibration */
        }
        ck_assert_msg(e[0] > e[1] && e[1] > e[2] && e[2] > e[3],
                      "%s: %s weight error %g %g %g %g does not fall with bits", fx[_i], role(r),
                      e[0], e[1], e[2], e[3]);
        /* RTN bounds: a uniform grid of 2^b levels; random weights sit near them */
        ck_assert_msg(e[0] > 0.2 && e[0] < 0.6, "%s: %s 2-bit error %g", fx[_i], role(r), e[0]);
        ck_assert_msg(e[3] < 0.02, "%s: %s 8-bit error %g", fx[_i], role(r), e[3]);
    }
    qmix_sens_result_free(&res);
    qmix_model_close(m);
}
END_TEST

/* At group 64 tiny-b's routed-expert down projections (input 32) cannot be quantized: reported
 * as such, not measured, and left out of the recipe. */
START_TEST(unquantizable_roles_are_reported)
{
    qmix_model *m = open_fixture("tiny-b");
    int bits[] = {2, 4};
    qmix_sens_opts o = opts_bits(bits, 2, 64);
    qmix_sens_result res;
    run(m, &o, &res);
    int found = 0;
    for (int k = 0; k < res.n_rows; k++)
        if (res.rows[k].role == QMIX_ROLE_EXPERTS_DOWN) {
            found = 1;
            ck_assert(!res.rows[k].quantizable);
            ck_assert_int_eq(res.rows[k].in_dim, 32);
            ck_assert(!res.rows[k].cell[0].has_weight);
        }
    ck_assert(found);
    qmix_sens_sort(&res);
    ck_assert(!res.rows[res.n_rows - 1].quantizable); /* unquantizable rows sort last */
    char text[8192];
    qmix_err err;
    ck_assert_msg(qmix_sens_recipe(&res, 0, NULL, text, sizeof text, &err) == 0, "%s", err.msg);
    ck_assert_ptr_null(strstr(text, "experts_down b"));
    ck_assert_ptr_null(strstr(text, "experts_down,"));
    qmix_sens_result_free(&res);
    qmix_model_close(m);
}
END_TEST

START_TEST(kld_small_at_8_bits_larger_at_2)
{
    qmix_model *m = open_fixture("tiny-b");
    int n;
    int32_t *tokens = tu_read_ids(TOKENS_B, &n);
    int bits[] = {2, 8};
    qmix_sens_opts o = opts_bits(bits, 2, 32);
    o.tokens = tokens;
    o.n_tokens = n;
    o.ctx = 16;
    qmix_sens_result res;
    run(m, &o, &res);
    ck_assert(res.has_calib);
    ck_assert_int_eq(res.n_windows, 3);
    ck_assert_int_eq(res.calib_rows, 3 * 15);
    ck_assert_int_eq(res.base_topk, 0);
    for (int k = 0; k < res.n_rows; k++) {
        const qmix_sens_row *r = &res.rows[k];
        double k2 = qmix_sens_kld(&r->cell[0]), k8 = qmix_sens_kld(&r->cell[1]);
        double o2 = qmix_sens_output_error(&r->cell[0]), o8 = qmix_sens_output_error(&r->cell[1]);
        ck_assert_int_eq(r->cell[0].kld_rows, 45);
        /* tiny-b's random weights make it hypersensitive (rounding its norms to bf16 alone
           costs 0.008; embed at 8 bits measures 0.060 here and 0.066 through qmix quantize +
           logits), so "small" is relative: well under 0.1 and a tenth of the 2-bit KLD */
        ck_assert_msg(k8 >= 0 && k8 < 0.1, "%s: 8-bit KLD %g", role(r), k8);
        ck_assert_msg(k2 > 10 * k8 && k2 > 1e-3, "%s: 2-bit KLD %g vs 8-bit %g", role(r), k2, k8);
        ck_assert_msg(o8 < 0.03, "%s: 8-bit output error %g", role(r), o8);
        ck_assert_msg(o2 > 0.1 && o2 > 5 * o8, "%s: 2-bit output error %g vs 8-bit %g", role(r),
                      o2, o8);
    }
    /* sorted: most sensitive (largest 2-bit KLD) first */
    qmix_sens_sort(&res);
    for (int k = 0; k + 1 < res.n_rows; k++)
        ck_assert(qmix_sens_kld(&res.rows[k].cell[0]) >= qmix_sens_kld(&res.rows[k + 1].cell[0]));
    qmix_sens_result_free(&res);
    free(tokens);
    qmix_model_close(m);
}
END_TEST

/* --method gptq: each role quantized by GPTQ from Hessians of the same calibration tokens has a
 * lower output error on them than round to nearest (what GPTQ minimises), summed over the roles
 * and at 2 bits for most of them; the embedding (no statistics) is rounded to nearest either
 * way, so its cells are identical. Without statistics: a clear error. */
START_TEST(gptq_method_lowers_output_error)
{
    qmix_model *m = open_fixture("tiny-b");
    int n;
    int32_t *tokens = tu_read_ids(TOKENS_B, &n);
    char *dir = tu_tmpdir(), args[1024], path[512];
    snprintf(args, sizeof args, "calibrate testdata/fixtures/tiny-b --tokens " TOKENS_B
             " --ctx 16 -o '%s/s.qcal'", dir);
    tu_expect(args, 0, "calibrated");
    snprintf(path, sizeof path, "%s/s.qcal", dir);
    qmix_calib *stats;
    qmix_err err;
    ck_assert_msg(qmix_calib_open(path, &stats, &err) == 0, "%s", err.msg);
    int bits[] = {2, 4};
    qmix_sens_result res[2];
    for (int k = 0; k < 2; k++) {
        qmix_sens_opts o = opts_bits(bits, 2, 32);
        o.tokens = tokens;
        o.n_tokens = n;
        o.ctx = 16;
        o.method = k ? QMIX_METHOD_GPTQ : QMIX_METHOD_RTN;
        o.calib = k ? stats : NULL;
        run(m, &o, &res[k]);
        ck_assert_int_eq(res[k].method, o.method);
    }
    double sum[2] = {0, 0};
    int lower = 0, rows = 0;
    for (int i = 0; i < res[0].n_rows; i++) {
        const qmix_sens_row *r = &res[0].rows[i], *g = &res[1].rows[i];
        ck_assert_int_eq(r->role, g->role);
        if (!r->quantizable) continue;
        double o_rtn = qmix_sens_output_error(&r->cell[0]), o_gptq = qmix_sens_output_error(&g->cell[0]);
        if (r->role == QMIX_ROLE_EMBED) {
            ck_assert_msg(o_rtn == o_gptq, "embed: %g vs %g", o_rtn, o_gptq);
            continue;
        }
        sum[0] += o_rtn;
        sum[1] += o_gptq;
        lower += o_gptq < o_rtn;
        rows++;
    }
    printf("info: tiny-b 2-bit output error summed over %d roles: RTN %.4f, GPTQ %.4f (%d lower)\n",
           rows, sum[0], sum[1], lower);
    ck_assert_msg(sum[1] < 0.9 * sum[0], "GPTQ %g vs RTN %g", sum[1], sum[0]);
    ck_assert_int_gt(2 * lower, rows);
    for (int k = 0; k < 2; k++) qmix_sens_result_free(&res[k]);

    qmix_sens_opts o = opts_bits(bits, 2, 32);
    o.method = QMIX_METHOD_GPTQ;
    qmix_sens_result r;
    ck_assert(qmix_sensitivity_run(m, &o, &r, &err) != 0);
    ck_assert_msg(strstr(err.msg, "statistics"), "%s", err.msg);
    tu_expect("sensitivity testdata/fixtures/tiny-b --method gptq", 2, "--stats");
    qmix_calib_close(stats);
    tu_rmdir(dir);
    free(tokens);
    qmix_model_close(m);
}
END_TEST

/* Past the memory cap the base is kept as top-k rows: the KLD stays close to (and, lumping the
 * tail, not above) the one from whole logits. */
START_TEST(topk_base_close_to_full)
{
    qmix_model *m = open_fixture("tiny-b");
    int n;
    int32_t *tokens = tu_read_ids(TOKENS_B, &n);
    int bits[] = {3};
    qmix_sens_opts o = opts_bits(bits, 1, 32);
    o.tokens = tokens;
    o.n_tokens = n;
    o.ctx = 16;
    qmix_sens_result full, topk;
    run(m, &o, &full);
    o.max_base_bytes = 1;
    run(m, &o, &topk);
    ck_assert_int_eq(full.base_topk, 0);
    ck_assert_int_eq(topk.base_topk, 64);
    for (int k = 0; k < full.n_rows; k++) {
        double a = qmix_sens_kld(&full.rows[k].cell[0]), b = qmix_sens_kld(&topk.rows[k].cell[0]);
        ck_assert_msg(b <= a * (1 + 1e-6) + 1e-9 && b >= 0.8 * a, "%s: top-k KLD %g, full %g",
                      role(&full.rows[k]), b, a);
        /* output and weight errors do not depend on how the base is kept */
        ck_assert(full.rows[k].cell[0].o_err2 == topk.rows[k].cell[0].o_err2);
        ck_assert(full.rows[k].cell[0].w_err2 == topk.rows[k].cell[0].w_err2);
    }
    qmix_sens_result_free(&full);
    qmix_sens_result_free(&topk);
    free(tokens);
    qmix_model_close(m);
}
END_TEST

static float *logits_of(qmix_model *m, const int32_t *tokens, int n)
{
    qmix_session *s;
    qmix_err err;
    qmix_session_opts so = {.max_ctx = n, .n_threads = 1};
    ck_assert_msg(qmix_session_new(m, &so, &s, &err) == 0, "%s", err.msg);
    int64_t V = qmix_model_config(m)->vocab_size;
    float *out = malloc((size_t)(n * V) * sizeof *out);
    ck_assert_msg(qmix_session_prefill(s, tokens, n, out, &err) == 0, "%s", err.msg);
    qmix_session_free(s);
    return out;
}

static volatile sig_atomic_t stop_flag;
static int64_t stop_after;

static void stop_progress(void *user, int64_t done, int64_t total)
{
    (void)user;
    (void)total;
    if (done >= stop_after) stop_flag = 1;
}

/* After measuring (every role, per layer, also when stopped half-way) the model computes exactly
 * what a freshly opened one does. */
START_TEST(model_restored_exactly)
{
    qmix_model *m = open_fixture("tiny-b"), *fresh = open_fixture("tiny-b");
    int n;
    int32_t *tokens = tu_read_ids(TOKENS_B, &n);
    int64_t V = qmix_model_config(m)->vocab_size;
    float *before = logits_of(m, tokens, n);
    int bits[] = {2, 3};
    qmix_sens_opts o = opts_bits(bits, 2, 32);
    o.tokens = tokens;
    o.n_tokens = n;
    o.ctx = 16;
    o.per_layer = _i == 1;
    o.sample = _i == 1 ? 2 : 0;
    if (_i == 2) { /* Ctrl-C after a few passes */
        stop_flag = 0;
        stop_after = 10;
        o.progress = stop_progress;
        o.stop = &stop_flag;
    }
    qmix_sens_result res;
    run(m, &o, &res);
    ck_assert_int_eq(res.stopped, _i == 2);
    if (_i == 2) { /* what was measured is kept, the rest is missing */
        int with = 0, without = 0;
        for (int k = 0; k < res.n_rows; k++) {
            if (res.rows[k].cell[1].has_kld) with++;
            else without++;
        }
        ck_assert_int_gt(with, 0);
        ck_assert_int_gt(without, 0);
    }
    float *after = logits_of(m, tokens, n), *ref = logits_of(fresh, tokens, n);
    ck_assert(memcmp(before, ref, (size_t)(n * V) * sizeof(float)) == 0);
    ck_assert_msg(memcmp(after, ref, (size_t)(n * V) * sizeof(float)) == 0,
                  "logits differ after the sensitivity run");
    qmix_sens_result_free(&res);
    free(before);
    free(after);
    free(ref);
    free(tokens);
    qmix_model_close(m);
    qmix_model_close(fresh);
}
END_TEST

/* tiny-b with tied embeddings: lm_head.weight dropped, tie_word_embeddings set. */
static char *make_tied(void)
{
    char *dir = tu_tmpdir(), path[600];
    size_t size;
    uint8_t *st = tu_read("testdata/fixtures/tiny-b/model.safetensors", &size);
    uint64_t n;
    memcpy(&n, st, 8);
    json_error_t je;
    json_t *h = json_loadb((const char *)st + 8, (size_t)n, 0, &je);
    ck_assert_ptr_nonnull(h);
    ck_assert_int_eq(json_object_del(h, "lm_head.weight"), 0); /* its bytes stay, unreferenced */
    char *text = json_dumps(h, JSON_COMPACT);
    size_t hl = strlen(text), padded = (hl + 7) & ~(size_t)7;
    uint8_t *out = malloc(8 + padded + size - 8 - n);
    uint64_t pl = padded;
    memcpy(out, &pl, 8);
    memset(out + 8, ' ', padded);
    memcpy(out + 8, text, hl);
    memcpy(out + 8 + padded, st + 8 + n, size - 8 - n);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    tu_write(path, out, 8 + padded + size - 8 - n);
    json_t *cfg = json_load_file("testdata/fixtures/tiny-b/config.json", 0, &je);
    ck_assert_ptr_nonnull(cfg);
    json_object_set_new(cfg, "tie_word_embeddings", json_true());
    json_object_set_new(json_object_get(cfg, "text_config"), "tie_word_embeddings", json_true());
    snprintf(path, sizeof path, "%s/config.json", dir);
    ck_assert_int_eq(json_dump_file(cfg, path, 0), 0);
    json_decref(cfg);
    json_decref(h);
    free(text);
    free(out);
    free(st);
    return dir;
}

/* A tied head is the embedding tensor: measured with embed (both views quantized, counted once),
 * no lm_head row, and both views restored. */
START_TEST(tied_embeddings)
{
    char *dir = make_tied();
    qmix_model *m;
    qmix_err err;
    ck_assert_msg(qmix_model_open(dir, &m, &err) == 0, "%s", err.msg);
    const qmix_config *c = qmix_model_config(m);
    int n;
    int32_t *tokens = tu_read_ids(TOKENS_B, &n);
    float *before = logits_of(m, tokens, n);
    int bits[] = {2, 8};
    qmix_sens_opts o = opts_bits(bits, 2, 32);
    o.tokens = tokens;
    o.n_tokens = n;
    o.ctx = 16;
    qmix_sens_result res, untied;
    run(m, &o, &res);
    qmix_model *u = open_fixture("tiny-b");
    run(u, &o, &untied);
    const qmix_sens_row *emb = NULL, *emb_u = NULL;
    for (int k = 0; k < res.n_rows; k++) {
        ck_assert_int_ne(res.rows[k].role, QMIX_ROLE_LM_HEAD);
        if (res.rows[k].role == QMIX_ROLE_EMBED) emb = &res.rows[k];
    }
    for (int k = 0; k < untied.n_rows; k++)
        if (untied.rows[k].role == QMIX_ROLE_EMBED) emb_u = &untied.rows[k];
    ck_assert_ptr_nonnull(emb);
    ck_assert_int_eq(emb->params, (int64_t)c->vocab_size * c->hidden_size);
    /* same tensor, same weight error; the output error now also covers the head's matmul */
    ck_assert(emb->cell[0].w_err2 == emb_u->cell[0].w_err2);
    ck_assert(emb->cell[0].o_norm2 > emb_u->cell[0].o_norm2);
    ck_assert(qmix_sens_kld(&emb->cell[0]) > qmix_sens_kld(&emb->cell[1]));
    float *after = logits_of(m, tokens, n);
    ck_assert(memcmp(before, after, (size_t)n * c->vocab_size * sizeof(float)) == 0);
    qmix_sens_result_free(&res);
    qmix_sens_result_free(&untied);
    free(before);
    free(after);
    free(tokens);
    qmix_model_close(m);
    qmix_model_close(u);
    tu_rmdir(dir);
}
END_TEST

START_TEST(per_layer_and_sample)
{
    qmix_model *m = open_fixture("tiny-b");
    const qmix_config *c = qmix_model_config(m);
    int bits[] = {2};
    qmix_sens_opts o = opts_bits(bits, 1, 32);
    o.per_layer = 1;
    qmix_sens_result all;
    run(m, &o, &all);
    /* tiny-b: 2 full-attention, 6 GDN layers; MoE in all 8; embed and lm_head once */
    int n_full = 0;
    for (int i = 0; i < c->n_layers; i++) n_full += c->layer_is_full[i];
    int want = 2 + 4 * n_full + 5 * (c->n_layers - n_full) + 5 * c->n_layers;
    ck_assert_int_eq(all.n_rows, want);
    o.sample = 2;
    qmix_sens_result some;
    run(m, &o, &some);
    ck_assert_int_eq(some.n_rows, 2 + 4 * 2 + 5 * 2 + 5 * 2);
    for (int k = 0; k < some.n_rows; k++) {
        const qmix_sens_row *r = &some.rows[k];
        if (r->role == QMIX_ROLE_EXPERTS_GATE_UP) /* 2 of 16 experts measured */
            ck_assert_int_eq(r->params_measured * 8, r->params);
        if (r->layer >= 0) {
            ck_assert_int_eq(r->layers_measured, 2);
            ck_assert(r->layer == 0 || r->layer == 3 || r->layer == 6 || r->layer == 7);
        }
    }
    ck_assert(some.full_estimate_s >= some.elapsed_s * 0.5);
    ck_assert(some.full_estimate_s > 0);
    qmix_sens_result_free(&all);
    qmix_sens_result_free(&some);
    qmix_model_close(m);
}
END_TEST

/* The suggested recipe parses, names only measured roles, and moves the most KLD per bit. */
START_TEST(suggested_recipe_parses)
{
    qmix_model *m = open_fixture("tiny-b");
    int n;
    int32_t *tokens = tu_read_ids(TOKENS_B, &n);
    int bits[] = {2, 3, 4};
    qmix_sens_opts o = opts_bits(bits, 3, 32);
    if (_i) {
        o.tokens = tokens;
        o.n_tokens = n;
        o.ctx = 16;
    }
    qmix_sens_result res;
    run(m, &o, &res);
    qmix_sens_sort(&res);
    double targets[] = {0, 2.5, 3.0, 16};
    for (int t = 0; t < 4; t++) {
        char text[8192];
        qmix_err err;
        ck_assert_msg(qmix_sens_recipe(&res, targets[t], "tiny-b", text, sizeof text, &err) == 0,
                      "%s", err.msg);
        qmix_recipe r;
        ck_assert_msg(qmix_recipe_parse(text, "suggested", &r, &err) == 0, "%s\n%s", err.msg,
                      text);
        ck_assert_int_ge(r.n_rules, 1);
        /* bits spent within the target: with 16 allowed, everything is kept */
        if (targets[t] == 16) {
            ck_assert_int_eq(r.n_rules, 1);
            ck_assert_int_eq(r.rules[0].bits, 0);
        }
        if (targets[t] == 0) { /* lowest + 0.25: most weights stay at 2 bits */
            int two = 0;
            for (int k = 0; k < r.n_rules; k++) two |= r.rules[k].bits == 2;
            ck_assert(two);
        }
    }
    char tiny[16];
    qmix_err err;
    ck_assert_int_eq(qmix_sens_recipe(&res, 0, NULL, tiny, sizeof tiny, &err), -1);
    qmix_sens_result_free(&res);
    free(tokens);
    qmix_model_close(m);
}
END_TEST

START_TEST(json_has_documented_keys)
{
    char *dir = tu_tmpdir(), args[1024], path[700];
    snprintf(path, sizeof path, "%s/suggested.recipe", dir);
    snprintf(args, sizeof args,
             "testdata/fixtures/tiny-b --json --tokens " TOKENS_B " --ctx 16 --bits 2,4 "
             "--group-size 32 --threads 1 --recipe-out '%s'", path);
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "sensitivity %s", args);
    tu_run_result run_r = tu_run(cmd);
    ck_assert_msg(run_r.status == 0, "%s", run_r.err);
    json_error_t je;
    json_t *o = json_loads(run_r.out, 0, &je);
    ck_assert_msg(o != NULL, "JSON: %s (line %d)", je.text, je.line);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "group_size")), 32);
    ck_assert_int_eq(json_array_size(json_object_get(o, "bits")), 2);
    json_t *cal = json_object_get(o, "calibration");
    ck_assert(json_is_object(cal));
    ck_assert_int_eq(json_integer_value(json_object_get(cal, "tokens_scored")), 45);
    ck_assert(json_is_array(json_object_get(o, "kept_roles")));
    ck_assert(json_is_number(json_object_get(o, "elapsed_s")));
    ck_assert(json_is_null(json_object_get(o, "full_run_estimate_s")));
    ck_assert(json_is_false(json_object_get(o, "stopped")));
    json_t *rows = json_object_get(o, "rows");
    ck_assert(json_is_array(rows));
    ck_assert_int_eq(json_array_size(rows), 16);
    double prev_kld = INFINITY;
    size_t k;
    json_t *row;
    json_array_foreach(rows, k, row) {
        ck_assert(json_is_string(json_object_get(row, "role")));
        ck_assert(json_is_null(json_object_get(row, "layer")));
        ck_assert(json_is_integer(json_object_get(row, "params")));
        json_t *bits = json_object_get(row, "bits");
        const char *keys[] = {"2", "4"};
        for (int b = 0; b < 2; b++) {
            json_t *c = json_object_get(bits, keys[b]);
            ck_assert_msg(json_is_object(c), "row %zu has no bits \"%s\"", k, keys[b]);
            ck_assert(json_is_number(json_object_get(c, "weight_error")));
            ck_assert(json_is_number(json_object_get(c, "output_error")));
            ck_assert(json_is_number(json_object_get(c, "kld")));
        }
        double kld = json_number_value(json_object_get(json_object_get(bits, "2"), "kld"));
        ck_assert(kld <= prev_kld); /* most sensitive first */
        prev_kld = kld;
    }
    const char *recipe = json_string_value(json_object_get(o, "suggested_recipe"));
    ck_assert_ptr_nonnull(recipe);
    qmix_recipe r;
    qmix_err err;
    ck_assert_msg(qmix_recipe_parse(recipe, "json", &r, &err) == 0, "%s", err.msg);
    /* --recipe-out holds the same text, loadable as qmix quantize --recipe FILE would */
    char *saved = tu_read(path, NULL);
    ck_assert_str_eq(saved, recipe);
    ck_assert_msg(qmix_recipe_load(path, &r, &err) == 0, "%s", err.msg);
    free(saved);
    json_decref(o);
    tu_run_free(&run_r);
    tu_rmdir(dir);
}
END_TEST

START_TEST(table_output)
{
    tu_run_result run_r = tu_run("sensitivity testdata/fixtures/tiny-b --calib "
                                 "testdata/assets/wiki.test.raw --ctx 32 --windows 1 --bits 2,3 "
                                 "--sample 1 --per-layer");
    ck_assert_msg(run_r.status == 0, "%s", run_r.err);
    const char *out = run_r.out;
    ck_assert_ptr_nonnull(strstr(out, "| Component | 2-bit Error | 3-bit Error |"));
    ck_assert_ptr_nonnull(strstr(out, "| 2-bit KLD | 3-bit KLD | Params |"));
    ck_assert_ptr_nonnull(strstr(out, "norm, gdn_params"));
    ck_assert_ptr_nonnull(strstr(out, "experts_down")); /* not quantizable at group 64 */
    ck_assert_ptr_nonnull(strstr(out, "a full run (every layer and expert) would take about"));
    /* the recipe is the tail, from its first comment line */
    char *rec = strstr(out, "# suggested by qmix sensitivity");
    ck_assert_ptr_nonnull(rec);
    qmix_recipe r;
    qmix_err err;
    ck_assert_msg(qmix_recipe_parse(rec, "table", &r, &err) == 0, "%s", err.msg);
    tu_run_free(&run_r);
}
END_TEST

START_TEST(bad_input)
{
    static const struct { const char *args; int status; const char *msg; } cases[] = {
        {"testdata/fixtures/tiny-b --bits 7", 2, "--bits"},
        {"testdata/fixtures/tiny-b --bits 2,2", 2, "--bits"},
        {"testdata/fixtures/tiny-b --bits 2,", 2, "--bits"},
        {"testdata/fixtures/tiny-b --bits", 2, "needs a value"},
        {"testdata/fixtures/tiny-b --group-size 48", 2, "--group-size"},
        {"testdata/fixtures/tiny-b --ctx 1 --tokens " TOKENS_B, 2, "--ctx"},
        {"testdata/fixtures/tiny-b --calib /nonexistent/calib.txt", 1, "/nonexistent/calib.txt"},
        {"testdata/fixtures/tiny-b --calib x --tokens y", 2, "not both"},
        {"testdata/fixtures/tiny-b --tokens " TOKENS_B " --ctx 100", 1, "one window"},
        {"testdata/fixtures/nonexistent", 1, "nonexistent"},
        {"testdata/fixtures/tiny-b --frobnicate", 2, "unknown option"},
        {"", 2, "usage"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "sensitivity %s", cases[i].args);
        tu_run_result rr = tu_run(cmd);
        ck_assert_msg(rr.status == cases[i].status, "'%s': exit %d, want %d", cases[i].args,
                      rr.status, cases[i].status);
        ck_assert_msg(strstr(rr.err, cases[i].msg), "'%s': message '%s' lacks '%s'",
                      cases[i].args, rr.err, cases[i].msg);
        tu_run_free(&rr);
    }
    /* the library refuses the same things with a message */
    qmix_model *m = open_fixture("tiny-b");
    qmix_sens_result res;
    qmix_err err;
    int bad_bits[] = {7}, dup[] = {2, 2}, ok[] = {2};
    qmix_sens_opts o = opts_bits(bad_bits, 1, 64);
    ck_assert_int_eq(qmix_sensitivity_run(m, &o, &res, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "7 bits"));
    o = opts_bits(dup, 2, 64);
    ck_assert_int_eq(qmix_sensitivity_run(m, &o, &res, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "twice"));
    o = opts_bits(ok, 1, 48);
    ck_assert_int_eq(qmix_sensitivity_run(m, &o, &res, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "group size 48"));
    int32_t bad_tok[4] = {1, 2, 99999, 3};
    o = opts_bits(ok, 1, 64);
    o.tokens = bad_tok;
    o.n_tokens = 4;
    o.ctx = 4;
    ck_assert_int_eq(qmix_sensitivity_run(m, &o, &res, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.msg, "outside the vocabulary"));
    qmix_model_close(m);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("sensitivity");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, weight_error_falls_with_bits, 0, 2);
    tcase_add_test(tc, unquantizable_roles_are_reported);
    tcase_add_test(tc, kld_small_at_8_bits_larger_at_2);
    tcase_add_test(tc, gptq_method_lowers_output_error);
    tcase_add_test(tc, topk_base_close_to_full);
    tcase_add_loop_test(tc, model_restored_exactly, 0, 3);
    tcase_add_test(tc, tied_embeddings);
    tcase_add_test(tc, per_layer_and_sample);
    tcase_add_loop_test(tc, suggested_recipe_parses, 0, 2);
    tcase_add_test(tc, json_has_documented_keys);
    tcase_add_test(tc, table_output);
    tcase_add_test(tc, bad_input);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(suite)

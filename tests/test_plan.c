/* qmix plan: the byte arithmetic against hand-computed values, the session sizing against real
 * sessions, memory strings, the CLI (JSON keys, errors), and the predicted peak against the
 * measured peak RSS of a process that runs the model. */
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <sys/wait.h>

#include "eval/plan.h"
#include "formats/config.h"
#include "model/geometry.h"
#include "quant/quantize.h"
#include "quant/recipe.h"
#include "runtime/session.h"
#include "testutil.h"

#define FIXTURE "testdata/fixtures/tiny-a"

static qmix_plan plan_like(const char *like, const char *recipe, int ctx, int kv_bits,
                           uint64_t memory)
{
    qmix_recipe r;
    qmix_err err = {{0}};
    if (recipe) ck_assert_msg(qmix_recipe_preset(recipe, &r, &err) == 0, "%s", err.msg);
    qmix_plan_opts o = {.recipe = recipe ? &r : NULL, .ctx = ctx, .kv_bits = kv_bits,
                        .n_threads = 2, .memory = memory};
    qmix_plan p;
    ck_assert_msg(qmix_plan_like(like, &o, &p, &err) == 0, "%s", err.msg);
    return p;
}

/* ---- byte arithmetic ------------------------------------------------------------------- */

START_TEST(kv_per_token_by_hand)
{
    qmix_config c;
    /* 35B-A3B: 10 full layers x 2 (K, V) x 2 KV heads x 256 head_dim x bytes per element */
    qmix_geometry_config(qmix_geometry_find("35b-a3b"), &c);
    ck_assert_uint_eq(qmix_plan_kv_per_token(&c, 16), 10u * 2 * 2 * 256 * 2); /* 20480 */
    ck_assert_uint_eq(qmix_plan_kv_per_token(&c, 16), 20480);
    ck_assert_uint_eq(qmix_plan_kv_per_token(&c, 32), 40960);
    /* qmix's q8_0 / q4_0 caches: blocks of 32 values with a 2-byte scale, 34 and 18 bytes */
    ck_assert_uint_eq(qmix_plan_kv_per_token(&c, 8), 10u * 2 * 2 * (256 / 32) * 34); /* 10880 */
    /* the card's "4-bit KV per token: ~5 KB" (5120 without scales) */
    ck_assert_uint_eq(qmix_plan_kv_per_token(&c, 4), 10u * 2 * 2 * (256 / 32) * 18); /* 5760 */
    /* 122B-A10B: 12 of 48 layers full; 397B-A17B: 15 of 60 */
    qmix_geometry_config(qmix_geometry_find("122b-a10b"), &c);
    ck_assert_uint_eq(qmix_plan_kv_per_token(&c, 16), 12u * 2 * 2 * 256 * 2);
    qmix_geometry_config(qmix_geometry_find("397b-a17b"), &c);
    ck_assert_uint_eq(qmix_plan_kv_per_token(&c, 16), 15u * 2 * 2 * 256 * 2);
}
END_TEST

START_TEST(plan_35b_parts_by_hand)
{
    qmix_plan p = plan_like("35b-a3b", NULL, 32768, 16, (uint64_t)16 << 30);
    ck_assert_int_eq(p.n_full, 10);
    ck_assert_int_eq(p.n_linear, 30);
    ck_assert_int_eq(p.n_threads, 2);
    /* GDN state, float32: 30 layers x (conv (Kc-1) x C + recurrent nv x dk x dv), C = 2·16·128 +
     * 32·128 = 8192: 30 x (3·8192 + 32·128·128) x 4 = 65 863 680 bytes (the card's ~33 MB is
     * the same state in bf16) */
    ck_assert_uint_eq(p.state_bytes, 30ull * (3 * 8192 + 32 * 128 * 128) * 4);
    ck_assert_uint_eq(p.kv_bytes_per_token, 20480);
    ck_assert_uint_eq(p.kv_bytes, 20480ull * 32768); /* 0.625 GiB */
    ck_assert_uint_eq(p.peak_bytes, p.weight_bytes + p.engine_bytes + p.runtime_bytes +
                                        p.state_bytes + p.kv_bytes);
    ck_assert_uint_eq(p.fixed_bytes, p.peak_bytes - p.kv_bytes);
    /* bf16 as released, text model without MTP: about 34.7B parameters, 2 bytes each */
    ck_assert_msg(p.weight_params > 34000000000ull && p.weight_params < 35000000000ull, "%llu",
                  (unsigned long long)p.weight_params);
    ck_assert(fabs(p.bpw - 16.0) < 0.01);
    /* 16 GiB cannot hold ~65 GiB of bf16 weights */
    ck_assert(!p.fits);
    ck_assert_int_eq(p.max_context, 0);
    ck_assert(p.headroom < 0);
}
END_TEST

START_TEST(plan_recipe_reuses_estimate)
{
    qmix_plan p = plan_like("35b-a3b", "dynamic-2.6", 4096, 32, (uint64_t)16 << 30);
    qmix_config c;
    qmix_geometry_config(qmix_geometry_find("35b-a3b"), &c);
    qmix_recipe r;
    qmix_quant_report rep;
    qmix_err err;
    ck_assert(qmix_recipe_preset("dynamic-2.6", &r, &err) == 0);
    ck_assert(qmix_quant_estimate(&c, &r, &rep, &err) == 0);
    ck_assert_uint_eq(p.weight_bytes, rep.bytes);
    ck_assert(fabs(p.bpw - 2.579) < 0.005); /* seed 002: 2.579 bpw, text-only */
    ck_assert(p.fits);
    /* the longest context: its peak fits, one token more does not */
    ck_assert(p.max_context > 4096 && p.max_context < 262144);
    ck_assert(qmix_plan_peak_at(&p, p.max_context, 32) <= p.available);
    ck_assert(qmix_plan_peak_at(&p, p.max_context + 1, 32) > p.available);
    /* fewer KV bits, longer context; at 4 bits it reaches the model's limit */
    int lim = 0;
    ck_assert(qmix_plan_max_context(&p, 16, &lim) > p.max_context);
    ck_assert_int_eq(qmix_plan_max_context(&p, 4, &lim), 262144);
    ck_assert(lim);
    /* a reserve larger than the memory leaves nothing */
    qmix_plan_opts o = {.recipe = &r, .memory = 1 << 30, .reserve = 2u << 30};
    qmix_plan q;
    ck_assert(qmix_plan_like("35b-a3b", &o, &q, &err) == 0);
    ck_assert_uint_eq(q.available, 0);
    ck_assert(!q.fits);
    ck_assert_int_eq(q.max_context, 0);
}
END_TEST

START_TEST(vision_params_by_hand)
{
    /* 27 blocks x (norms 2·2·1152 + qkv 3·1152²+3·1152 + proj 1152²+1152 + fc1 4304·1152+4304 +
     * fc2 1152·4304+1152) = 27 x 15 239 504 = 411 466 608; patch embed 1152·3·2·16·16 + 1152 =
     * 1 770 624; positions 2304·1152 = 2 654 208; merger 2·1152 + 4608²+4608 + 2048·4608+2048 =
     * 30 679 808 → 446 571 248 for the 35B-A3B (out_hidden 2048) */
    ck_assert_uint_eq(qmix_plan_vision_params(2048), 446571248ull);
    qmix_recipe r;
    qmix_err err;
    ck_assert(qmix_recipe_preset("dynamic-2.6", &r, &err) == 0);
    qmix_plan_opts o = {.recipe = &r, .vision = 1, .n_threads = 1, .memory = 16ull << 30};
    qmix_plan p;
    ck_assert(qmix_plan_like("35b-a3b", &o, &p, &err) == 0);
    ck_assert_uint_eq(p.vision_bytes, 2 * 446571248ull);
    ck_assert(p.vision_estimated);
}
END_TEST

/* qmix_session_size is what qmix_session_new allocates: same arena, for several contexts, thread
 * counts (batch below and at the 512 cap) and every KV cache type; and the plan's KV figure for a
 * width is that session's cache. */
START_TEST(session_size_matches_session)
{
    qmix_model *m = NULL;
    qmix_err err;
    ck_assert_msg(qmix_model_open(FIXTURE, &m, &err) == 0, "%s", err.msg);
    const qmix_config *c = qmix_model_config(m);
    int ctxs[] = {1, 100, 512, 513, 3000};
    static const int bits[] = {32, 16, 8, 4};
    int n_full = 0;
    for (int l = 0; l < c->n_layers; l++) n_full += c->layer_is_full[l];
    for (size_t i = 0; i < sizeof ctxs / sizeof ctxs[0]; i++)
        for (int th = 1; th <= 2; th++)
            for (int b = 0; b < 4; b++) {
                qmix_kv_type kv = qmix_plan_kv_type(bits[b]);
                qmix_session *s = NULL;
                qmix_session_opts o = {.max_ctx = ctxs[i], .n_threads = th, .kv_type = kv};
                ck_assert(qmix_session_new(m, &o, &s, &err) == 0);
                ck_assert_int_eq(s->seq.kv_type, kv);
                qmix_session_sizes sz;
                qmix_session_size(c, ctxs[i], th, kv, &sz);
                ck_assert_uint_eq(sz.arena, s->arena_bytes);
                ck_assert_uint_eq(sz.arena, sz.kv + sz.state + sz.scratch);
                ck_assert_uint_eq(qmix_session_bytes(c, ctxs[i], th, kv), sz.total);
                /* KV: full layers x K, V x ctx rows, each cache padded to 64 bytes at most */
                uint64_t rows = (uint64_t)ctxs[i] * qmix_plan_kv_per_token(c, bits[b]);
                ck_assert_uint_ge(sz.kv, rows);
                ck_assert_uint_lt(sz.kv, rows + (uint64_t)n_full * 2 * 64);
                /* the cache's address range is what the session carved for it */
                for (int l = 0; l < c->n_layers; l++)
                    if (c->layer_is_full[l])
                        ck_assert_uint_ge((uintptr_t)s->seq.state[l].v_cache -
                                              (uintptr_t)s->seq.state[l].k_cache,
                                          (uint64_t)ctxs[i] * qmix_kv_row_bytes(c, kv));
                /* the plan at that width and context counts exactly that cache */
                if (th == 2) {
                    qmix_plan_opts po = {.ctx = ctxs[i], .kv_bits = bits[b], .n_threads = th,
                                         .memory = 1ull << 40};
                    qmix_plan p;
                    ck_assert(qmix_plan_checkpoint(FIXTURE, &po, &p, &err) == 0);
                    ck_assert_uint_eq(p.kv_bytes, sz.kv);
                    ck_assert_uint_eq(p.runtime_bytes + p.state_bytes + p.kv_bytes, sz.total);
                }
                qmix_session_free(s);
            }
    qmix_model_close(m);
}
END_TEST

/* ---- memory strings -------------------------------------------------------------------- */

START_TEST(parse_sizes)
{
    static const struct { const char *s; uint64_t v; } ok[] = {
        {"16G", 16ull << 30},     {"3.5G", 3758096384ull}, {"512M", 512ull << 20},
        {"11GiB", 11ull << 30},   {"11gib", 11ull << 30},  {"24GB", 24ull << 30},
        {"1000", 1000},           {"1000B", 1000},         {"64k", 65536},
        {"0.5K", 512},            {"2T", 2ull << 40},      {"0", 0},
        {".5M", 512ull << 10},    {"1.25MiB", 1310720},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        uint64_t v = 1;
        qmix_err err;
        ck_assert_msg(qmix_parse_bytes(ok[i].s, &v, &err) == 0, "%s: %s", ok[i].s, err.msg);
        ck_assert_msg(v == ok[i].v, "%s: %llu, want %llu", ok[i].s, (unsigned long long)v,
                      (unsigned long long)ok[i].v);
    }
    static const char *bad[] = {"", "G", "-1G", "+1G", "16X", "16 G", " 16G", "1e3", "inf",
                                "nan", "0x10", "1..2G", "1.2.3", "16GG", "99999999999T", "16Gi"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v;
        qmix_err err = {{0}};
        ck_assert_msg(qmix_parse_bytes(bad[i], &v, &err) == -1, "'%s' accepted", bad[i]);
        ck_assert_msg(err.msg[0], "no message for '%s'", bad[i]);
    }
}
END_TEST

/* ---- the CLI --------------------------------------------------------------------------- */

/* Runs `qmix ARGS`; returns the exit status, stdout in *out (malloc'd) if out is given. */
static uint64_t json_u64(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    ck_assert_msg(json_is_integer(v), "key %s missing or not an integer", key);
    return (uint64_t)json_integer_value(v);
}

START_TEST(cli_json_keys)
{
    char *out;
    ck_assert_int_eq(tu_run_out(&out, "plan --like 35b-a3b --recipe dynamic-2.6 --memory 16G "
                                        "--reserve 3.5G --ctx 32768 --kv-bits 16 --threads 2 "
                                        "--json"),
                     0);
    json_t *j = tu_json(out);
    static const char *keys[] = {"fits", "max_context", "peak_bytes", "weight_bytes",
                                 "runtime_bytes", "gdn_state_bytes", "kv_bytes_per_token",
                                 "kv_bytes", "engine_bytes", "vision_bytes", "kv_headroom_bytes",
                                 "available_bytes", "kv_table", "bpw", "ctx", "kv_bits"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        ck_assert_msg(json_object_get(j, keys[i]) != NULL, "key %s missing", keys[i]);
    ck_assert(json_is_boolean(json_object_get(j, "fits")));
    ck_assert(json_is_true(json_object_get(j, "fits")));
    ck_assert_uint_eq(json_u64(j, "kv_bytes_per_token"), 20480);
    ck_assert_uint_eq(json_u64(j, "kv_bytes"), 20480ull * 32768);
    ck_assert_uint_eq(json_u64(j, "available_bytes"), (16ull << 30) - 3758096384ull);
    ck_assert_uint_eq(json_u64(j, "peak_bytes"),
                      json_u64(j, "weight_bytes") + json_u64(j, "engine_bytes") +
                          json_u64(j, "runtime_bytes") + json_u64(j, "gdn_state_bytes") +
                          json_u64(j, "kv_bytes"));
    const json_t *t = json_object_get(j, "kv_table");
    ck_assert_int_eq(json_array_size(t), QMIX_PLAN_N_TABLE_BITS);
    const json_t *row16 = json_array_get(t, 1);
    ck_assert_uint_eq(json_u64(row16, "kv_bits"), 16);
    ck_assert_uint_eq(json_u64(row16, "max_context"), json_u64(j, "max_context"));
    ck_assert_int_eq(json_array_size(json_object_get(row16, "contexts")), QMIX_PLAN_N_TABLE_CTX);
    json_decref(j);
    free(out);

    /* the tables */
    ck_assert_int_eq(tu_run_out(&out, "plan --like 35b-a3b --recipe dynamic-2.6 --memory 16G "
                                        "--reserve 3.5G"),
                     0);
    ck_assert_ptr_nonnull(strstr(out, "Memory Budget"));
    ck_assert_ptr_nonnull(strstr(out, "= KV headroom"));
    ck_assert_ptr_nonnull(strstr(out, "| KV Bits | 32K | 64K | 100K |"));
    ck_assert_ptr_nonnull(strstr(out, "GatedDeltaNet state"));
    free(out);
}
END_TEST

START_TEST(cli_errors)
{
    ck_assert_int_eq(tu_run_out(NULL, "plan --help"), 0);
    ck_assert_int_eq(tu_run_out(NULL, "plan"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b"), 2);             /* no --memory */
    ck_assert_int_eq(tu_run_out(NULL, "plan --like huge --memory 16G"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory 16X"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory -16G"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory 0"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory 16G --reserve x"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory 16G --kv-bits 5"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory 16G --ctx 0"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory 16G --bogus"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory"), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan %s --like 35b-a3b --memory 16G", FIXTURE), 2);
    ck_assert_int_eq(tu_run_out(NULL, "plan /nonexistent/model --memory 16G"), 1);
    ck_assert_int_eq(tu_run_out(NULL, "plan testdata --memory 16G"), 1);     /* no config */
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 35b-a3b --memory 16G --recipe nope"), 1);
    /* a model that does not fit is an answer, not an error */
    ck_assert_int_eq(tu_run_out(NULL, "plan --like 397b-a17b --memory 16G"), 0);
}
END_TEST

/* With a recipe, the weights are what `qmix quantize` writes: the plan of the bf16 checkpoint
 * with --recipe equals the plan of the quantized checkpoint as stored. */
START_TEST(cli_recipe_matches_quantize)
{
    char *dir = tu_tmpdir();
    char *out;
    ck_assert_int_eq(tu_run_out(NULL, "synth --like tiny --quiet '%s/bf16'", dir), 0);
    ck_assert_int_eq(tu_run_out(NULL, "quantize '%s/bf16' '%s/q' --recipe uniform-4 --quiet",
                                  dir, dir), 0);
    ck_assert_int_eq(tu_run_out(&out, "plan '%s/bf16' --recipe uniform-4 --memory 1G --json",
                                  dir), 0);
    json_t *a = tu_json(out);
    free(out);
    ck_assert_int_eq(tu_run_out(&out, "plan '%s/q' --memory 1G --json", dir), 0);
    json_t *b = tu_json(out);
    free(out);
    ck_assert_uint_eq(json_u64(a, "weight_bytes"), json_u64(b, "weight_bytes"));
    ck_assert_uint_eq(json_u64(a, "weight_params"), json_u64(b, "weight_params"));
    /* the bf16 source's MTP block is mapped but never read */
    ck_assert_int_eq(tu_run_out(&out, "plan '%s/bf16' --memory 1G --json", dir), 0);
    json_t *c = tu_json(out);
    free(out);
    ck_assert(json_u64(c, "skipped_bytes") > 0);
    ck_assert(json_u64(c, "weight_bytes") > json_u64(a, "weight_bytes"));
    json_decref(a);
    json_decref(b);
    json_decref(c);
    tu_rmdir(dir);
}
END_TEST

/* The prediction against a measurement: a synthetic model whose weights (~150 MB, 48 layers of
 * 256 small experts) dominate the process, run by `qmix bench` (every matrix prefaulted, a
 * context prefilled and decoded from), its row's peak RSS against the plan's peak_bytes. */
START_TEST(cli_peak_matches_measured_rss)
{
    if (strstr(tu_qmix_bin(), "build-san")) {
        /* ASan's shadow memory and quarantine are not qmix's memory */
        fprintf(stderr, "info: test_plan: RSS comparison skipped for a sanitizer build of qmix\n");
        return;
    }
    char *dir = tu_tmpdir(), *out;
    ck_assert_int_eq(tu_run_out(NULL, "synth --like tiny --layers 48 --experts 256 --quiet "
                                        "'%s/m'", dir), 0);
    const int ctx = 1024, gen = 16;
    ck_assert_int_eq(tu_run_out(&out, "bench '%s/m' --ctx %d --gen %d --threads 1 --no-membw "
                                        "--json", dir, ctx, gen), 0);
    json_t *b = tu_json(out);
    free(out);
    const json_t *row = json_array_get(json_object_get(b, "runs"), 0);
    ck_assert_ptr_nonnull(row);
    double measured = (double)json_u64(row, "peak_rss_bytes");
    ck_assert_int_eq(tu_run_out(&out, "plan '%s/m' --memory 1G --ctx %d --threads 1 --json",
                                  dir, ctx + gen), 0);
    json_t *p = tu_json(out);
    free(out);
    double predicted = (double)json_u64(p, "peak_bytes");
    fprintf(stderr, "info: test_plan: predicted peak %.1f MiB, measured %.1f MiB (%+.1f%%)\n",
            predicted / 1048576, measured / 1048576, 100 * (predicted - measured) / measured);
    ck_assert_msg(fabs(predicted - measured) <= 0.10 * measured,
                  "predicted %.0f bytes, measured %.0f", predicted, measured);
    json_decref(b);
    json_decref(p);
    tu_rmdir(dir);
}
END_TEST

static Suite *plan_suite(void)
{
    Suite *s = suite_create("plan");
    TCase *unit = tcase_create("arithmetic");
    tcase_set_timeout(unit, 60);
    tcase_add_test(unit, kv_per_token_by_hand);
    tcase_add_test(unit, plan_35b_parts_by_hand);
    tcase_add_test(unit, plan_recipe_reuses_estimate);
    tcase_add_test(unit, vision_params_by_hand);
    tcase_add_test(unit, session_size_matches_session);
    tcase_add_test(unit, parse_sizes);
    suite_add_tcase(s, unit);
    TCase *cli = tcase_create("cli");
    tcase_set_timeout(cli, 300);
    tcase_add_test(cli, cli_json_keys);
    tcase_add_test(cli, cli_errors);
    tcase_add_test(cli, cli_recipe_matches_quantize);
    tcase_add_test(cli, cli_peak_matches_measured_rss);
    suite_add_tcase(s, cli);
    return s;
}

TU_MAIN(plan_suite)

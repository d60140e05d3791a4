/* Recipes: parsing (good files, every bad-line error with its line number), preset resolution on
 * the fixtures' tensor names, and preset bpw on the 35B-A3B geometry. */
#include "formats/config.h"
#include "quant/quantize.h"
#include "quant/recipe.h"
#include "model/geometry.h"
#include "testutil.h"

#define P "model.language_model.layers."

static qmix_qdecision resolve(const qmix_recipe *r, const char *name, int ndim, int64_t a,
                              int64_t b, int64_t c, int is_full, int n_layers)
{
    int64_t shape[3] = {a, b, c};
    return qmix_recipe_resolve(r, name, ndim, shape, is_full, n_layers);
}

START_TEST(parses_a_good_file)
{
    const char *text = "# a recipe\n"
                       "default bits=4 group=64   # trailing comment\n"
                       "\n"
                       "router keep\n"
                       "experts_down first=2 last=2 bits=6 group=32\n"
                       "attn_q,attn_k type=full bits=8\n"
                       "gdn_out layers=1-2 bits=3 group=128\n"
                       "shared_expert match=down_proj bits=5\n";
    qmix_recipe r;
    qmix_err err;
    ck_assert_msg(qmix_recipe_parse(text, "t.recipe", &r, &err) == 0, "%s", err.msg);
    ck_assert_int_eq(r.n_rules, 6);
    qmix_qdecision d;
    d = resolve(&r, P "0.mlp.gate.weight", 2, 8, 64, 0, 0, 8);
    ck_assert_int_eq(d.role, QMIX_ROLE_ROUTER);
    ck_assert_int_eq(d.bits, 0);
    d = resolve(&r, P "0.mlp.experts.down_proj", 3, 8, 64, 64, 0, 8);
    ck_assert_int_eq(d.bits, 6);
    ck_assert_int_eq(d.group, 32);
    d = resolve(&r, P "7.mlp.experts.down_proj", 3, 8, 64, 64, 0, 8);
    ck_assert_int_eq(d.bits, 6);
    d = resolve(&r, P "4.mlp.experts.down_proj", 3, 8, 64, 64, 0, 8);
    ck_assert_int_eq(d.bits, 4);
    ck_assert_int_eq(d.group, 64);
    d = resolve(&r, P "3.self_attn.q_proj.weight", 2, 128, 64, 0, 1, 8);
    ck_assert_int_eq(d.bits, 8);
    d = resolve(&r, P "2.linear_attn.out_proj.weight", 2, 64, 128, 0, 0, 8);
    ck_assert_int_eq(d.bits, 3);
    ck_assert_int_eq(d.group, 128);
    d = resolve(&r, P "3.linear_attn.out_proj.weight", 2, 64, 128, 0, 0, 8);
    ck_assert_int_eq(d.bits, 4);
    d = resolve(&r, P "3.mlp.shared_expert.down_proj.weight", 2, 64, 64, 0, 1, 8);
    ck_assert_int_eq(d.bits, 5);
    d = resolve(&r, P "3.mlp.shared_expert.up_proj.weight", 2, 64, 64, 0, 1, 8);
    ck_assert_int_eq(d.bits, 4);
    /* never quantized: norms, GDN parameters, 1-D, K not divisible by the group */
    d = resolve(&r, P "0.input_layernorm.weight", 1, 64, 0, 0, 0, 8);
    ck_assert_int_eq(d.bits, 0);
    d = resolve(&r, P "0.linear_attn.conv1d.weight", 3, 256, 1, 4, 0, 8);
    ck_assert_int_eq(d.role, QMIX_ROLE_GDN_PARAMS);
    ck_assert_int_eq(d.bits, 0);
    d = resolve(&r, P "0.mlp.shared_expert.gate_proj.weight", 2, 32, 48, 0, 0, 8);
    ck_assert_int_eq(d.bits, 0);
    /* MLX names resolve to the same roles */
    d = resolve(&r, "language_model.model.layers.0.mlp.switch_mlp.down_proj.weight", 3, 8, 64, 64,
                0, 8);
    ck_assert_int_eq(d.role, QMIX_ROLE_EXPERTS_DOWN);
    ck_assert_int_eq(d.bits, 6);
    d = resolve(&r, "language_model.lm_head.weight", 2, 1024, 64, 0, 0, 8);
    ck_assert_int_eq(d.role, QMIX_ROLE_LM_HEAD);
}
END_TEST

static const struct { const char *text; int line; const char *what; } bad[] = {
    {"default bits=4\nroutr keep\n", 2, "unknown role"},
    {"# c\n\ndefault bits=7\n", 3, "bits=7"},
    {"default bits=4 group=48\n", 1, "group=48"},
    {"default group=64\n", 1, "missing bits"},
    {"default bits=4\nrouter keep bits=8\n", 2, "keep"},
    {"default bits=4\nrouter layers=5-2 bits=8\n", 2, "layers="},
    {"default bits=4\nrouter type=mamba bits=8\n", 2, "type="},
    {"default bits=4\n\n\nrouter colour=red bits=8\n", 4, "unknown key"},
    {"default bits=4\nrouter first=0 bits=8\n", 2, "first="},
    {"default bits=4\nrouter bits\n", 2, "KEY=VALUE"},
};

START_TEST(bad_lines_name_their_line)
{
    qmix_recipe r;
    qmix_err err;
    ck_assert_int_eq(qmix_recipe_parse(bad[_i].text, "my.recipe", &r, &err), -1);
    char want[64];
    snprintf(want, sizeof want, "recipe my.recipe:%d: ", bad[_i].line);
    ck_assert_msg(strstr(err.msg, want) == err.msg, "'%s' does not start with '%s'", err.msg,
                  want);
    ck_assert_msg(strstr(err.msg, bad[_i].what) != NULL, "'%s' does not mention '%s'", err.msg,
                  bad[_i].what);
}
END_TEST

START_TEST(file_errors_and_unknown_presets)
{
    qmix_recipe r;
    qmix_err err;
    char *dir = tu_tmpdir();
    char path[600];
    snprintf(path, sizeof path, "%s/r.txt", dir);
    tu_write(path, "default bits=4\nexperts_down bits=9\n", 35);
    ck_assert_int_eq(qmix_recipe_get(path, &r, &err), -1);
    char want[700];
    snprintf(want, sizeof want, "recipe %s:2: ", path);
    ck_assert_msg(strstr(err.msg, want) != NULL, "%s", err.msg);
    ck_assert_int_eq(qmix_recipe_get("uniform-7", &r, &err), -1);
    ck_assert_msg(strstr(err.msg, "unknown preset") != NULL, "%s", err.msg);
    /* a path that does not exist is a missing file, not an unknown preset */
    snprintf(path, sizeof path, "%s/missing.recipe", dir);
    ck_assert_int_eq(qmix_recipe_get(path, &r, &err), -1);
    ck_assert_msg(strstr(err.msg, "No such file") && !strstr(err.msg, "unknown preset"), "%s", err.msg);
    tu_rmdir(dir);
}
END_TEST

START_TEST(presets_on_fixture_names)
{
    qmix_config c;
    qmix_err err;
    ck_assert(qmix_config_load("testdata/fixtures/tiny-b/config.json", &c, &err) == 0);
    int L = c.n_layers;
    qmix_recipe r;
    qmix_qdecision d;
    /* dynamic-2.6 (§6.1): router and shared-expert gate bf16, experts 2, the rest 3 */
    ck_assert(qmix_recipe_preset("dynamic-2.6", &r, &err) == 0);
    ck_assert_int_eq(resolve(&r, P "0.mlp.gate.weight", 2, 16, 64, 0, 0, L).bits, 0);
    ck_assert_int_eq(resolve(&r, P "0.mlp.shared_expert_gate.weight", 2, 1, 64, 0, 0, L).bits, 0);
    ck_assert_int_eq(resolve(&r, P "0.mlp.experts.gate_up_proj", 3, 16, 64, 64, 0, L).bits, 2);
    ck_assert_int_eq(resolve(&r, P "3.self_attn.q_proj.weight", 2, 1024, 64, 0, 1, L).bits, 3);
    ck_assert_int_eq(resolve(&r, P "0.linear_attn.in_proj_qkv.weight", 2, 384, 64, 0, 0, L).bits, 3);
    ck_assert_int_eq(resolve(&r, "model.language_model.embed_tokens.weight", 2, 768, 64, 0, 0, L).bits, 3);
    ck_assert_int_eq(resolve(&r, "lm_head.weight", 2, 768, 64, 0, 0, L).bits, 3);
    ck_assert_int_eq(resolve(&r, P "0.mlp.shared_expert.up_proj.weight", 2, 64, 64, 0, 0, L).bits, 3);
    ck_assert_int_eq(resolve(&r, "model.visual.blocks.0.attn.qkv.weight", 2, 64, 64, 0, 0, L).bits, 0);
    /* uniform-4: mlx-lm default — router and shared-expert gate 8-bit */
    ck_assert(qmix_recipe_preset("uniform-4", &r, &err) == 0);
    ck_assert_int_eq(resolve(&r, P "0.mlp.gate.weight", 2, 16, 64, 0, 0, L).bits, 8);
    ck_assert_int_eq(resolve(&r, P "0.mlp.shared_expert_gate.weight", 2, 1, 64, 0, 0, L).bits, 8);
    ck_assert_int_eq(resolve(&r, P "0.linear_attn.out_proj.weight", 2, 64, 256, 0, 0, L).bits, 4);
    ck_assert_int_eq(resolve(&r, P "0.linear_attn.A_log", 1, 8, 0, 0, 0, L).bits, 0);
    /* experts [E, 64, 32]: K = 32 is not a multiple of 64, kept */
    ck_assert_int_eq(resolve(&r, P "0.mlp.experts.down_proj", 3, 16, 64, 32, 0, L).bits, 0);
    /* experts-4: experts 4-bit group 32 (the down projection too), all else kept */
    ck_assert(qmix_recipe_preset("experts-4", &r, &err) == 0);
    d = resolve(&r, P "0.mlp.experts.down_proj", 3, 16, 64, 32, 0, L);
    ck_assert_int_eq(d.bits, 4);
    ck_assert_int_eq(d.group, 32);
    ck_assert_int_eq(resolve(&r, P "3.self_attn.q_proj.weight", 2, 1024, 64, 0, 1, L).bits, 0);
    /* tiered-4.7: edge layers (first 3, last 3) attention paths 8-bit */
    ck_assert(qmix_recipe_preset("tiered-4.7", &r, &err) == 0);
    ck_assert_int_eq(resolve(&r, P "3.self_attn.q_proj.weight", 2, 1024, 64, 0, 1, L).bits, 6);
    ck_assert_int_eq(resolve(&r, P "7.self_attn.q_proj.weight", 2, 1024, 64, 0, 1, L).bits, 8);
    ck_assert_int_eq(resolve(&r, P "3.self_attn.v_proj.weight", 2, 256, 64, 0, 1, L).bits, 8);
    ck_assert_int_eq(resolve(&r, P "4.linear_attn.in_proj_z.weight", 2, 256, 64, 0, 0, L).bits, 4);
    ck_assert_int_eq(resolve(&r, P "0.linear_attn.in_proj_z.weight", 2, 256, 64, 0, 0, L).bits, 8);
    ck_assert_int_eq(resolve(&r, P "4.mlp.shared_expert.up_proj.weight", 2, 64, 64, 0, 0, L).bits, 6);
    ck_assert_int_eq(resolve(&r, P "4.mlp.gate.weight", 2, 16, 64, 0, 0, L).bits, 0);
    /* unsloth-4: o_proj and GDN out_proj bf16, down +1 bit */
    ck_assert(qmix_recipe_preset("unsloth-4", &r, &err) == 0);
    ck_assert_int_eq(resolve(&r, P "3.self_attn.o_proj.weight", 2, 64, 512, 0, 1, L).bits, 0);
    ck_assert_int_eq(resolve(&r, P "0.linear_attn.out_proj.weight", 2, 64, 256, 0, 0, L).bits, 0);
    ck_assert_int_eq(resolve(&r, P "0.mlp.shared_expert.down_proj.weight", 2, 64, 64, 0, 0, L).bits, 5);
    ck_assert_int_eq(resolve(&r, "lm_head.weight", 2, 768, 64, 0, 0, L).bits, 8);
    ck_assert_int_eq(resolve(&r, P "0.mlp.gate.weight", 2, 16, 64, 0, 0, L).bits, 8);
}
END_TEST

/* Qwen3.5-35B-A3B text geometry. */
static void geometry_35b(qmix_config *c)
{
    qmix_geometry_config(qmix_geometry_find("35b-a3b"), c);
}

START_TEST(preset_bpw_on_35b)
{
    static const struct { const char *name; double lo, hi; } want[] = {
        {"dynamic-2.6", 2.57, 2.59},  /* seed 002: 2.579 text-only */
        {"uniform-2", 2.50, 2.51},    /* seed 002: 2.50 */
        {"uniform-3", 3.50, 3.51},    /* seed 002: 3.50 */
        {"uniform-4", 4.50, 4.51},
        {"uniform-8", 8.50, 8.51},
        {"tiered-4.7", 4.6, 4.75},    /* seed 000 (122B): 4.655 */
        {"experts-4", 5.0, 6.5},
        {"unsloth-4", 4.6, 5.5},
    };
    qmix_config c;
    geometry_35b(&c);
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        qmix_recipe r;
        qmix_quant_report rep;
        qmix_err err;
        ck_assert(qmix_recipe_preset(want[i].name, &r, &err) == 0);
        ck_assert_msg(qmix_quant_estimate(&c, &r, &rep, &err) == 0, "%s", err.msg);
        printf("info: 35B-A3B %-12s %.3f bpw\n", want[i].name, rep.bpw);
        ck_assert_msg(rep.bpw >= want[i].lo && rep.bpw <= want[i].hi, "%s: %.4f bpw not in "
                      "[%g, %g]", want[i].name, rep.bpw, want[i].lo, want[i].hi);
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("recipe");
    TCase *tc = tcase_create("recipe");
    tcase_add_test(tc, parses_a_good_file);
    tcase_add_loop_test(tc, bad_lines_name_their_line, 0, sizeof bad / sizeof bad[0]);
    tcase_add_test(tc, file_errors_and_unknown_presets);
    tcase_add_test(tc, presets_on_fixture_names);
    tcase_add_test(tc, preset_bpw_on_35b);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(suite)

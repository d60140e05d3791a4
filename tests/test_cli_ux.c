/* What the CLI tells a user: --version, info's real parameter counts and precisions in every
 * format, one-line messages for missing arguments and missing recipe files. */
#include <math.h>

#include "testutil.h"

#define DEMO "testdata/demo"

START_TEST(version_says_what_it_is)
{
    char *out = NULL;
    ck_assert_int_eq(tu_run_out(&out, "--version"), 0);
    ck_assert_msg(strstr(out, "version: 0.") && strstr(out, "revision: ") &&
                      strstr(out, "compiler: ") && strstr(out, "simd: scalar") &&
                      strstr(out, "simd used: "), "%s", out);
    free(out);
    tu_expect("--help", 0, "--version");
}
END_TEST

/* info --json of path: role → parameters, role → precision */
static json_t *info(const char *path)
{
    char *out = NULL;
    ck_assert_msg(tu_run_out(&out, "info '%s' --json", path) == 0, "info %s failed", path);
    json_t *j = tu_json(out);
    free(out);
    return j;
}

static json_t *role(json_t *info_json, const char *name)
{
    json_t *roles = json_object_get(info_json, "roles"), *r;
    size_t i;
    json_array_foreach(roles, i, r)
        if (!strcmp(json_string_value(json_object_get(r, "role")), name)) return r;
    return NULL;
}

/* Every matrix role of a quantized checkpoint has the parameters of the bf16 original (not packed
 * words), whatever the format, and says its precision. */
START_TEST(info_counts_real_parameters)
{
    char *dir = tu_tmpdir(), mlx[600], gguf[600], gptq[600], recipe[600];
    snprintf(mlx, sizeof mlx, "%s/mlx", dir);
    snprintf(gguf, sizeof gguf, "%s/q8.gguf", dir);
    snprintf(gptq, sizeof gptq, "%s/gptq", dir);
    snprintf(recipe, sizeof recipe, "%s/g.recipe", dir);
    /* GPTQ packs zeros per 8 outputs at 4 bits: the 4-output GDN a/b stay 16-bit */
    tu_write(recipe, "default bits=4 group=64\ngdn_a keep\ngdn_b keep\n", 46);
    ck_assert_int_eq(tu_run_out(NULL, "quantize " DEMO " '%s' --recipe dynamic-2.6 --quiet", mlx), 0);
    ck_assert_int_eq(tu_run_out(NULL, "convert " DEMO " '%s' --to gguf --type q8_0 --quiet", gguf), 0);
    ck_assert_int_eq(tu_run_out(NULL, "quantize " DEMO " '%s' --format gptq --recipe '%s' --quiet",
                                gptq, recipe), 0);
    json_t *base = info(DEMO), *q[3] = {info(mlx), info(gguf), info(gptq)};
    const char *roles[] = {"embed", "lm_head", "attn_q", "gdn_qkv", "shared_expert",
                           "experts_gate_up", "experts_down"};
    const char *want_prec[3][7] = {
        {"3-bit g64", "3-bit g64", "3-bit g64", "3-bit g64", "3-bit g64", "2-bit g64", "2-bit g64"},
        {"Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0"},
        {"4-bit g64", "4-bit g64", "4-bit g64", "4-bit g64", "4-bit g64", "4-bit g64", "4-bit g64"}};
    for (int f = 0; f < 3; f++)
        for (size_t k = 0; k < sizeof roles / sizeof roles[0]; k++) {
            json_t *b = role(base, roles[k]), *r = role(q[f], roles[k]);
            ck_assert_msg(b && r, "format %d: no role %s", f, roles[k]);
            ck_assert_int_eq(json_integer_value(json_object_get(r, "parameters")),
                             json_integer_value(json_object_get(b, "parameters")));
            const char *prec = json_string_value(json_object_get(r, "precision"));
            /* the GPTQ writer keeps the tied-size embedding 16-bit: only its matrices say bits */
            if (f == 2 && !strcmp(roles[k], "embed")) continue;
            ck_assert_msg(prec && !strcmp(prec, want_prec[f][k]), "format %d role %s: '%s'", f,
                          roles[k], prec ? prec : "(none)");
        }
    /* the MLX total is mlx-lm's parameter count: bits per weight as it reports them */
    double bpw = json_number_value(json_object_get(q[0], "bits_per_weight"));
    ck_assert_msg(bpw > 2.9 && bpw < 3.1, "MLX dynamic-2.6 bpw %.3f", bpw);
    ck_assert_msg(json_number_value(json_object_get(base, "bits_per_weight")) == 16.0, "bf16 bpw");
    /* compare's default threshold follows the bits: a healthy 2/3-bit quant passes, and an
     * explicit --min-cosine still fails it */
    char args[800];
    snprintf(args, sizeof args, "compare " DEMO " '%s'", mlx);
    tu_expect(args, 0, "pass");
    snprintf(args, sizeof args, "compare " DEMO " '%s' --min-cosine 0.995", mlx);
    tu_expect(args, 1, "below their threshold");
    json_decref(base);
    for (int f = 0; f < 3; f++) json_decref(q[f]);
    tu_rmdir(dir);
}
END_TEST

/* A missing positional argument: one line that names it, not the whole usage */
START_TEST(missing_arguments_are_named)
{
    const struct { const char *args, *want; } cases[] = {
        {"info", "missing MODEL"},
        {"generate", "missing MODEL"},
        {"quantize " DEMO, "missing OUT"},
        {"quantize " DEMO " /tmp/qmix-never-written", "missing --recipe"},
        {"kld", "missing BASE and QUANT"},
        {"compare " DEMO, "missing the second checkpoint"},
        {"convert " DEMO " /tmp/qmix-never.gguf", "missing --to"},
        {"logits " DEMO, "missing --out FILE"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tu_run_result r = tu_run(cases[i].args);
        ck_assert_msg(r.status == 2, "qmix %s: exit %d", cases[i].args, r.status);
        ck_assert_msg(strstr(r.err, cases[i].want), "qmix %s: %s", cases[i].args, r.err);
        int lines = 0;
        for (const char *p = r.err; *p; p++) lines += *p == '\n';
        ck_assert_msg(lines <= 2, "qmix %s: %d lines:\n%s", cases[i].args, lines, r.err);
        tu_run_free(&r);
    }
}
END_TEST

START_TEST(missing_recipe_file_is_not_an_unknown_preset)
{
    tu_run_result r = tu_run("quantize " DEMO " /tmp/qmix-never-written --recipe ./no-such.recipe");
    ck_assert_int_eq(r.status, 1);
    ck_assert_msg(strstr(r.err, "No such file") && !strstr(r.err, "unknown preset"), "%s", r.err);
    tu_run_free(&r);
}
END_TEST

/* Without calibration text sensitivity measures weight error only: it says so instead of
 * printing a recipe built on it, and refuses --recipe-out */
START_TEST(sensitivity_without_text_suggests_nothing)
{
    tu_run_result r = tu_run("sensitivity testdata/fixtures/tiny-b --bits 2,4 --group-size 32 --quiet");
    ck_assert_msg(r.status == 0, "%s", r.err);
    ck_assert_msg(strstr(r.out, "No suggested recipe") && !strstr(r.out, "# suggested by"), "%s", r.out);
    tu_run_free(&r);
    r = tu_run("sensitivity testdata/fixtures/tiny-b --bits 2,4 --group-size 32 --quiet --json");
    ck_assert_msg(r.status == 0, "%s", r.err);
    json_t *j = tu_json(r.out);
    ck_assert(json_is_null(json_object_get(j, "suggested_recipe")));
    json_decref(j);
    tu_run_free(&r);
    tu_expect("sensitivity testdata/fixtures/tiny-b --recipe-out /tmp/qmix-never.recipe", 2,
              "needs calibration text");
}
END_TEST

/* convert ends with a summary, and says when the requested block type did not fit the rows */
START_TEST(convert_summarises_and_names_fallbacks)
{
    char *dir = tu_tmpdir(), *out = NULL;
    ck_assert_int_eq(tu_run_out(&out, "convert " DEMO " '%s/q4k.gguf' --to gguf --type q4_k", dir), 0);
    ck_assert_msg(strstr(out, "bits per weight") && strstr(out, "experts_down"), "%s", out);
    /* the demo's 128-wide rows cannot take 256-value K-quant blocks */
    ck_assert_msg(strstr(out, "written as Q5_0"), "%s", out);
    free(out);
    tu_rmdir(dir);
}
END_TEST

/* generated text ends with a newline like any text output (the status goes to stderr) */
START_TEST(generate_text_ends_a_line)
{
    char *out = NULL;
    ck_assert_int_eq(tu_run_out(&out, "generate " DEMO " -p 'The package manager' -n 6 --temp 0"), 0);
    size_t n = strlen(out);
    ck_assert_msg(n > 1 && out[n - 1] == '\n' && out[n - 2] != '\n', "'%s'", out);
    free(out);
}
END_TEST

/* a plan that does not fit names the built-in recipe that would */
START_TEST(plan_names_a_recipe_that_fits)
{
    tu_expect("plan --like 35b-a3b --memory 16G --reserve 3.5G", 0,
              "The built-in recipe with the most bits that fits is dynamic-2.6");
    tu_expect("plan --like 397b-a17b --memory 16G", 0, "no built-in recipe fits either");
}
END_TEST

/* ppl --score second-half scores like llama-perplexity: only the second half of each window.
 * The expected value is computed here from `qmix logits` of each window (a different command
 * and code path), in double precision. */
START_TEST(ppl_second_half_matches_independent_nll)
{
    enum { CTX = 16, WINDOWS = 3 };
    size_t n_ids = 0;
    char *ids_text = tu_read("testdata/fixtures/tiny-b/golden/tokens.txt", NULL);
    int ids[64];
    for (char *p = ids_text, *end; n_ids < 64; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p) break;
        ids[n_ids++] = (int)v;
    }
    free(ids_text);
    ck_assert_int_ge(n_ids, CTX * WINDOWS);
    char *dir = tu_tmpdir(), path[600], spec[512];
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    double nll = 0;
    int scored = 0, vocab = 0;
    for (int w = 0; w < WINDOWS; w++) {
        size_t off = 0;
        for (int i = 0; i < CTX; i++)
            off += (size_t)snprintf(spec + off, sizeof spec - off, "%s%d", i ? " " : "", ids[w * CTX + i]);
        ck_assert_int_eq(tu_run_out(NULL, "logits testdata/fixtures/tiny-b --tokens '%s' --out '%s'",
                                    spec, path), 0);
        size_t bytes;
        float *lg = tu_read(path, &bytes);
        vocab = (int)(bytes / sizeof(float) / CTX);
        for (int row = CTX / 2; row < CTX - 1; row++) {
            const float *r = lg + (size_t)row * vocab;
            double mx = r[0], sum = 0;
            for (int v = 1; v < vocab; v++) mx = r[v] > mx ? r[v] : mx;
            for (int v = 0; v < vocab; v++) sum += exp((double)r[v] - mx);
            nll += mx + log(sum) - r[ids[w * CTX + row + 1]];
            scored++;
        }
        free(lg);
    }
    ck_assert_int_gt(vocab, 0);
    char *out = NULL;
    ck_assert_int_eq(tu_run_out(&out, "ppl testdata/fixtures/tiny-b --tokens "
                                "testdata/fixtures/tiny-b/golden/tokens.txt --ctx %d --windows %d "
                                "--score second-half --json", CTX, WINDOWS), 0);
    json_t *j = tu_json(out);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "tokens")), scored);
    double got = json_number_value(json_object_get(j, "nll")), want = nll / scored;
    ck_assert_msg(fabs(got - want) < 1e-4 * fabs(want) + 1e-5, "nll %.7f vs %.7f", got, want);
    /* and it differs from scoring every token (the first half has less context) */
    free(out);
    ck_assert_int_eq(tu_run_out(&out, "ppl testdata/fixtures/tiny-b --tokens "
                                "testdata/fixtures/tiny-b/golden/tokens.txt --ctx %d --windows %d "
                                "--json", CTX, WINDOWS), 0);
    json_t *all = tu_json(out);
    ck_assert_int_eq(json_integer_value(json_object_get(all, "tokens")), WINDOWS * (CTX - 1));
    ck_assert(json_number_value(json_object_get(all, "nll")) != got);
    json_decref(all);
    json_decref(j);
    free(out);
    tu_rmdir(dir);
}
END_TEST

/* a KLD against a saved top-k base is a lower bound, and says so; the exact one does not */
START_TEST(kld_from_saved_base_says_lower_bound)
{
    char *dir = tu_tmpdir(), *out = NULL;
    ck_assert_int_eq(tu_run_out(NULL, "quantize testdata/fixtures/tiny-b '%s/q' --recipe uniform-4 "
                                "--quiet", dir), 0);
    ck_assert_int_eq(tu_run_out(NULL, "kld testdata/fixtures/tiny-b --save-base '%s/b.kld' --tokens "
                                "testdata/fixtures/tiny-b/golden/tokens.txt --ctx 16 --top-k 8",
                                dir), 0);
    ck_assert_int_eq(tu_run_out(&out, "kld --base-logits '%s/b.kld' '%s/q'", dir, dir), 0);
    ck_assert_msg(strstr(out, "lower bound") && strstr(out, "| ≥ "), "%s", out);
    free(out);
    ck_assert_int_eq(tu_run_out(&out, "kld --base-logits '%s/b.kld' '%s/q' --json", dir, dir), 0);
    json_t *j = tu_json(out);
    ck_assert(json_is_true(json_object_get(j, "lower_bound")));
    json_decref(j);
    free(out);
    ck_assert_int_eq(tu_run_out(&out, "kld testdata/fixtures/tiny-b '%s/q' --tokens "
                                "testdata/fixtures/tiny-b/golden/tokens.txt --ctx 16", dir), 0);
    ck_assert_msg(!strstr(out, "lower bound") && strstr(out, "exact"), "%s", out);
    free(out);
    tu_rmdir(dir);
}
END_TEST

static int count(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

/* --plot draws SVG pictures: one bar per role and width for sensitivity, a histogram with the
 * median and p99 marked for kld */
START_TEST(plots_are_svg_pictures_of_the_numbers)
{
    char *dir = tu_tmpdir(), *svg;
    ck_assert_int_eq(tu_run_out(NULL, "sensitivity testdata/fixtures/tiny-b --bits 2,4 --group-size 32 "
                                "--tokens testdata/fixtures/tiny-b/golden/tokens.txt --ctx 16 --quiet "
                                "--plot '%s/s.svg'", dir), 0);
    char path[600];
    snprintf(path, sizeof path, "%s/s.svg", dir);
    svg = tu_read(path, NULL);
    ck_assert_msg(!strncmp(svg, "<svg", 4) && strstr(svg, "</svg>"), "%.200s", svg);
    ck_assert_msg(strstr(svg, "experts_gate_up") && strstr(svg, "2-bit") && strstr(svg, "4-bit"),
                  "%.400s", svg);
    /* the bars: two per plotted role (16 quantizable roles on tiny-b at group 32), each with its
     * value as a tooltip */
    ck_assert_int_eq(count(svg, "<title>"), 2 * 16);
    free(svg);
    ck_assert_int_eq(tu_run_out(NULL, "kld testdata/fixtures/tiny-b testdata/fixtures/tiny-b --tokens "
                                "testdata/fixtures/tiny-b/golden/tokens.txt --ctx 16 --plot '%s/k.svg'",
                                dir), 0);
    snprintf(path, sizeof path, "%s/k.svg", dir);
    svg = tu_read(path, NULL);
    /* a model against itself: every token's KLD is 0, below the drawn range */
    ck_assert_msg(strstr(svg, "45 tokens; 45 with KLD below 1e-6"), "%.400s", svg);
    free(svg);
    tu_rmdir(dir);
}
END_TEST

static Suite *cli_ux_suite(void)
{
    Suite *s = suite_create("cli_ux");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, version_says_what_it_is);
    tcase_add_test(tc, info_counts_real_parameters);
    tcase_add_test(tc, missing_arguments_are_named);
    tcase_add_test(tc, missing_recipe_file_is_not_an_unknown_preset);
    tcase_add_test(tc, sensitivity_without_text_suggests_nothing);
    tcase_add_test(tc, convert_summarises_and_names_fallbacks);
    tcase_add_test(tc, generate_text_ends_a_line);
    tcase_add_test(tc, plan_names_a_recipe_that_fits);
    tcase_add_test(tc, ppl_second_half_matches_independent_nll);
    tcase_add_test(tc, kld_from_saved_base_says_lower_bound);
    tcase_add_test(tc, plots_are_svg_pictures_of_the_numbers);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(cli_ux_suite)

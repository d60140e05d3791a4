/* qmix sensitivity: per tensor role (or role and layer), the error quantizing that role alone
 * adds, as a table sorted most sensitive first (seed 002's shape), then a recipe built from it. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/plot.h"
#include "util/err.h"
#include "cli/commands.h"
#include "eval/sensitivity.h"
#include "quant/calib.h"
#include "quant/recipe.h"
#include "util/fileio.h"

#define CMD "sensitivity"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix sensitivity MODEL [--bits 2,3,4] [--group-size 64]\n"
            "                        [--calib FILE | --tokens FILE] [--ctx 512] [--windows 8]\n"
            "                        [--per-layer] [--sample N] [--json] [--threads N]\n"
            "                        [--target-bits X] [--recipe-out FILE] [--quiet]\n"
            "                        [--method rtn|gptq|imatrix --stats STATS] [--gguf]\n\n"
            "For every tensor role (embed, lm_head, attention, GDN projections, router, shared\n"
            "expert and its gate, routed experts), quantizes that role ALONE (MLX affine, bf16\n"
            "scales; round to nearest unless --method says) in memory and measures the error it\n"
            "adds:\n"
            "  weight error   ||W - Q(W)|| / ||W|| over the role's matrices (always);\n"
            "  output error   ||(W - Q(W))x|| / ||Wx|| on the calibration activations x;\n"
            "  KLD            mean KL(base || model with the role quantized) per calibration token.\n"
            "Rows are sorted most sensitive first (by KLD at the lowest bits when measured);\n"
            "with calibration text a suggested recipe (docs/recipes.md format) follows. Norms and\n"
            "GDN parameters are kept at 16 bits by every recipe and are not measured.\n\n"
            "  --bits LIST        bit widths to try, from 2,3,4,5,6,8 (default 2,3,4)\n"
            "  --group-size G     32, 64 or 128 (default 64)\n"
            "  --calib FILE       calibration text, tokenized with the model's tokenizer\n"
            "  --tokens FILE      calibration token ids instead (whitespace-separated)\n"
            "  --ctx N            tokens per calibration window (default 512)\n"
            "  --windows N        calibration windows used, 0 = all the text holds (default 8)\n"
            "  --per-layer        one row per role and layer\n"
            "  --sample N         measure N layers per role (evenly spaced) and N experts per\n"
            "                     layer, and estimate the time of a full run\n"
            "  --json             one JSON object instead of the table\n"
            "  --threads N        threads (default: all cores)\n"
            "  --target-bits X    code bits per weight the suggested recipe may spend on average\n"
            "                     (before scales; default: the lowest --bits + 0.25)\n"
            "  --recipe-out FILE  also write the suggested recipe to FILE\n"
            "  --plot FILE.svg    also draw each role's cost at each width as bars on a log\n"
            "                     scale (KLD with calibration text, else weight error)\n"
            "  --method M         rtn (default), gptq or imatrix: quantize each role as qmix\n"
            "                     quantize --method M would (GPTQ with its RTN failsafe below 0.5%%\n"
            "                     of the calibration tokens), with the statistics of --stats\n"
            "  --stats STATS      statistics from qmix calibrate (for gptq and imatrix)\n"
            "  --gguf             measure GGUF block types instead (for qmix quantize --format\n"
            "                     gguf --sensitivity): each width is the type the GGUF writer\n"
            "                     gives it (2 Q2_K, 3 Q3_K, 4 Q4_K, 5 Q5_K, 6 Q6_K, 8 Q8_0), with\n"
            "                     its fallback for rows a K-quant block does not divide (Q5_0,\n"
            "                     Q5_1, Q8_0, Q4_0); rtn or imatrix\n"
            "  --quiet            no progress on stderr\n\n"
            "Ctrl-C stops the run and prints what was measured so far.\n");
}

static int parse_bits(const char *v, int *bits, int *n)
{
    *n = 0;
    const char *p = v;
    while (*p) {
        char *end;
        long b = strtol(p, &end, 10);
        if (end == p || (*end && *end != ',') || *n == QMIX_SENS_MAX_BITS) return -1;
        if (b != 2 && b != 3 && b != 4 && b != 5 && b != 6 && b != 8) return -1;
        for (int i = 0; i < *n; i++)
            if (bits[i] == b) return -1;
        bits[(*n)++] = (int)b;
        p = *end ? end + 1 : end;
        if (*end == ',' && !*p) return -1;
    }
    return *n ? 0 : -1;
}

static void progress(void *user, int64_t done, int64_t total)
{
    cli_progress("measuring", done, total, *(const double *)user);
}

static void fmt_params(int64_t p, char *buf, size_t len)
{
    if (p < 10000) snprintf(buf, len, "%lld", (long long)p);
    else if (p < 10000000) snprintf(buf, len, "%.1fK", p / 1e3);
    else if (p < 10000000000LL) snprintf(buf, len, "%.1fM", p / 1e6);
    else snprintf(buf, len, "%.2fB", p / 1e9);
}

static void fmt_num(double x, int kld, char *buf, size_t len)
{
    if (isnan(x)) snprintf(buf, len, "-");
    else if (kld) snprintf(buf, len, x != 0 && x < 1e-3 ? "%.2e" : "%.4f", x);
    else snprintf(buf, len, "%.4f", x);
}

static void fmt_time(double s, char *buf, size_t len)
{
    if (s < 120) snprintf(buf, len, "%.1f s", s);
    else if (s < 7200) snprintf(buf, len, "%.1f min", s / 60);
    else snprintf(buf, len, "%.1f h", s / 3600);
}

static void component(const qmix_sens_row *row, char *buf, size_t len)
{
    if (row->layer >= 0) snprintf(buf, len, "%s L%d", qmix_role_name(row->role), row->layer);
    else snprintf(buf, len, "%s", qmix_role_name(row->role));
}

static int row_measured(const qmix_sens_row *row)
{
    return row->quantizable && row->cell[0].has_weight;
}

static void print_table(const char *model, const qmix_sens_result *r, const char *recipe)
{
    char buf[64], t1[32], t2[32];
    if (r->gguf)
        printf("qmix sensitivity: %s: GGUF blocks by %s, bits", model,
               r->method == QMIX_METHOD_RTN ? "round to nearest" : qmix_method_name(r->method));
    else
        printf("qmix sensitivity: %s: MLX affine by %s, group %d, bits", model,
               r->method == QMIX_METHOD_RTN ? "round to nearest" : qmix_method_name(r->method),
               r->group_size);
    for (int b = 0; b < r->n_bits; b++) printf("%s%d", b ? "," : " ", r->bits[b]);
    if (r->has_calib)
        printf("; calibration %lld tokens (%d windows of %d), base logits %s\n",
               (long long)r->calib_rows, r->n_windows, r->ctx, r->base_topk ? "top-k" : "whole");
    else
        printf("; no calibration (weight error only)\n");
    if (r->sample > 0)
        printf("sampled: %d layers per role, %d experts per layer (KLD and output error are "
               "those of the sampled matrices)\n", r->sample, r->sample);
    int calib = r->has_calib;
    printf("\n| Component |");
    for (int b = 0; b < r->n_bits; b++) printf(" %d-bit Error |", r->bits[b]);
    if (calib) {
        for (int b = 0; b < r->n_bits; b++) printf(" %d-bit W.Err |", r->bits[b]);
        for (int b = 0; b < r->n_bits; b++) printf(" %d-bit KLD |", r->bits[b]);
    }
    printf(" Params |\n|---|");
    for (int b = 0; b < r->n_bits * (calib ? 3 : 1); b++) printf("---|");
    printf("---|\n");
    int skipped = 0;
    for (int k = 0; k < r->n_rows; k++) {
        const qmix_sens_row *row = &r->rows[k];
        if (!row_measured(row)) {
            skipped += row->quantizable;
            continue;
        }
        component(row, buf, sizeof buf);
        printf("| %s |", buf);
        for (int b = 0; b < r->n_bits; b++) {
            const qmix_sens_cell *c = &row->cell[b];
            fmt_num(calib ? qmix_sens_output_error(c) : qmix_sens_weight_error(c), 0, buf,
                    sizeof buf);
            printf(" %s |", buf);
        }
        if (calib) {
            for (int b = 0; b < r->n_bits; b++) {
                fmt_num(qmix_sens_weight_error(&row->cell[b]), 0, buf, sizeof buf);
                printf(" %s |", buf);
            }
            for (int b = 0; b < r->n_bits; b++) {
                fmt_num(qmix_sens_kld(&row->cell[b]), 1, buf, sizeof buf);
                printf(" %s |", buf);
            }
        }
        fmt_params(row->params, buf, sizeof buf);
        printf(" %s |\n", buf);
    }
    printf("\n");
    if (calib)
        printf("Error: relative output error ||(W-Q(W))x|| / ||Wx|| on the calibration "
               "activations; W.Err: relative\nweight error ||W-Q(W)|| / ||W||; KLD: mean "
               "KL(base || role quantized) in nats per token. Sorted by the\nlowest-bit KLD.\n");
    else
        printf("Error: relative weight error ||W-Q(W)|| / ||W||. Sorted by the lowest-bit "
               "error.\n");
    printf("Kept at 16 bits by every recipe (not measured): ");
    for (int k = 0; k < qmix_sens_n_kept_roles; k++)
        printf("%s%s", k ? ", " : "", qmix_role_name(qmix_sens_kept_roles[k]));
    printf(".\n");
    int first = 1;
    for (int k = 0; k < r->n_rows; k++) {
        const qmix_sens_row *row = &r->rows[k];
        if (row->quantizable) continue;
        component(row, buf, sizeof buf);
        printf("%s%s (input dim %lld)", first ? "Not quantizable at this group size (kept): " : ", ",
               buf, (long long)row->in_dim);
        first = 0;
    }
    if (!first) printf(".\n");
    fmt_time(r->elapsed_s, t1, sizeof t1);
    if (r->stopped) printf("Interrupted: %d row(s) not measured.\n", skipped);
    if (r->sample > 0 && !r->stopped) {
        fmt_time(r->full_estimate_s, t2, sizeof t2);
        printf("Elapsed %s; a full run (every layer and expert) would take about %s.\n", t1, t2);
    } else {
        printf("Elapsed %s.\n", t1);
    }
    if (r->has_calib)
        printf("\n%s", recipe);
    else /* weight error alone ranks roles by how far their weights move, not by what that
          * costs the model's outputs: a recipe built on it would mislead */
        printf("\nNo suggested recipe: without calibration text (--calib TEXT) only weight error "
               "is measured,\nwhich does not say what quantizing a role costs the model.\n");
}

static json_t *num_or_null(double x) { return isnan(x) ? json_null() : json_real(x); }

static void print_json(const char *model, const qmix_sens_result *r, const char *recipe)
{
    json_t *o = json_object(), *bits = json_array(), *rows = json_array(), *kept = json_array();
    json_object_set_new(o, "model", json_string(model));
    for (int b = 0; b < r->n_bits; b++) json_array_append_new(bits, json_integer(r->bits[b]));
    json_object_set_new(o, "bits", bits);
    json_object_set_new(o, "group_size", json_integer(r->group_size));
    json_object_set_new(o, "method", json_string(qmix_method_name(r->method)));
    json_object_set_new(o, "format", json_string(r->gguf ? "gguf" : "mlx"));
    json_object_set_new(o, "per_layer", json_boolean(r->per_layer));
    json_object_set_new(o, "sample", r->sample > 0 ? json_integer(r->sample) : json_null());
    if (r->has_calib) {
        json_t *c = json_object();
        json_object_set_new(c, "tokens_scored", json_integer(r->calib_rows));
        json_object_set_new(c, "windows", json_integer(r->n_windows));
        json_object_set_new(c, "ctx", json_integer(r->ctx));
        json_object_set_new(c, "base_topk", r->base_topk ? json_integer(r->base_topk) : json_null());
        json_object_set_new(o, "calibration", c);
    } else {
        json_object_set_new(o, "calibration", json_null());
    }
    for (int k = 0; k < qmix_sens_n_kept_roles; k++)
        json_array_append_new(kept, json_string(qmix_role_name(qmix_sens_kept_roles[k])));
    json_object_set_new(o, "kept_roles", kept);
    for (int k = 0; k < r->n_rows; k++) {
        const qmix_sens_row *row = &r->rows[k];
        json_t *jr = json_object(), *jb = json_object();
        json_object_set_new(jr, "role", json_string(qmix_role_name(row->role)));
        json_object_set_new(jr, "layer", row->layer >= 0 ? json_integer(row->layer) : json_null());
        json_object_set_new(jr, "quantizable", json_boolean(row->quantizable));
        json_object_set_new(jr, "params", json_integer(row->params));
        json_object_set_new(jr, "params_measured", json_integer(row->params_measured));
        for (int b = 0; b < r->n_bits; b++) {
            const qmix_sens_cell *c = &row->cell[b];
            json_t *jc = json_object();
            char key[8];
            snprintf(key, sizeof key, "%d", r->bits[b]);
            json_object_set_new(jc, "weight_error", num_or_null(qmix_sens_weight_error(c)));
            json_object_set_new(jc, "output_error", num_or_null(qmix_sens_output_error(c)));
            json_object_set_new(jc, "kld", num_or_null(qmix_sens_kld(c)));
            json_object_set_new(jb, key, jc);
        }
        json_object_set_new(jr, "bits", jb);
        json_array_append_new(rows, jr);
    }
    json_object_set_new(o, "rows", rows);
    json_object_set_new(o, "elapsed_s", json_real(r->elapsed_s));
    json_object_set_new(o, "full_run_estimate_s",
                        r->sample > 0 && !r->stopped ? json_real(r->full_estimate_s) : json_null());
    json_object_set_new(o, "stopped", json_boolean(r->stopped));
    json_object_set_new(o, "suggested_recipe", r->has_calib ? json_string(recipe) : json_null());
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
    if (text) printf("%s\n", text);
    free(text);
    json_decref(o);
}

/* One bar group per row (role, or role and layer), one bar per width: what quantizing it alone
 * costs, most sensitive first as the table. */
static int plot_rows(const char *path, const char *model, const qmix_sens_result *r, qmix_err *err)
{
    int n_series = r->n_bits < 6 ? r->n_bits : 6, n = 0;
    const char **rows = calloc((size_t)r->n_rows + 1, sizeof *rows);
    char (*names)[48] = calloc((size_t)r->n_rows + 1, sizeof *names);
    double *values = calloc((size_t)(r->n_rows + 1) * (size_t)n_series, sizeof *values);
    char series[6][16];
    const char *series_p[6];
    int rc = -1;
    if (!rows || !names || !values) {
        qmix_errf(err, "out of memory");
        goto done;
    }
    for (int s = 0; s < n_series; s++) {
        snprintf(series[s], sizeof series[s], "%d-bit", r->bits[s]);
        series_p[s] = series[s];
    }
    for (int k = 0; k < r->n_rows; k++) {
        const qmix_sens_row *row = &r->rows[k];
        if (!row->quantizable) continue;
        if (row->layer >= 0)
            snprintf(names[n], sizeof names[n], "%s L%d", qmix_role_name(row->role), row->layer);
        else
            snprintf(names[n], sizeof names[n], "%s", qmix_role_name(row->role));
        rows[n] = names[n];
        for (int s = 0; s < n_series; s++)
            values[n * n_series + s] = r->has_calib ? qmix_sens_kld(&row->cell[s])
                                                    : qmix_sens_weight_error(&row->cell[s]);
        n++;
    }
    char title[600];
    snprintf(title, sizeof title, "Sensitivity of %s by role", model);
    rc = cli_plot_bars(path, title,
                       r->has_calib ? "KLD with the role alone quantized (log scale)"
                                    : "relative weight error (log scale; no calibration text)",
                       rows, n, series_p, n_series, values, err);
    if (!rc) fprintf(stderr, "qmix %s: drew %s\n", CMD, path);
done:
    free(rows);
    free(names);
    free(values);
    return rc;
}

int qmix_cmd_sensitivity(int argc, char **argv)
{
    const char *model_path = NULL, *calib = NULL, *token_file = NULL, *recipe_out = NULL,
               *stats = NULL, *plot = NULL;
    long group = 64, ctx = 512, windows = 8, sample = 0, threads = 0;
    double target = 0;
    int json = 0, per_layer = 0, quiet = 0;
    qmix_sens_opts o = {.bits = {2, 3, 4}, .n_bits = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--bits")) {
            if (!(v = cli_value(CMD, argc, argv, &i))) return 2;
            if (parse_bits(v, o.bits, &o.n_bits)) {
                fprintf(stderr, "qmix %s: --bits '%s': give distinct widths from 2,3,4,5,6,8 "
                        "separated by commas (at most %d)\n", CMD, v, QMIX_SENS_MAX_BITS);
                return 2;
            }
        } else if (!strcmp(a, "--group-size")) {
            if (!(v = cli_value(CMD, argc, argv, &i)) || cli_int(CMD, a, v, 1, 1 << 20, &group))
                return 2;
            if (group != 32 && group != 64 && group != 128) {
                fprintf(stderr, "qmix %s: --group-size must be 32, 64 or 128\n", CMD);
                return 2;
            }
        } else if (!strcmp(a, "--calib")) {
            if (!(calib = cli_value(CMD, argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--tokens")) {
            if (!(token_file = cli_value(CMD, argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = cli_value(CMD, argc, argv, &i)) || cli_int(CMD, a, v, 2, 1 << 20, &ctx))
                return 2;
        } else if (!strcmp(a, "--windows")) {
            if (!(v = cli_value(CMD, argc, argv, &i)) || cli_int(CMD, a, v, 0, 1 << 30, &windows))
                return 2;
        } else if (!strcmp(a, "--sample")) {
            if (!(v = cli_value(CMD, argc, argv, &i)) || cli_int(CMD, a, v, 1, 1 << 20, &sample))
                return 2;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = cli_value(CMD, argc, argv, &i)) || cli_int(CMD, a, v, 1, 1024, &threads))
                return 2;
        } else if (!strcmp(a, "--target-bits")) {
            if (!(v = cli_value(CMD, argc, argv, &i)) || cli_double(CMD, a, v, &target)) return 2;
            if (!(target >= 2 && target <= 16)) {
                fprintf(stderr, "qmix %s: --target-bits must be between 2 and 16\n", CMD);
                return 2;
            }
        } else if (!strcmp(a, "--plot")) {
            if (!(plot = cli_value(CMD, argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--recipe-out")) {
            if (!(recipe_out = cli_value(CMD, argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--stats")) {
            if (!(stats = cli_value(CMD, argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--method")) {
            if (!(v = cli_value(CMD, argc, argv, &i))) return 2;
            o.method = qmix_method_parse(v);
            if (o.method != QMIX_METHOD_RTN && o.method != QMIX_METHOD_GPTQ &&
                o.method != QMIX_METHOD_IMATRIX) {
                fprintf(stderr, "qmix %s: --method must be rtn, gptq or imatrix\n", CMD);
                return 2;
            }
        } else if (!strcmp(a, "--per-layer")) {
            per_layer = 1;
        } else if (!strcmp(a, "--gguf")) {
            o.gguf = 1;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--quiet")) {
            quiet = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix %s: unknown option '%s' (see --help)\n", CMD, a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix %s: unexpected argument '%s'\n", CMD, a);
            return 2;
        }
    }
    if (!model_path) return cli_missing("sensitivity", "MODEL");
    if (calib && token_file) {
        fprintf(stderr, "qmix %s: give --calib or --tokens, not both\n", CMD);
        return 2;
    }
    if (recipe_out && !calib && !token_file) {
        fprintf(stderr, "qmix %s: --recipe-out needs calibration text (--calib TEXT or --tokens "
                "FILE): weight error alone does not say what a role costs the model\n", CMD);
        return 2;
    }

    if ((o.method == QMIX_METHOD_GPTQ || o.method == QMIX_METHOD_IMATRIX) && !stats) {
        fprintf(stderr, "qmix %s: --method %s needs --stats (from qmix calibrate)\n", CMD,
                qmix_method_name(o.method));
        return 2;
    }

    int32_t *tokens = NULL;
    int64_t n_tokens = 0;
    if ((calib || token_file) &&
        cli_eval_tokens(CMD, model_path, calib, token_file, &tokens, &n_tokens))
        return 1;
    qmix_err err;
    qmix_model *m = NULL;
    qmix_calib *cstats = NULL;
    if (stats && qmix_calib_open(stats, &cstats, &err)) {
        fprintf(stderr, "qmix %s: --stats: %s\n", CMD, err.msg);
        free(tokens);
        return 1;
    }
    if (qmix_model_open(model_path, &m, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        qmix_calib_close(cstats);
        free(tokens);
        return 1;
    }
    o.calib = cstats;
    /* GPTQ's RTN failsafe at qmix quantize's default */
    if (cstats) o.min_tokens = qmix_calib_failsafe_rows(qmix_calib_tokens(cstats), -1);
    double t_start = cli_now();
    o.group_size = o.gguf ? 32 : (int)group; /* GGUF blocks: 32 or 256, never 64 */
    o.per_layer = per_layer;
    o.sample = (int)sample;
    o.tokens = tokens;
    o.n_tokens = n_tokens;
    o.ctx = (int)ctx;
    o.n_windows = (int)windows;
    o.n_threads = (int)threads;
    o.progress = quiet ? NULL : progress;
    o.user = &t_start;
    o.stop = &cli_stop;
    cli_catch_sigint();

    qmix_sens_result res;
    int rc = qmix_sensitivity_run(m, &o, &res, &err);
    if (!quiet) cli_progress_end();
    if (rc) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        qmix_model_close(m);
        qmix_calib_close(cstats);
        free(tokens);
        return 1;
    }
    if (res.stopped) fprintf(stderr, "qmix %s: interrupted; printing what was measured\n", CMD);
    qmix_sens_sort(&res);
    size_t cap = 1 << 16;
    char *recipe = malloc(cap);
    int status = 0;
    if (!recipe || qmix_sens_recipe(&res, target, model_path, recipe, cap, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, recipe ? err.msg : "out of memory");
        status = 1;
    } else {
        if (json) print_json(model_path, &res, recipe);
        else print_table(model_path, &res, recipe);
        if (plot && plot_rows(plot, model_path, &res, &err)) {
            fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
            status = 1;
        }
        if (recipe_out) {
            if (qmix_write_file(recipe_out, recipe, strlen(recipe), &err)) {
                fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
                status = 1;
            }
        }
    }
    fflush(stdout);
    free(recipe);
    qmix_sens_result_free(&res);
    qmix_model_close(m);
    qmix_calib_close(cstats);
    free(tokens);
    return status ? status : (res.stopped ? 130 : 0);
}

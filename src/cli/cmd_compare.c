#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "eval/compare.h"
#include "model/model.h"
#include "quant/ggml_blocks.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix compare A B [--min-cosine X] [--per-tensor] [--json]\n\n"
            "Compares two checkpoints of the same model in any formats qmix opens (Hugging Face,\n"
            "MLX, GGUF): every weight, dequantized row by row, by cosine similarity, relative\n"
            "error ||a-b||/||a|| and the largest absolute difference, grouped by tensor role (and\n"
            "per tensor with --per-tensor). Gated DeltaNet value heads are compared in Hugging Face\n"
            "order whatever the file's order, so a conversion that put them in the wrong order\n"
            "shows as a low cosine on gdn_qkv, gdn_z, gdn_a, gdn_b, gdn_out and gdn_params.\n\n"
            "  --min-cosine X   a role (or tensor) whose lowest cosine is below X fails; any\n"
            "                   failure makes the exit status 1. Default: per role, what a\n"
            "                   healthy quantization at the role's lowest bits reaches (0.85 at\n"
            "                   2 bits, 0.95 at 3, 0.985 at 4, 0.995 at 5, 0.998 at 6, 0.9995\n"
            "                   at 8, 0.9999 at 16), so a good 2-bit quant passes and a broken\n"
            "                   layout (cosine near 0) fails at any width\n"
            "  --per-tensor     one row per tensor (experts: all of a layer's, min over them)\n"
            "  --json           one JSON object: roles[] and tensors[] with cosine, min_cosine,\n"
            "                   rel_err, max_abs, pass; and pass overall\n");
}

static void on_progress(void *user, int done, int total)
{
    cli_progress("compare", done, total, *(const double *)user);
}

typedef struct role_row {
    qmix_cmp_stat stat;
    double min_cosine;
    int tensors;
} role_row;

/* The lowest bits per weight any matrix of a role is stored in, in either model. */
static void lowest_bits(void *user, qmix_role role, int layer, int expert, const qk_mat *w)
{
    double *bits = user, b;
    if (w->dtype == QMIX_U32) b = w->bits;
    else if (w->dtype == QMIX_U8) b = 8.0 * (double)qmix_ggml_row_bytes(w->ggml_type, 256) / 256.0;
    else b = 8.0 * (double)qmix_dtype_size(w->dtype);
    if (b < bits[role]) bits[role] = b;
}

/* Without --min-cosine a role fails below what a healthy quantization at its bits reaches
 * (round to nearest of Gaussian-like weights: ~0.93 at 2 bits, ~0.98 at 3, ~0.995 at 4), so a
 * good 2-bit quant passes and a broken layout (cosine near 0) fails at any width. */
static double default_min_cosine(double bits)
{
    int b = (int)bits;
    return b <= 2 ? 0.85 : b == 3 ? 0.95 : b == 4 ? 0.985 : b == 5 ? 0.995 : b <= 7 ? 0.998
         : b < 16 ? 0.9995 : 0.9999;
}

int qmix_cmd_compare(int argc, char **argv)
{
    const char *paths[2] = {NULL, NULL}, *v;
    double min_cos = -2; /* not given: per role, from its bits */
    int per_tensor = 0, json = 0, n_paths = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--min-cosine")) {
            if (!(v = cli_value("compare", argc, argv, &i)) || cli_double("compare", a, v, &min_cos))
                return 2;
            if (!(min_cos >= -1 && min_cos <= 1)) {
                fprintf(stderr, "qmix compare: --min-cosine must be in [-1, 1]\n");
                return 2;
            }
        } else if (!strcmp(a, "--per-tensor")) {
            per_tensor = 1;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix compare: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (n_paths < 2) {
            paths[n_paths++] = a;
        } else {
            fprintf(stderr, "qmix compare: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (n_paths != 2) return cli_missing("compare", n_paths ? "the second checkpoint B" : "checkpoints A and B");
    qmix_err err;
    qmix_model *ma = NULL, *mb = NULL;
    qmix_cmp_result r = {0};
    int rc = 1;
    cli_catch_sigint();
    double t0 = cli_now();
    if (qmix_model_open(paths[0], &ma, &err) || qmix_model_open(paths[1], &mb, &err) ||
        qmix_compare_models(ma, mb, on_progress, &t0, &cli_stop, &r, &err)) {
        cli_progress_end();
        fprintf(stderr, "qmix compare: %s\n", err.msg);
        goto done;
    }
    cli_progress_end();

    role_row roles[QMIX_ROLE_COUNT];
    memset(roles, 0, sizeof roles);
    int failed = 0;
    for (int i = 0; i < r.n_tensors; i++) {
        const qmix_cmp_tensor *t = &r.tensors[i];
        role_row *rr = &roles[t->role];
        if (!rr->tensors || t->min_cosine < rr->min_cosine) rr->min_cosine = t->min_cosine;
        rr->tensors++;
        rr->stat.dot += t->stat.dot;
        rr->stat.norm_a += t->stat.norm_a;
        rr->stat.norm_b += t->stat.norm_b;
        rr->stat.err2 += t->stat.err2;
        if (t->stat.max_abs > rr->stat.max_abs) rr->stat.max_abs = t->stat.max_abs;
        rr->stat.n += t->stat.n;
    }
    double role_min[QMIX_ROLE_COUNT], bits[QMIX_ROLE_COUNT];
    for (int k = 0; k < QMIX_ROLE_COUNT; k++) bits[k] = 32;
    qmix_model_for_each_matrix(ma, lowest_bits, bits);
    qmix_model_for_each_matrix(mb, lowest_bits, bits);
    for (int k = 0; k < QMIX_ROLE_COUNT; k++) {
        role_min[k] = min_cos >= -1 ? min_cos : default_min_cosine(bits[k]);
        failed += roles[k].tensors && !(roles[k].min_cosine >= role_min[k]);
    }

    if (json) {
        json_t *o = json_object(), *jr = json_array(), *jt = json_array();
        for (int k = 0; k < QMIX_ROLE_COUNT; k++) {
            if (!roles[k].tensors) continue;
            json_array_append_new(
                jr, json_pack("{s:s, s:i, s:f, s:f, s:f, s:f, s:b}", "role",
                              qmix_role_name((qmix_role)k), "tensors", roles[k].tensors, "cosine",
                              qmix_cmp_cosine(&roles[k].stat), "min_cosine", roles[k].min_cosine,
                              "rel_err", qmix_cmp_rel_err(&roles[k].stat), "max_abs",
                              roles[k].stat.max_abs, "pass", roles[k].min_cosine >= role_min[k]));
        }
        for (int i = 0; per_tensor && i < r.n_tensors; i++) {
            const qmix_cmp_tensor *t = &r.tensors[i];
            json_array_append_new(
                jt, json_pack("{s:s, s:s, s:f, s:f, s:f, s:f, s:b}", "name", t->name, "role",
                              qmix_role_name(t->role), "cosine", qmix_cmp_cosine(&t->stat),
                              "min_cosine", t->min_cosine, "rel_err", qmix_cmp_rel_err(&t->stat),
                              "max_abs", t->stat.max_abs, "pass", t->min_cosine >= role_min[t->role]));
        }
        json_object_set_new(o, "a", json_string(paths[0]));
        json_object_set_new(o, "b", json_string(paths[1]));
        json_object_set_new(o, "min_cosine_threshold", min_cos >= -1 ? json_real(min_cos) : json_null());
        json_object_set_new(o, "roles", jr);
        json_object_set_new(o, "tensors", jt);
        json_object_set_new(o, "pass", json_boolean(!failed));
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
        printf("%s\n", s);
        free(s);
        json_decref(o);
    } else {
        printf("A  %s\nB  %s\n%d tensors compared in %.1f s; ", paths[0], paths[1], r.n_tensors,
               cli_now() - t0);
        if (min_cos >= -1) printf("a role fails below cosine %.4f\n\n", min_cos);
        else printf("a role fails below what a healthy quant at its lowest bits reaches (Threshold)\n\n");
        printf("| Role | Tensors | Cosine | Min cosine | Threshold | Rel. error | Max abs | |\n"
               "|---|---|---|---|---|---|---|---|\n");
        for (int k = 0; k < QMIX_ROLE_COUNT; k++) {
            if (!roles[k].tensors) continue;
            printf("| %s | %d | %.6f | %.6f | %.4f | %.3e | %.3e | %s |\n",
                   qmix_role_name((qmix_role)k), roles[k].tensors, qmix_cmp_cosine(&roles[k].stat),
                   roles[k].min_cosine, role_min[k], qmix_cmp_rel_err(&roles[k].stat),
                   roles[k].stat.max_abs, roles[k].min_cosine >= role_min[k] ? "pass" : "FAIL");
        }
        if (per_tensor) {
            printf("\n| Tensor | Cosine | Min cosine | Rel. error | Max abs | |\n"
                   "|---|---|---|---|---|---|\n");
            for (int i = 0; i < r.n_tensors; i++) {
                const qmix_cmp_tensor *t = &r.tensors[i];
                printf("| %s | %.6f | %.6f | %.3e | %.3e | %s |\n", t->name,
                       qmix_cmp_cosine(&t->stat), t->min_cosine, qmix_cmp_rel_err(&t->stat),
                       t->stat.max_abs, t->min_cosine >= role_min[t->role] ? "pass" : "FAIL");
            }
        }
        if (failed) printf("\n%d role(s) below their threshold\n", failed);
    }
    rc = failed ? 1 : 0;
done:
    qmix_cmp_result_free(&r);
    qmix_model_close(mb);
    qmix_model_close(ma);
    return rc;
}

/* `qmix quantize IN OUT --budget 11G | --memory 16G [--reserve 3.5G] | --bpw 2.6`: measure (or
 * read) how much end-to-end KLD each tensor group adds at each candidate bit width, size every
 * setting with the quantizer's own dry run, choose the allocation (src/quant/allocate.c), write
 * it as a recipe, quantize with it and measure the real KLD against the prediction. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/quantize_budget.h"
#include "eval/kld.h"
#include "eval/plan.h"
#include "eval/sensitivity.h"
#include "eval/windows.h"
#include "quant/allocate.h"
#include "quant/calib.h"
#include "quant/ggml_blocks.h"
#include "quant/gguf_export.h"
#include "quant/recipe.h"
#include "eval/sens_json.h"
#include "util/fileio.h"

#define CMD "quantize"
#define MAX_GROUPS 1024
#define RECIPE_BYTES (64 * 1024)

const char budget_help[] =
    "Choosing the allocation for a budget (instead of --recipe):\n"
    "  --budget SIZE        weights + runtime (session, GDN state, KV cache at --ctx) <= SIZE\n"
    "  --memory SIZE        the machine's memory; with --reserve SIZE (default 0) kept free\n"
    "  --bpw X              weights at X bits per weight (mlx-lm's count)\n"
    "  --ctx N              context the runtime must hold (default 4096); --kv-bits 32|16|8|4,\n"
    "                       --vision, --threads N as in qmix plan\n"
    "  --calib FILE         calibration text: measure each group's KLD (qmix sensitivity)\n"
    "  --tokens FILE        calibration token ids instead of text\n"
    "  --sensitivity FILE   use a saved `qmix sensitivity --json` instead of measuring;\n"
    "                       repeat with files measured at other --group-size or --method to\n"
    "                       let the allocation choose those too (at most 9 files)\n"
    "  --calib-ctx N        window length (512); --calib-windows N windows (8)\n"
    "  --sample N           measure N layers per role and N experts per layer, evenly spread\n"
    "                       (default 8 for models with more than 32 experts, else 0: all)\n"
    "  --candidates LIST    bit widths to choose from (2,3,4,6,8) besides keep\n"
    "  --group G[,G...]     candidate group sizes of 32, 64, 128 to measure (default all\n"
    "                       three; --sensitivity files say their own); each group of\n"
    "                       tensors gets the (bits, group size) that pays best\n"
    "  --methods M[,M...]   candidate methods of rtn, gptq, imatrix (rtn), each measured;\n"
    "                       calibrated ones need --stats\n"
    "  --stats STATS        statistics from qmix calibrate: for measuring and quantizing with\n"
    "                       gptq/imatrix (the rules chosen with them say method=)\n"
    "  --layer-bands N      allocate per role and band of N contiguous layer ranges (1)\n"
    "  --min ROLE=B         at least B bits for a role (repeatable); gdn, attn, experts name\n"
    "                       their roles together, e.g. --min gdn=3\n"
    "  --keep LIST          roles kept at 16 bits (default router; norms, GDN parameters,\n"
    "                       vision and MTP are always kept)\n"
    "  --fixed FILE         recipe rules applied after the allocation (they win)\n"
    "  --recipe-out FILE    also write the chosen recipe here (it is always written to\n"
    "                       OUT/qmix-recipe.txt)\n"
    "  --dry-run            print the allocation, predicted size and KLD; write nothing\n"
    "  --no-verify          skip measuring the real KLD of the result\n"
    "  --refine N           with calibration text or tokens: measure the allocation, then\n"
    "                       up to N rounds (default 3; 0: off) of alternatives (the groups\n"
    "                       with the largest predicted loss one setting up, the most protected\n"
    "                       per byte one down, the best uniform setting that fits; the bytes\n"
    "                       balanced by the predictor's best steps elsewhere), each measured;\n"
    "                       keeps the best measured and prints predicted vs measured for\n"
    "                       each (--no-verify: off)\n"
    "  Output formats: MLX (default); --format gguf chooses GGUF block types (each width is\n"
    "  the type the GGUF writer gives it: 2 Q2_K, 3 Q3_K, 4 Q4_K, 5 Q5_K, 6 Q6_K, 8 Q8_0, with\n"
    "  its fallback where a K-quant block does not divide a row; keep BF16), measured on those\n"
    "  blocks (--sensitivity files from qmix sensitivity --gguf) and sized as written, recipe\n"
    "  beside the file as OUT.recipe.txt; --format gptq chooses what vLLM loads (2/3/4/8 bits,\n"
    "  routed experts 4 or 8, fused q/k/v, GDN qkv/z and b/a one setting each; router,\n"
    "  shared-expert gate and embedding 16-bit)\n"
    "  --json               print one JSON object: budget_bytes, bytes, bpw, predicted_kld,\n"
    "                       groups[] (role, roles, layers, bits, bytes, kld), recipe, written_bytes and\n"
    "                       measured_kld when quantized and verified\n";

void budget_defaults(budget_args *b)
{
    memset(b, 0, sizeof *b);
    b->ctx = 4096;
    b->kv_bits = 32;
    b->calib_ctx = 512;
    b->calib_windows = 8;
    b->groups[0] = 64;
    b->n_groups = 1;
    b->methods[0] = QMIX_METHOD_RTN;
    b->n_methods = 1;
    b->bands = 1;
    b->verify = 1;
    b->refine = 3;
    b->sample = -1;
    b->bpw = -1;
    const int cand[] = {2, 3, 4, 6, 8};
    b->n_cand = 5;
    memcpy(b->cand_bits, cand, sizeof cand);
    b->keep_roles = 1u << QMIX_ROLE_ROUTER;
}

int budget_requested(const budget_args *b) { return b->budget || b->memory || b->bpw > 0; }

static int role_by_name(const char *name, int n)
{
    for (int r = 0; r < QMIX_ROLE_COUNT; r++)
        if (strlen(qmix_role_name((qmix_role)r)) == (size_t)n &&
            !strncmp(qmix_role_name((qmix_role)r), name, (size_t)n))
            return r;
    return -1;
}

/* "gdn", "attn", "experts" or one role name → a role mask; 0 if unknown. */
static uint32_t roles_named(const char *name, int n)
{
    if (n == 3 && !strncmp(name, "gdn", 3))
        return 1u << QMIX_ROLE_GDN_QKV | 1u << QMIX_ROLE_GDN_Z | 1u << QMIX_ROLE_GDN_A |
               1u << QMIX_ROLE_GDN_B | 1u << QMIX_ROLE_GDN_OUT;
    if (n == 4 && !strncmp(name, "attn", 4))
        return 1u << QMIX_ROLE_ATTN_Q | 1u << QMIX_ROLE_ATTN_K | 1u << QMIX_ROLE_ATTN_V |
               1u << QMIX_ROLE_ATTN_O;
    if (n == 7 && !strncmp(name, "experts", 7))
        return 1u << QMIX_ROLE_EXPERTS_GATE_UP | 1u << QMIX_ROLE_EXPERTS_DOWN;
    int r = role_by_name(name, n);
    return r < 0 ? 0 : 1u << r;
}

static int size_option(const char *flag, const char *v, uint64_t *out)
{
    qmix_err err;
    if (qmix_parse_bytes(v, out, &err) || !*out) {
        fprintf(stderr, "qmix %s: %s: %s\n", CMD, flag, *out ? err.msg : "must be > 0");
        return -1;
    }
    return 0;
}

/* A comma-separated list of distinct values from allowed[n_allowed] into out (at most
 * n_allowed); -1 if any item is not one. */
static int int_set(const char *v, const int *allowed, int n_allowed, int *out, int *n)
{
    *n = 0;
    for (const char *p = v; *p;) {
        char *end;
        long x = strtol(p, &end, 10);
        int ok = end != p && (*end == ',' || !*end) && *n < n_allowed, known = 0;
        for (int j = 0; j < n_allowed; j++) known |= allowed[j] == x;
        for (int j = 0; ok && j < *n; j++) ok = out[j] != x;
        if (!ok || !known) return -1;
        out[(*n)++] = (int)x;
        p = *end ? end + 1 : end;
    }
    return 0;
}

int budget_option(int argc, char **argv, int *i, budget_args *b)
{
    const char *a = argv[*i], *v;
    long n;
    if (!strcmp(a, "--dry-run")) return b->dry_run = 1;
    if (!strcmp(a, "--json")) return b->json = 1;
    if (!strcmp(a, "--no-verify")) return !(b->verify = 0);
    if (!strcmp(a, "--vision")) return b->vision = 1;
    static const char *const valued[] = {"--budget", "--memory", "--reserve", "--bpw", "--ctx",
                                         "--kv-bits", "--threads", "--calib", "--tokens",
                                         "--sensitivity", "--calib-ctx", "--calib-windows",
                                         "--candidates", "--group", "--layer-bands", "--min",
                                         "--keep", "--fixed", "--recipe-out", "--methods",
                                         "--refine", "--sample", "--stats"};
    size_t k = 0;
    while (k < sizeof valued / sizeof *valued && strcmp(a, valued[k])) k++;
    if (k == sizeof valued / sizeof *valued) return 0;
    if (!(v = cli_value(CMD, argc, argv, i))) return -1;
    switch (k) {
    case 0: return size_option(a, v, &b->budget) ? -1 : 1;
    case 1: return size_option(a, v, &b->memory) ? -1 : 1;
    case 2: {
        qmix_err err;
        if (qmix_parse_bytes(v, &b->reserve, &err)) {
            fprintf(stderr, "qmix %s: --reserve: %s\n", CMD, err.msg);
            return -1;
        }
        return 1;
    }
    case 3:
        if (cli_double(CMD, a, v, &b->bpw)) return -1;
        if (!(b->bpw > 0 && b->bpw <= 32)) {
            fprintf(stderr, "qmix %s: --bpw must be in (0, 32]\n", CMD);
            return -1;
        }
        return 1;
    case 4: if (cli_int(CMD, a, v, 1, 1 << 24, &n)) return -1; b->ctx = (int)n; return 1;
    case 5:
        if (cli_int(CMD, a, v, 4, 32, &n) || (n != 4 && n != 8 && n != 16 && n != 32)) {
            fprintf(stderr, "qmix %s: --kv-bits must be 32, 16, 8 or 4\n", CMD);
            return -1;
        }
        b->kv_bits = (int)n;
        return 1;
    case 6: if (cli_int(CMD, a, v, 0, 1024, &n)) return -1; b->threads = (int)n; return 1;
    case 7: b->calib = v; return 1;
    case 8: b->tokens = v; return 1;
    case 9:
        if (b->n_sensitivity == 9) {
            fprintf(stderr, "qmix %s: at most 9 --sensitivity files\n", CMD);
            return -1;
        }
        b->sensitivity[b->n_sensitivity++] = v;
        return 1;
    case 10: if (cli_int(CMD, a, v, 2, 1 << 20, &n)) return -1; b->calib_ctx = (int)n; return 1;
    case 11: if (cli_int(CMD, a, v, 1, 1 << 20, &n)) return -1; b->calib_windows = (int)n; return 1;
    case 12:
        if (int_set(v, (const int[]){2, 3, 4, 5, 6, 8}, 6, b->cand_bits, &b->n_cand)) {
            fprintf(stderr, "qmix %s: --candidates: distinct widths of 2,3,4,5,6,8, got '%s'\n",
                    CMD, v);
            return -1;
        }
        b->cand_given = 1;
        return 1;
    case 13:
        b->group_given = 1;
        if (int_set(v, (const int[]){32, 64, 128}, 3, b->groups, &b->n_groups)) {
            fprintf(stderr, "qmix %s: --group: distinct sizes of 32, 64, 128, got '%s'\n", CMD, v);
            return -1;
        }
        return 1;
    case 14: if (cli_int(CMD, a, v, 1, 64, &n)) return -1; b->bands = (int)n; return 1;
    case 15: {
        const char *eq = strchr(v, '=');
        uint32_t mask = eq ? roles_named(v, (int)(eq - v)) : 0;
        long bits;
        if (!mask || cli_int(CMD, a, eq + 1, 2, 16, &bits)) {
            if (!mask) fprintf(stderr, "qmix %s: --min ROLE=BITS, got '%s'\n", CMD, v);
            return -1;
        }
        for (int r = 0; r < QMIX_ROLE_COUNT; r++)
            if (mask & (1u << r)) b->min_bits[r] = (int)bits;
        return 1;
    }
    case 16: {
        b->keep_roles = 0;
        for (const char *p = v; *p;) {
            const char *c = strchr(p, ',');
            int len = c ? (int)(c - p) : (int)strlen(p);
            uint32_t mask = roles_named(p, len);
            if (!mask) {
                fprintf(stderr, "qmix %s: --keep: unknown role '%.*s'\n", CMD, len, p);
                return -1;
            }
            b->keep_roles |= mask;
            p += len + (c != NULL);
        }
        return 1;
    }
    case 17: b->fixed = v; return 1;
    case 18: b->recipe_out = v; return 1;
    case 19: {
        b->n_methods = 0;
        for (const char *p = v; *p;) {
            const char *c = strchr(p, ',');
            int len = c ? (int)(c - p) : (int)strlen(p), m = -1;
            char name[16];
            if (len < (int)sizeof name) {
                memcpy(name, p, (size_t)len);
                name[len] = 0;
                m = qmix_method_parse(name);
            }
            int ok = (m == QMIX_METHOD_RTN || m == QMIX_METHOD_GPTQ || m == QMIX_METHOD_IMATRIX) &&
                     b->n_methods < 3;
            for (int j = 0; ok && j < b->n_methods; j++) ok = b->methods[j] != m;
            if (!ok) {
                fprintf(stderr, "qmix %s: --methods: distinct methods of rtn, gptq, imatrix, got "
                        "'%s'\n", CMD, v);
                return -1;
            }
            b->methods[b->n_methods++] = m;
            p += len + (c != NULL);
        }
        return 1;
    }
    case 20: if (cli_int(CMD, a, v, 0, 20, &n)) return -1; b->refine = (int)n; return 1;
    case 21: if (cli_int(CMD, a, v, 0, 1 << 20, &n)) return -1; b->sample = (int)n; return 1;
    default: b->stats = v; return 1;
    }
}

/* ---- sensitivity: measured now or read back ---------------------------------------------- */

/* How a group is quantized besides its bits: a candidate of the allocation. */
typedef struct variant { int group, method; } variant;
#define MAX_VARIANTS 9

typedef qmix_sens_saved_row sens_row; /* eval/sens_json.h */

/* Appends the rows of a saved `qmix sensitivity --json` to *rows; *v: its group size and
 * method. */
static int load_sensitivity_json(const char *path, int gguf, sens_row **rows, int *n,
                                 int *layers_seen, variant *v)
{
    char *text = NULL;
    size_t len;
    qmix_err err;
    int file_gguf = 0;
    if (qmix_read_file(path, 256u << 20, &text, &len, &err) ||
        qmix_sens_json_parse(text, len, path, rows, n, layers_seen, &v->group, &v->method,
                             &file_gguf, &err)) {
        if (text) free(text);
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        return -1;
    }
    free(text);
    if (file_gguf != gguf) {
        fprintf(stderr, "qmix %s: %s: %s\n", CMD, path,
                gguf ? "measured with MLX affine groups, not GGUF blocks (qmix sensitivity --gguf)"
                     : "measured with GGUF blocks, for --format gguf");
        return -1;
    }
    return 0;
}

static void on_progress(void *user, int64_t done, int64_t total)
{
    cli_progress("sensitivity", done, total, *(const double *)user);
}

/* Appends the rows measured with variant v (statistics: calibrated methods). */
static int measure_sensitivity(const char *in, const budget_args *b, variant v,
                               const qmix_calib *stats, const int32_t *tokens, int64_t n_tokens,
                               sens_row **rows, int *n)
{
    qmix_err err;
    qmix_model *m = NULL;
    if (qmix_model_open(in, &m, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        return -1;
    }
    /* many experts: measure a spread sample of layers and experts (their KLD scaled to the
     * whole role below) so a 35B-scale model is measured in minutes, not hours */
    int sample = b->sample >= 0 ? b->sample : qmix_model_config(m)->n_experts > 32 ? 8 : 0;
    qmix_sens_opts o = {.n_bits = b->n_cand, .group_size = v.group, .method = v.method,
                        .sample = sample,
                        .gguf = b->gguf,
                        .calib = stats, .min_tokens = stats ? qmix_calib_failsafe_rows(qmix_calib_tokens(stats), -1) : 0, .per_layer = b->bands > 1,
                        .tokens = tokens, .n_tokens = n_tokens, .ctx = b->calib_ctx,
                        .n_windows = b->calib_windows, .n_threads = b->threads,
                        .progress = on_progress, .stop = &cli_stop};
    memcpy(o.bits, b->cand_bits, sizeof o.bits);
    double t0 = cli_now();
    o.user = &t0;
    qmix_sens_result r;
    int rc = qmix_sensitivity_run(m, &o, &r, &err);
    cli_progress_end();
    qmix_model_close(m);
    if (rc) {
        fprintf(stderr, "qmix %s: sensitivity: %s\n", CMD, err.msg);
        return -1;
    }
    if (r.stopped) {
        fprintf(stderr, "qmix %s: interrupted while measuring sensitivity\n", CMD);
        qmix_sens_result_free(&r);
        return -1;
    }
    fprintf(stderr, "qmix %s: measured %d groups at %d widths, group size %d, %s, on %lld "
            "calibration tokens in %.1f s\n", CMD, r.n_rows, r.n_bits, v.group,
            qmix_method_name(v.method), (long long)r.calib_rows, r.elapsed_s);
    sens_row *grown = realloc(*rows, (size_t)(*n + r.n_rows + 1) * sizeof **rows);
    if (!grown) {
        qmix_sens_result_free(&r);
        fprintf(stderr, "qmix %s: out of memory\n", CMD);
        return -1;
    }
    *rows = grown;
    for (int i = 0; i < r.n_rows; i++) {
        sens_row *s = &(*rows)[(*n)++];
        memset(s, 0, sizeof *s);
        s->group = v.group;
        s->method = v.method;
        s->role = r.rows[i].role;
        s->layer = r.rows[i].layer;
        s->params = r.rows[i].params;
        s->params_measured = r.rows[i].params_measured;
        s->quantizable = r.rows[i].quantizable;
        for (int k = 0; k < 9; k++) s->kld[k] = NAN;
        for (int k = 0; k < r.n_bits; k++) s->kld[r.bits[k]] = qmix_sens_kld(&r.rows[i].cell[k]);
    }
    qmix_sens_result_free(&r);
    return 0;
}

/* ---- sizes: the quantizer's dry run of a uniform recipe ----------------------------------- */

/* The GGUF writer's own sizes for the recipe: every type decided (fallbacks included), nothing
 * written; the report in qmix_quant_report's terms (bpw over every tensor). */
static int gguf_sizes(const char *in, const qmix_recipe *r, const qmix_quant_opts *base,
                      qmix_quant_report *rep)
{
    qmix_err err;
    qmix_gguf_export_report g;
    qmix_gguf_export_opts go = {.recipe = r, .n_threads = 1, .dry_run = 1, .report = &g,
                                .keep_type = base->dtype == QMIX_F16 ? QMIX_GGML_F16
                                                                     : QMIX_GGML_BF16};
    if (qmix_gguf_export(in, NULL, &go, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        return -1;
    }
    memset(rep, 0, sizeof *rep);
    rep->params = g.params;
    rep->bytes = g.bytes;
    rep->bpw = g.params ? 8.0 * (double)g.bytes / (double)g.params : 0;
    rep->n_tensors = g.n_tensors;
    for (int k = 0; k < QMIX_ROLE_COUNT; k++) {
        rep->roles[k].params = g.roles[k].params;
        rep->roles[k].bytes = g.roles[k].bytes;
        rep->roles[k].tensors = g.roles[k].tensors;
    }
    return 0;
}

static int dry_run(const char *in, const char *recipe_text, const qmix_quant_opts *base,
                   int gguf, qmix_quant_report *rep)
{
    qmix_err err;
    qmix_recipe r;
    if (gguf) {
        if (qmix_recipe_parse(recipe_text, "allocation", &r, &err)) {
            fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
            return -1;
        }
        return gguf_sizes(in, &r, base, rep);
    }
    qmix_quant_opts o = *base;
    o.recipe = &r;
    o.dry_run = 1;
    o.progress = 0;
    if (qmix_recipe_parse(recipe_text, "allocation", &r, &err) ||
        qmix_quantize(in, NULL, &o, rep, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        return -1;
    }
    return 0;
}

/* ---- --format gptq: what vLLM loads --------------------------------------------------------- */

/* Modules vLLM fuses, which GPTQ must give one setting (per layer for the routed experts). */
static const uint32_t gptq_fused[] = {
    1u << QMIX_ROLE_ATTN_Q | 1u << QMIX_ROLE_ATTN_K | 1u << QMIX_ROLE_ATTN_V,
    1u << QMIX_ROLE_GDN_QKV | 1u << QMIX_ROLE_GDN_Z,
    1u << QMIX_ROLE_GDN_A | 1u << QMIX_ROLE_GDN_B,
    1u << QMIX_ROLE_EXPERTS_GATE_UP | 1u << QMIX_ROLE_EXPERTS_DOWN,
};

/* Whether a GPTQ checkpoint can hold role r alone at (bits, group), as the GPTQ writer checks:
 * 2, 3, 4 or 8 bits; routed experts 4 or 8 (vLLM's fused-MoE kernels); every matrix's output
 * channels times bits a multiple of 32 (qzeros packing) and its input a multiple of the group.
 * Router, shared-expert gate and embedding are kept by the caller (vLLM builds them
 * unquantized). */
static int gptq_one_ok(const qmix_config *c, int r, int bits, int group)
{
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 0;
    int64_t rows[2] = {0, 0}, cols[2] = {c->hidden_size, c->hidden_size};
    int64_t nv = (int64_t)c->lin_n_v_heads * c->lin_v_head_dim;
    switch (r) {
    case QMIX_ROLE_ATTN_Q: rows[0] = 2 * c->n_heads * c->head_dim; break; /* query and gate */
    case QMIX_ROLE_ATTN_K: case QMIX_ROLE_ATTN_V: rows[0] = c->n_kv_heads * c->head_dim; break;
    case QMIX_ROLE_ATTN_O: rows[0] = c->hidden_size; cols[0] = c->n_heads * c->head_dim; break;
    case QMIX_ROLE_GDN_OUT: rows[0] = c->hidden_size; cols[0] = nv; break;
    case QMIX_ROLE_GDN_QKV: rows[0] = 2 * c->lin_n_k_heads * c->lin_k_head_dim + nv; break;
    case QMIX_ROLE_GDN_Z: rows[0] = nv; break;
    case QMIX_ROLE_GDN_A: case QMIX_ROLE_GDN_B: rows[0] = c->lin_n_v_heads; break;
    case QMIX_ROLE_SHARED_EXPERT:
        rows[0] = c->shared_ffn;
        rows[1] = c->hidden_size;
        cols[1] = c->shared_ffn;
        break;
    case QMIX_ROLE_EXPERTS_GATE_UP: rows[0] = c->moe_ffn; break;
    case QMIX_ROLE_EXPERTS_DOWN: rows[0] = c->hidden_size; cols[0] = c->moe_ffn; break;
    case QMIX_ROLE_LM_HEAD: rows[0] = c->vocab_size; break;
    default: return 0;
    }
    if ((r == QMIX_ROLE_EXPERTS_GATE_UP || r == QMIX_ROLE_EXPERTS_DOWN) && bits != 4 && bits != 8)
        return 0;
    for (int k = 0; k < 2; k++)
        if ((rows[k] * bits) % 32 || cols[k] % group) return 0;
    return 1;
}

/* ... and together with the modules it is fused with (all of them, or none). */
static int gptq_role_ok(const qmix_config *c, int r, int bits, int group)
{
    uint32_t mask = 1u << r;
    for (size_t k = 0; k < sizeof gptq_fused / sizeof *gptq_fused; k++)
        if (gptq_fused[k] & mask) mask = gptq_fused[k];
    for (int x = 0; x < QMIX_ROLE_COUNT; x++)
        if ((mask & (1u << x)) && !gptq_one_ok(c, x, bits, group)) return 0;
    return 1;
}

/* The group's roles, comma-separated (more than one where fused modules share a setting). */
static const char *group_roles(const qmix_alloc_group *g, char *buf, size_t len)
{
    int off = snprintf(buf, len, "%s", qmix_role_name(g->role));
    for (int r = 0; r < QMIX_ROLE_COUNT && off > 0 && (size_t)off < len; r++)
        if (g->also & (1u << r))
            off += snprintf(buf + off, len - (size_t)off, ",%s", qmix_role_name((qmix_role)r));
    return buf;
}

/* ---- allocation to recipe ---------------------------------------------------------------- */

typedef struct alloc_job {
    const char *in;
    const qmix_quant_opts *qo;
    const budget_args *b;
    const char *header, *fixed;
    int default_group;
    uint64_t weights_budget;
} alloc_job;

/* The recipe of g's current choices: as text (with the --fixed rules after the allocation's),
 * parsed, and sized by a dry run. */
static int chosen_recipe(const alloc_job *j, const qmix_alloc_group *g, int n, char *text,
                         qmix_recipe *recipe, qmix_quant_report *final)
{
    qmix_err err;
    if (qmix_alloc_recipe(g, n, j->default_group, j->header, text, RECIPE_BYTES, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        return -1;
    }
    if (j->fixed) {
        size_t len = strlen(text);
        snprintf(text + len, RECIPE_BYTES - len, "# --fixed %s\n%s\n", j->b->fixed, j->fixed);
    }
    if (qmix_recipe_parse(text, "allocation", recipe, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        return -1;
    }
    return dry_run(j->in, text, j->qo, j->b->gguf, final);
}

/* Allocates g for target; the recipe's real size comes from one more dry run (bands split a
 * role's bytes by parameters, which can round differently): shrink and retry if it overshoots.
 * The recipe as text and parsed, and its sizes. */
static int allocate_recipe(const alloc_job *j, qmix_alloc_group *g, int n, uint64_t target,
                           char *text, qmix_recipe *recipe, qmix_quant_report *final, int quiet)
{
    qmix_err err;
    for (int attempt = 0;; attempt++) {
        if (qmix_allocate(g, n, target, &err)) {
            if (!quiet) fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
            return -1;
        }
        if (chosen_recipe(j, g, n, text, recipe, final)) return -1;
        if (final->bytes <= j->weights_budget || j->fixed || attempt == 4) return 0;
        uint64_t over = final->bytes - j->weights_budget;
        target = target > over ? target - over : 0;
    }
}

/* ---- writing and measuring a recipe (step 7, and each refinement candidate) ---------------- */

/* Writes IN quantized by recipe r to out: a GGUF file, or an MLX/GPTQ directory. */
static int write_out(const char *in, const char *out, int gguf, qmix_quant_opts *qo,
                     qmix_recipe *r, qmix_quant_report *rep)
{
    qmix_err err;
    if (gguf) {
        qmix_gguf_export_report g;
        qmix_gguf_export_opts go = {.recipe = r, .progress = qo->progress,
                                    .n_threads = qo->n_threads, .report = &g,
                                    .keep_type = qo->dtype == QMIX_F16 ? QMIX_GGML_F16
                                                                       : QMIX_GGML_BF16};
        if (qmix_gguf_export(in, out, &go, &err)) {
            fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
            return -1;
        }
        memset(rep, 0, sizeof *rep);
        rep->bytes = g.bytes;
        rep->bpw = g.params ? 8.0 * (double)g.bytes / (double)g.params : 0;
        return 0;
    }
    qo->recipe = r;
    if (qmix_quantize(in, out, qo, rep, &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        return -1;
    }
    return 0;
}

/* Mean KLD (and top-1 agreement) of the checkpoint at path against IN on the calibration
 * windows. */
static int measure_kld(const char *in, const char *path, const budget_args *b,
                       const int32_t *tokens, int64_t n_tokens, double *mean, double *top1,
                       int64_t *n_scored)
{
    qmix_err err;
    qmix_model *mb = NULL, *mq = NULL;
    qmix_session *sb = NULL, *sq = NULL;
    qmix_kld_result kr = {0};
    qmix_session_opts so = {.max_ctx = b->calib_ctx, .n_threads = b->threads};
    int windows = qmix_eval_n_windows(n_tokens, b->calib_ctx, b->calib_windows), rc = -1;
    if (qmix_model_open(in, &mb, &err) || qmix_model_open(path, &mq, &err) ||
        qmix_session_new(mb, &so, &sb, &err) || qmix_session_new(mq, &so, &sq, &err) ||
        qmix_kld_compare(sq, sb, NULL, tokens, b->calib_ctx, windows, NULL, NULL, &cli_stop,
                         &kr, &err) < 0) {
        fprintf(stderr, "qmix %s: measuring %s: %s\n", CMD, path, err.msg);
    } else if (kr.n > 0) {
        double sum = 0;
        for (int64_t i = 0; i < kr.n; i++) sum += kr.kld[i];
        *mean = sum / (double)kr.n;
        *top1 = (double)kr.top1_same / (double)kr.n;
        *n_scored = kr.n;
        rc = 0;
    }
    qmix_kld_result_free(&kr);
    qmix_session_free(sq);
    qmix_session_free(sb);
    qmix_model_close(mq);
    qmix_model_close(mb);
    return rc;
}

/* Refinement candidates are choice vectors over the groups' full settings. */
static uint64_t choice_bytes(const qmix_alloc_group *g, int n, const int *ch)
{
    uint64_t sum = 0;
    for (int i = 0; i < n; i++) sum += g[i].opt[ch[i]].bytes;
    return sum;
}

/* One step up for group i (the cheapest setting predicted better than its choice), paid for by
 * one step down of the groups whose predicted loss grows least per byte freed until the
 * choices fit target again; or one step down (the largest cheaper setting) with the bytes
 * freed spent on the steps up that buy most. 0 if no such move fits. */
static int swap_move(const qmix_alloc_group *g, int n, uint64_t target, int *ch, int i, int up)
{
    const qmix_alloc_opt *cur = &g[i].opt[ch[i]];
    int pick = -1;
    for (int o = 0; o < g[i].n_opts; o++) {
        const qmix_alloc_opt *c = &g[i].opt[o];
        if (up ? c->kld < cur->kld && c->bytes > cur->bytes &&
                     (pick < 0 || c->bytes < g[i].opt[pick].bytes)
               : c->bytes < cur->bytes && (pick < 0 || c->bytes > g[i].opt[pick].bytes))
            pick = o;
    }
    if (pick < 0) return 0;
    ch[i] = pick;
    for (;;) {
        uint64_t used = choice_bytes(g, n, ch);
        if (up && used <= target) return 1;
        int bk = -1, bo = -1;
        double best = 0;
        for (int k = 0; k < n; k++) {
            if (k == i) continue;
            const qmix_alloc_opt *c = &g[k].opt[ch[k]];
            for (int o = 0; o < g[k].n_opts; o++) {
                const qmix_alloc_opt *x = &g[k].opt[o];
                double r;
                if (up) {
                    if (x->bytes >= c->bytes) continue;
                    r = -(x->kld - c->kld) / (double)(c->bytes - x->bytes); /* loss per byte */
                } else {
                    if (x->bytes <= c->bytes || x->kld >= c->kld ||
                        x->bytes - c->bytes > target - used)
                        continue;
                    r = (c->kld - x->kld) / (double)(x->bytes - c->bytes); /* gain per byte */
                }
                if (bk < 0 || r > best) {
                    best = r;
                    bk = k;
                    bo = o;
                }
            }
        }
        if (bk < 0) return !up;
        ch[bk] = bo;
    }
}

/* The uniform setting (bits, variant) that fits target with the most bytes, as choices (groups
 * that can only be kept stay kept). 0 if none fits. */
static int uniform_anchor(const qmix_alloc_group *g, int n, uint64_t target, const int *cand,
                          int n_cand, const variant *var, int n_var, int *ch, char *what,
                          size_t len)
{
    uint64_t best_bytes = 0;
    int found = 0;
    int *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp) return 0;
    for (int j = 0; j < n_var; j++)
        for (int k = 0; k < n_cand; k++) {
            int ok = 1;
            for (int i = 0; i < n && ok; i++) {
                tmp[i] = -1;
                for (int o = 0; o < g[i].n_opts; o++)
                    if (g[i].opt[o].bits == cand[k] && g[i].opt[o].group == var[j].group &&
                        g[i].opt[o].method == var[j].method)
                        tmp[i] = o;
                if (tmp[i] < 0 && g[i].n_opts > 1) ok = 0;
                if (tmp[i] < 0) tmp[i] = 0;
            }
            uint64_t bytes = ok ? choice_bytes(g, n, tmp) : 0;
            if (ok && bytes <= target && bytes > best_bytes) {
                best_bytes = bytes;
                memcpy(ch, tmp, (size_t)n * sizeof *ch);
                snprintf(what, len, "uniform %d-bit group %d %s", cand[k], var[j].group,
                         qmix_method_name(var[j].method));
                found = 1;
            }
        }
    free(tmp);
    return found;
}

typedef struct rank { int i; double key; } rank;

static int cmp_rank(const void *a, const void *b)
{
    const rank *x = a, *y = b;
    return x->key > y->key ? -1 : x->key < y->key ? 1 : x->i - y->i;
}

/* The recipe (text, parsed, sized) of the choices ch over g's settings. */
static int choice_recipe(const alloc_job *j, qmix_alloc_group *g, int n, const int *ch,
                         char *text, qmix_recipe *recipe, qmix_quant_report *final)
{
    for (int i = 0; i < n; i++) g[i].choice = ch[i];
    return chosen_recipe(j, g, n, text, recipe, final);
}

/* See step 5b of quantize_with_budget. Candidates are written to out (each overwriting the
 * last); on return g's choices, text, recipe and final hold the best measured allocation,
 * *written says whether out holds it. */
static int refine(const alloc_job *job, qmix_alloc_group *g, int n, uint64_t target,
                  const variant *var, int n_var, const int32_t *tokens, int64_t n_tokens,
                  const char *out, qmix_quant_opts *qo, char *text, qmix_recipe *recipe,
                  qmix_quant_report *final, qmix_quant_report *best_rep, int *written,
                  double *best_kld, double *best_top1, int64_t *best_scored, json_t **jout)
{
    const budget_args *b = job->b;
    int *best = malloc((size_t)n * sizeof *best), *ch = malloc((size_t)n * sizeof *ch),
        *round_best = malloc((size_t)n * sizeof *round_best);
    rank *up = malloc((size_t)n * sizeof *up), *down = malloc((size_t)n * sizeof *down);
    char *ctext = malloc(RECIPE_BYTES);
    json_t *steps = jout ? json_array() : NULL;
    int rc = -1, saved_progress = qo->progress;
    if (!best || !ch || !round_best || !up || !down || !ctext) {
        fprintf(stderr, "qmix %s: out of memory\n", CMD);
        goto out;
    }
    double t0 = cli_now(), top1;
    int64_t scored;
    qmix_quant_report rep, round_rep = {0};
    qo->progress = 0;
    if (write_out(job->in, out, b->gguf, qo, recipe, &rep) ||
        measure_kld(job->in, out, b, tokens, n_tokens, best_kld, best_top1, best_scored))
        goto out;
    qo->force = 1; /* out is ours now: later candidates overwrite it */
    *best_rep = rep;
    *written = 1;
    for (int i = 0; i < n; i++) best[i] = g[i].choice;
    if (!b->json)
        printf("refine       the allocation: predicted KLD %.5f, measured %.5f (%.1f s a "
               "candidate; at most %d rounds of <= 5)\n", qmix_alloc_kld(g, n), *best_kld,
               cli_now() - t0, b->refine);
    if (steps)
        json_array_append_new(steps, json_pack("{s:i, s:s, s:f, s:f}", "round", 0, "move",
                                               "allocation", "predicted", qmix_alloc_kld(g, n),
                                               "measured", *best_kld));
    for (int round = 1; round <= b->refine && !cli_stop; round++) {
        double round_kld = -1, round_top1 = 0;
        int64_t round_scored = 0;
        int round_written = 0;
        char round_what[160] = "";
        for (int i = 0; i < n; i++) {
            const qmix_alloc_opt *c = &g[i].opt[best[i]];
            up[i] = (rank){i, c->kld};
            down[i] = (rank){i, -(c->kld + 1e-12) / (double)(c->bytes + 1)};
        }
        qsort(up, (size_t)n, sizeof *up, cmp_rank);
        qsort(down, (size_t)n, sizeof *down, cmp_rank);
        int nu = 0, nd = 0;
        for (int mv = 0; mv < 5; mv++) {
            char what[160], names[256];
            int ok = 0;
            if (mv == 0) {
                ok = round == 1 && uniform_anchor(g, n, target, b->cand_bits, b->n_cand, var,
                                                  n_var, ch, what, sizeof what);
            } else {
                int is_up = mv <= 2;
                while (!ok && (is_up ? nu : nd) < n) {
                    int i = is_up ? up[nu++].i : down[nd++].i;
                    memcpy(ch, best, (size_t)n * sizeof *ch);
                    if ((ok = swap_move(g, n, target, ch, i, is_up)))
                        snprintf(what, sizeof what, "%s %s", group_roles(&g[i], names, sizeof names),
                                 is_up ? "up" : "down");
                }
            }
            int same = 1;
            for (int i = 0; ok && i < n; i++) same &= ch[i] == best[i];
            qmix_quant_report cfinal;
            qmix_recipe crecipe;
            if (!ok || same) continue;
            if (choice_recipe(job, g, n, ch, ctext, &crecipe, &cfinal)) goto out;
            if (cfinal.bytes > job->weights_budget) continue;
            double kld, predicted = qmix_alloc_kld(g, n);
            if (write_out(job->in, out, b->gguf, qo, &crecipe, &rep) ||
                measure_kld(job->in, out, b, tokens, n_tokens, &kld, &top1, &scored))
                goto out;
            *written = 0;
            round_written = 0;
            if (!b->json)
                printf("refine       round %d: %-40s predicted KLD %.5f, measured %.5f\n", round,
                       what, predicted, kld);
            if (steps)
                json_array_append_new(steps, json_pack("{s:i, s:s, s:f, s:f}", "round", round,
                                                       "move", what, "predicted", predicted,
                                                       "measured", kld));
            if (round_kld < 0 || kld < round_kld) {
                round_kld = kld;
                round_top1 = top1;
                round_scored = scored;
                round_rep = rep;
                round_written = 1;
                memcpy(round_best, ch, (size_t)n * sizeof *ch);
                snprintf(round_what, sizeof round_what, "%s", what);
            }
        }
        /* a gain below 0.1 % is measurement detail, not a better allocation */
        if (round_kld < 0 || round_kld >= *best_kld * (1 - 1e-3)) break;
        memcpy(best, round_best, (size_t)n * sizeof *best);
        *best_kld = round_kld;
        *best_top1 = round_top1;
        *best_scored = round_scored;
        *best_rep = round_rep;
        *written = round_written;
        if (!b->json) printf("refine       round %d: took %s\n", round, round_what);
        if (steps)
            json_array_append_new(steps, json_pack("{s:i, s:s, s:f}", "round", round, "took",
                                                   round_what, "measured", round_kld));
    }
    if (choice_recipe(job, g, n, best, text, recipe, final)) goto out;
    if (!b->json) printf("refine       best measured KLD %.5f (%.1f s)\n\n", *best_kld,
                         cli_now() - t0);
    rc = 0;
out:
    qo->progress = saved_progress;
    if (jout && !rc) *jout = steps;
    else json_decref(steps);
    free(best);
    free(ch);
    free(round_best);
    free(up);
    free(down);
    free(ctext);
    return rc;
}

/* ---- the command ------------------------------------------------------------------------- */

static int allocated_role(int r)
{
    return r != QMIX_ROLE_NORM && r != QMIX_ROLE_GDN_PARAMS && r != QMIX_ROLE_VISION &&
           r != QMIX_ROLE_MTP && r != QMIX_ROLE_OTHER;
}

int quantize_with_budget(const char *in, const char *out, const budget_args *args,
                         qmix_quant_opts *qo)
{
    budget_args bv = *args, *b = &bv;
    if (b->gguf) {
        /* GGUF: blocks fix their own group size (one nominal 32); widths 2-6 and 8 each have a
         * type; the shared-expert gate is always written F32 (llama.cpp never quantizes it) */
        if (b->group_given || b->n_methods > 1 ||
            b->methods[0] != QMIX_METHOD_RTN || b->stats) {
            fprintf(stderr, "qmix %s: --format gguf allocates GGUF block types, rounded to "
                    "nearest: --group, --methods and --stats do not apply\n", CMD);
            return 2;
        }
        b->groups[0] = 32;
        if (!b->cand_given) {
            const int cand[] = {2, 3, 4, 5, 6, 8};
            b->n_cand = 6;
            memcpy(b->cand_bits, cand, sizeof cand);
        }
        b->keep_roles |= 1u << QMIX_ROLE_SHARED_EXPERT_GATE;
    }
    int gptq = qo->format == QMIX_QFORMAT_GPTQ;
    qmix_config cfg = {0};
    if (gptq) {
        /* vLLM: 2/3/4/8 bits; router, shared-expert gate and embedding 16-bit */
        int n = 0;
        for (int k = 0; k < b->n_cand; k++)
            if (b->cand_bits[k] != 5 && b->cand_bits[k] != 6) b->cand_bits[n++] = b->cand_bits[k];
        if (!n) {
            fprintf(stderr, "qmix %s: --format gptq holds 2, 3, 4 or 8 bits: give those in "
                    "--candidates\n", CMD);
            return 2;
        }
        b->n_cand = n;
        b->keep_roles |= 1u << QMIX_ROLE_SHARED_EXPERT_GATE | 1u << QMIX_ROLE_EMBED |
                         1u << QMIX_ROLE_ROUTER;
        qmix_model *m;
        qmix_err e;
        if (qmix_model_open(in, &m, &e)) {
            fprintf(stderr, "qmix %s: %s\n", CMD, e.msg);
            return 1;
        }
        cfg = *qmix_model_config(m);
        qmix_model_close(m);
    }
    if (!b->n_sensitivity && !b->calib && !b->tokens) {
        fprintf(stderr, "qmix %s: a budget needs measured sensitivity: give --calib FILE, --tokens "
                "FILE or --sensitivity FILE\n", CMD);
        return 2;
    }
    if ((b->budget != 0) + (b->memory != 0) + (b->bpw > 0) != 1) {
        fprintf(stderr, "qmix %s: give one of --budget, --memory and --bpw\n", CMD);
        return 2;
    }
    int rc = 1;
    int32_t *tokens = NULL;
    int64_t n_tokens = 0;
    sens_row *rows = NULL;
    int n_rows = 0, layers_seen = 0;
    qmix_alloc_group *g = calloc(MAX_GROUPS, sizeof *g);
    char *text = malloc(RECIPE_BYTES), *fixed = NULL;
    json_t *js = NULL;
    qmix_calib *stats = NULL;
    qmix_err err;
    cli_catch_sigint();
    if (!g || !text) goto done;
    if ((b->calib || b->tokens) && cli_eval_tokens(CMD, in, b->calib, b->tokens, &tokens, &n_tokens))
        goto done;
    if (b->fixed && qmix_read_file(b->fixed, 1 << 20, &fixed, NULL, &err)) {
        fprintf(stderr, "qmix %s: --fixed: %s\n", CMD, err.msg);
        goto done;
    }
    if (b->stats && qmix_calib_open(b->stats, &stats, &err)) {
        fprintf(stderr, "qmix %s: --stats: %s\n", CMD, err.msg);
        goto done;
    }
    qo->calib = stats; /* the dry runs check a method= rule has what it needs */

    /* 1. the measured loss of every group at every width, per candidate variant (group size,
     * method): the --sensitivity files say what they were measured with; measuring, every
     * --group with every --methods */
    variant var[MAX_VARIANTS];
    int n_var = 0;
    if (b->n_sensitivity) {
        for (int f = 0; f < b->n_sensitivity; f++) {
            int seen = 0;
            variant v;
            if (load_sensitivity_json(b->sensitivity[f], b->gguf, &rows, &n_rows, &seen, &v))
                goto done;
            if (f && seen != layers_seen) {
                fprintf(stderr, "qmix %s: --sensitivity files mix per-role and per-layer rows\n", CMD);
                goto done;
            }
            layers_seen = seen;
            for (int j = 0; j < n_var; j++)
                if (var[j].group == v.group && var[j].method == v.method) {
                    fprintf(stderr, "qmix %s: two --sensitivity files at group size %d with %s\n",
                            CMD, v.group, qmix_method_name(v.method));
                    goto done;
                }
            var[n_var++] = v;
        }
    } else {
        /* by default every group size competes (the choice pays most on every model measured) */
        if (!b->group_given && !b->gguf) {
            const int all[3] = {64, 32, 128};
            memcpy(b->groups, all, sizeof all);
            b->n_groups = 3;
        }
        for (int j = 0; j < b->n_groups; j++)
            for (int k = 0; k < b->n_methods; k++)
                var[n_var++] = (variant){b->groups[j], b->methods[k]};
        double t_first = cli_now();
        for (int j = 0; j < n_var; j++) {
            if (measure_sensitivity(in, b, var[j], stats, tokens, n_tokens, &rows, &n_rows))
                goto done;
            if (j == 0 && n_var > 1)
                fprintf(stderr, "qmix %s: %d more candidate variants to measure: about %.0f s "
                        "(--group/--methods choose fewer)\n", CMD, n_var - 1,
                        (cli_now() - t_first) * (n_var - 1));
        }
        layers_seen = b->bands > 1;
    }
    /* one canonical order (group size, then method), so nothing downstream (tie-breaks, the
     * recipe's header) depends on the order the inputs were given in */
    for (int j = 1; j < n_var; j++)
        for (int k = j; k > 0 && (var[k].group < var[k - 1].group ||
                                  (var[k].group == var[k - 1].group &&
                                   var[k].method < var[k - 1].method)); k--) {
            variant t = var[k];
            var[k] = var[k - 1];
            var[k - 1] = t;
        }
    for (int j = 0; j < n_var; j++)
        if (var[j].method != QMIX_METHOD_RTN && !stats) {
            fprintf(stderr, "qmix %s: %s candidates need --stats (the statistics of qmix "
                    "calibrate) to quantize with\n", CMD, qmix_method_name(var[j].method));
            goto done;
        }
    /* the distinct group sizes, each sized once below */
    int groups[MAX_VARIANTS], n_groups = 0, var_group[MAX_VARIANTS];
    for (int j = 0; j < n_var; j++) {
        int gi = 0;
        while (gi < n_groups && groups[gi] != var[j].group) gi++;
        if (gi == n_groups) groups[n_groups++] = var[j].group;
        var_group[j] = gi;
    }
    if (b->bands > 1 && !layers_seen) {
        fprintf(stderr, "qmix %s: --layer-bands needs per-layer sensitivity (qmix sensitivity "
                "--per-layer --json)\n", CMD);
        goto done;
    }

    /* 2. what every role costs at each candidate (width, group size), and kept */
    qmix_quant_report keep, at[MAX_VARIANTS][9];
    /* kept weights are the same 16-bit bytes in MLX and GPTQ output (and GPTQ refuses a file
     * with nothing quantized) */
    qmix_quant_opts keep_opts = *qo;
    if (gptq) keep_opts.format = QMIX_QFORMAT_MLX;
    if (dry_run(in, "default keep\n", &keep_opts, b->gguf, &keep)) goto done;
    for (int j = 0; j < n_groups; j++)
        for (int k = 0; k < b->n_cand; k++) {
            char line[1024];
            int off = snprintf(line, sizeof line, "default bits=%d group=%d\n", b->cand_bits[k],
                               groups[j]);
            /* GPTQ: roles it cannot hold at these bits stay 16-bit in the sizing run (and are
             * no candidate below) */
            for (int r = 0; gptq && r < QMIX_ROLE_COUNT; r++)
                if (allocated_role(r) && !gptq_role_ok(&cfg, r, b->cand_bits[k], groups[j]))
                    off += snprintf(line + off, sizeof line - (size_t)off, "%s keep\n",
                                    qmix_role_name((qmix_role)r));
            if (dry_run(in, line, qo, b->gguf, &at[j][b->cand_bits[k]])) goto done;
        }

    if (gptq) {
        /* what GPTQ output always keeps (norms, GDN parameters, MTP, vision) as it writes it */
        const qmix_quant_report *any = &at[0][b->cand_bits[0]];
        for (int r = 0; r < QMIX_ROLE_COUNT; r++)
            if (!allocated_role(r)) keep.roles[r] = any->roles[r];
        keep.params = any->params;
    }

    /* 3. the budget for the weights */
    uint64_t weights_budget;
    qmix_plan plan = {0};
    if (b->bpw > 0) {
        weights_budget = (uint64_t)(b->bpw * (double)keep.params / 8.0);
    } else {
        char dir[4096];
        if (cli_model_dir(in, dir, sizeof dir)) goto done;
        qmix_plan_opts po = {.kv_bits = b->kv_bits, .ctx = b->ctx, .vision = b->vision,
                             .n_threads = b->threads, .memory = b->memory ? b->memory : b->budget,
                             .reserve = b->reserve};
        if (qmix_plan_checkpoint(dir, &po, &plan, &err)) {
            fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
            goto done;
        }
        uint64_t runtime = plan.peak_bytes - plan.weight_bytes;
        if (plan.available <= runtime) {
            fprintf(stderr, "qmix %s: %.2f GiB available cannot hold even the runtime (%.2f GiB at "
                    "%d tokens of context)\n", CMD, plan.available / 1073741824.0,
                    runtime / 1073741824.0, b->ctx);
            goto done;
        }
        weights_budget = plan.available - runtime;
    }

    /* 4. groups: a role (or a role in a band of layers) with its settings */
    int n_layers = 0, n = 0;
    for (int i = 0; i < n_rows; i++)
        if (rows[i].layer + 1 > n_layers) n_layers = rows[i].layer + 1;
    int bands = layers_seen ? b->bands : 1;
    uint64_t fixed_bytes = 0;
    for (int r = 0; r < QMIX_ROLE_COUNT; r++) {
        if (!keep.roles[r].tensors) continue;
        int has_rows = 0;
        for (int i = 0; i < n_rows; i++) has_rows |= rows[i].role == r;
        if (!allocated_role(r) || !has_rows) {
            fixed_bytes += keep.roles[r].bytes;
            continue;
        }
        /* rows repeat per variant with the same parameters: count them from one variant's
         * (the largest total, so a variant with rows missing cannot shrink the role) */
        int64_t role_params = 0;
        for (int j = 0; j < n_var; j++) {
            int64_t p = 0;
            for (int i = 0; i < n_rows; i++)
                if (rows[i].role == r && rows[i].group == var[j].group &&
                    rows[i].method == var[j].method)
                    p += rows[i].params;
            if (p > role_params) role_params = p;
        }
        for (int band = 0; band < bands; band++) {
            int lo = bands > 1 ? band * n_layers / bands : -1;
            int hi = bands > 1 ? (band + 1) * n_layers / bands - 1 : -1;
            /* Per variant: a group size may not divide some matrices of the role (a 64-wide
             * input at group 128), so whether the group can take a variant, and how much of it
             * was measured, is the variant's own: a candidate the group cannot take is skipped
             * for that group, never turned into "keep" for all of them. */
            double kld[MAX_VARIANTS][9] = {{0}}, params_v[MAX_VARIANTS] = {0},
                   measured[MAX_VARIANTS] = {0}, params = 0;
            int quantizable[MAX_VARIANTS], seen[MAX_VARIANTS] = {0}, any = 0;
            for (int j = 0; j < n_var; j++) quantizable[j] = 1;
            for (int i = 0; i < n_rows; i++) {
                const sens_row *s = &rows[i];
                /* global rows (embed, lm_head) fall in the first band only */
                int in_band = s->role == r && (bands == 1 || (s->layer < 0 ? band == 0
                                                               : s->layer >= lo && s->layer <= hi));
                int vi = 0;
                while (vi < n_var && (var[vi].group != s->group || var[vi].method != s->method))
                    vi++;
                if (!in_band || vi == n_var) continue;
                for (int k = 2; k <= 8; k++) kld[vi][k] += s->kld[k]; /* NAN if unmeasured */
                any = seen[vi] = 1;
                params_v[vi] += (double)s->params;
                measured[vi] += (double)(s->params_measured > 0 ? s->params_measured : s->params);
                quantizable[vi] &= s->quantizable;
            }
            if (!any) continue;
            for (int j = 0; j < n_var; j++)
                if (params_v[j] > params) params = params_v[j];
            /* A sampled measurement (some layers, some experts) stands for the whole group: its
             * KLD is scaled by the parameters it covers, the role's from the dry run when the
             * group is the whole role, else the rows' own (their sampled experts). */
            double whole = bands == 1 ? (double)keep.roles[r].params : params;
            for (int j = 0; j < n_var; j++)
                if (measured[j] > 0 && whole > measured[j])
                    for (int k = 2; k <= 8; k++) kld[j][k] *= whole / measured[j];
            if (n == MAX_GROUPS) {
                fprintf(stderr, "qmix %s: more than %d groups: use fewer --layer-bands\n", CMD,
                        MAX_GROUPS);
                goto done;
            }
            qmix_alloc_group *gr = &g[n++];
            gr->role = (qmix_role)r;
            int global = r == QMIX_ROLE_EMBED || r == QMIX_ROLE_LM_HEAD;
            gr->layer_lo = global ? -1 : lo;
            gr->layer_hi = global ? -1 : hi;
            double share = role_params > 0 ? params / (double)role_params : 1;
            gr->opt[gr->n_opts++] = (qmix_alloc_opt){.bytes = (uint64_t)(keep.roles[r].bytes * share)};
            if ((b->keep_roles & (1u << r)) || b->min_bits[r] > 8) continue;
            for (int j = 0; j < n_var; j++)
                for (int k = 0; k < b->n_cand && seen[j] && quantizable[j]; k++) {
                    int bits = b->cand_bits[k];
                    if (bits < b->min_bits[r] || isnan(kld[j][bits])) continue;
                    if (gptq && !gptq_role_ok(&cfg, r, bits, var[j].group)) continue;
                    gr->opt[gr->n_opts++] = (qmix_alloc_opt){
                        .bits = bits, .group = var[j].group, .method = var[j].method,
                        .bytes = (uint64_t)(at[var_group[j]][bits].roles[r].bytes * share),
                        .kld = kld[j][bits] > 0 ? kld[j][bits] : 0};
                }
        }
    }
    for (size_t k = 0; gptq && k < sizeof gptq_fused / sizeof *gptq_fused; k++)
        n = qmix_alloc_link(g, n, gptq_fused[k]);
    if (weights_budget <= fixed_bytes) {
        fprintf(stderr, "qmix %s: the weight budget (%.1f MiB) does not even hold what is always "
                "kept at 16 bits (%.1f MiB)\n", CMD, weights_budget / 1048576.0,
                fixed_bytes / 1048576.0);
        goto done;
    }

    /* 5. allocate; the recipe's real size comes from one more dry run (bands split a role's
     * bytes by parameters, which can round differently): shrink and retry if it overshoots */
    uint64_t target = weights_budget - fixed_bytes;
    qmix_quant_report final;
    qmix_recipe recipe;
    char header[768], var_list[256] = "";
    for (int j = 0, off = 0; j < n_var; j++)
        off += snprintf(var_list + off, sizeof var_list - (size_t)off, "%sgroup %d %s",
                        j ? ", " : "", var[j].group, qmix_method_name(var[j].method));
    snprintf(header, sizeof header,
             "# chosen by qmix quantize for a weight budget of %.1f MiB (%s)\n"
             "# candidates: keep and %d widths with %s;\n"
             "# predicted KLD is the sum of the groups' measured KLDs\n", weights_budget / 1048576.0,
             b->bpw > 0 ? "--bpw" : b->budget ? "--budget" : "--memory", b->n_cand, var_list);
    alloc_job job = {in, qo, b, header, fixed, var[0].group, weights_budget};
    if (allocate_recipe(&job, g, n, target, text, &recipe, &final, 0)) goto done;
    double predicted = qmix_alloc_kld(g, n);

    /* 5b. refine: the predictor adds the groups' separate losses, which is wrong where errors
     * compound (or cancel), so measure the allocation, then alternatives that move a group
     * (the largest predicted losses up a setting, the cheapest-per-byte protected ones down,
     * and once the best uniform setting that fits), the bytes balanced by the predictor's best
     * steps elsewhere; keep the best measured, until a round finds nothing better */
    int best_written = 0;
    qmix_quant_report best_rep = {0};
    double best_measured = -1, best_top1 = 0;
    int64_t best_scored = 0;
    json_t *jrefine = NULL;
    if (b->refine > 0 && b->verify && tokens && !b->dry_run &&
        refine(&job, g, n, target, var, n_var, tokens, n_tokens, out, qo, text, &recipe, &final,
               &best_rep, &best_written, &best_measured, &best_top1, &best_scored,
               b->json ? &jrefine : NULL))
        goto done;
    predicted = qmix_alloc_kld(g, n);

    /* 6. report */
    char hb[32], ha[32], hr[32];
    cli_human_bytes((double)weights_budget, hb, sizeof hb);
    if (b->json) js = json_object();
    if (js) {
        json_t *jgroups = json_array();
        for (int i = 0; i < n; i++) {
            const qmix_alloc_opt *c = &g[i].opt[g[i].choice];
            char names[256];
            json_array_append_new(jgroups, json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:s, s:I, s:f}",
                                                     "role", qmix_role_name(g[i].role), "roles",
                                                     group_roles(&g[i], names, sizeof names),
                                                     "layer_lo",
                                                     g[i].layer_lo, "layer_hi", g[i].layer_hi,
                                                     "bits", c->bits ? c->bits : 16, "group_size",
                                                     c->bits ? c->group : 0, "method",
                                                     c->bits ? qmix_method_name(c->method) : "keep",
                                                     "bytes",
                                                     (json_int_t)c->bytes, "kld", c->kld));
        }
        json_object_set_new(js, "budget_bytes", json_integer((json_int_t)weights_budget));
        json_object_set_new(js, "bytes", json_integer((json_int_t)final.bytes));
        json_object_set_new(js, "fixed_bytes", json_integer((json_int_t)fixed_bytes));
        json_object_set_new(js, "bpw", json_real(final.bpw));
        json_object_set_new(js, "predicted_kld", json_real(predicted));
        json_object_set_new(js, "groups", jgroups);
        json_object_set_new(js, "recipe", json_string(text));
        if (jrefine) json_object_set_new(js, "refine", jrefine);
        jrefine = NULL;
    } else {
        if (b->bpw > 0) {
            printf("budget       weights <= %s (%.3f bpw of %llu parameters)\n", hb, b->bpw,
                   (unsigned long long)keep.params);
        } else {
            cli_human_bytes((double)plan.available, ha, sizeof ha);
            cli_human_bytes((double)(plan.peak_bytes - plan.weight_bytes), hr, sizeof hr);
            printf("budget       weights <= %s (%s available - %s runtime at %d tokens)\n", hb, ha,
                   hr, b->ctx);
        }
        cli_human_bytes((double)final.bytes, ha, sizeof ha);
        printf("allocation   %s, %.3f bpw, predicted KLD %.5f (sum over %d groups)%s\n\n", ha,
               final.bpw, predicted, n,
               final.bytes > weights_budget ? "  -- OVER BUDGET (the --fixed rules)" : "");
        printf("| Group | Layers | Bits | Group size | Method | Params | Bytes | Share | Predicted KLD |\n"
               "|---|---|---|---|---|---|---|---|---|\n");
        for (int i = 0; i < n; i++) {
            const qmix_alloc_opt *c = &g[i].opt[g[i].choice];
            char layers[32] = "all", bits[8] = "bf16", gsize[8] = "-", names[256];
            if (g[i].layer_lo >= 0)
                snprintf(layers, sizeof layers, "%d-%d", g[i].layer_lo, g[i].layer_hi);
            if (c->bits) snprintf(bits, sizeof bits, "%d", c->bits);
            if (c->bits) snprintf(gsize, sizeof gsize, "%d", c->group);
            /* a whole role: the dry run's count (sampled rows cover only some layers) */
            uint32_t mask = 1u << g[i].role | g[i].also;
            double params = 0;
            for (int r = 0; r < QMIX_ROLE_COUNT && g[i].layer_lo < 0; r++)
                if (mask & (1u << r)) params += (double)keep.roles[r].params;
            for (int k = 0; k < n_rows && g[i].layer_lo >= 0; k++)
                if ((mask & (1u << rows[k].role)) && rows[k].layer >= g[i].layer_lo &&
                    rows[k].layer <= g[i].layer_hi)
                    params += (double)rows[k].params;
            cli_human_bytes((double)c->bytes, ha, sizeof ha);
            printf("| %s | %s | %s | %s | %s | %.0f | %s | %.1f%% | %.5f |\n",
                   group_roles(&g[i], names, sizeof names), layers, bits, gsize,
                   c->bits ? qmix_method_name(c->method) : "-", params, ha,
                   final.bytes ? 100.0 * (double)c->bytes / (double)final.bytes : 0, c->kld);
        }
        cli_human_bytes((double)fixed_bytes, ha, sizeof ha);
        printf("| (always kept: norms, GDN parameters, vision, MTP) | | bf16 | - | - | | %s | %.1f%% | 0 |\n\n",
               ha, final.bytes ? 100.0 * (double)fixed_bytes / (double)final.bytes : 0);
    }
    if (b->recipe_out) {
        if (qmix_write_file(b->recipe_out, text, strlen(text), &err)) {
            fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
            goto done;
        }
    }
    if (b->dry_run) {
        if (!js) printf("recipe (--dry-run: nothing written)\n\n%s", text);
        rc = 0;
        goto done;
    }

    /* 7. quantize with it (unless refining left the best written), keep the recipe beside the
     * weights, measure the real KLD */
    qmix_quant_report rep;
    char path[4200];
    snprintf(path, sizeof path, b->gguf ? "%s.recipe.txt" : "%s/qmix-recipe.txt", out);
    if (best_written) rep = best_rep;
    else if (write_out(in, out, b->gguf, qo, &recipe, &rep)) goto done;
    if (qmix_write_file(path, text, strlen(text), &err)) {
        fprintf(stderr, "qmix %s: %s\n", CMD, err.msg);
        goto done;
    }
    cli_human_bytes((double)rep.bytes, ha, sizeof ha);
    if (js) json_object_set_new(js, "written_bytes", json_integer((json_int_t)rep.bytes));
    else printf("quantized %s -> %s%s: %s, %.3f bpw, recipe in %s\n", in, out,
                b->gguf ? " (GGUF)" : "", ha, rep.bpw, path);
    double mean = best_measured, top1 = best_top1;
    int64_t scored = best_scored;
    if (b->verify && tokens && (best_measured >= 0 ||
                                !measure_kld(in, out, b, tokens, n_tokens, &mean, &top1, &scored))) {
        if (js) {
            json_object_set_new(js, "measured_kld", json_real(mean));
            json_object_set_new(js, "measured_top1", json_real(top1));
        } else {
            printf("verified     measured KLD %.5f vs predicted %.5f on %lld calibration "
                   "tokens (top-1 %.1f %%)%s\n", mean, predicted, (long long)scored, 100.0 * top1,
                   b->n_sensitivity ? "" : " (the tokens the prediction was measured on)");
        }
    }
    rc = 0;
done:
    if (js) {
        if (rc == 0) {
            char *dump = json_dumps(js, JSON_INDENT(2) | JSON_REAL_PRECISION(8));
            printf("%s\n", dump);
            free(dump);
        }
        json_decref(js);
    }
    json_decref(jrefine);
    qmix_calib_close(stats);
    free(g);
    free(text);
    free(fixed);
    free(rows);
    free(tokens);
    return rc;
}

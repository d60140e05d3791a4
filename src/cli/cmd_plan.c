/* qmix plan: will this model, with this recipe, at this context, fit in this much memory — and
 * what is the longest context that does. The arithmetic is src/eval/plan.c; this file parses the
 * flags and prints the seed-card-style tables or one JSON object. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "eval/plan.h"
#include "model/geometry.h"
#include "quant/recipe.h"
#include "util/err.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix plan MODEL|--like 35b-a3b|122b-a10b|397b-a17b|tiny --memory SIZE\n"
            "                 [--reserve SIZE] [--recipe NAME|FILE] [--ctx N] [--kv-bits 32|16|8|4]\n"
            "                 [--vision] [--threads N] [--json]\n\n"
            "Predicts the memory a model needs and the longest context that fits in --memory minus\n"
            "--reserve: the weights (the text model's tensors; MTP is never read; with --recipe,\n"
            "sized exactly as `qmix quantize` would write them), qmix's session (activations for a\n"
            "batch of up to 512 tokens, per-thread buffers, logits), the fixed Gated DeltaNet state,\n"
            "the KV cache (full-attention layers x 2 x KV heads x head_dim x bytes per element) and\n"
            "the process itself. Prints a budget ending in the KV headroom and a KV table over\n"
            "32K..256K contexts per KV width.\n\n"
            "  MODEL               a checkpoint directory (HF or MLX layout) or a .safetensors file\n"
            "  --like NAME         a built-in geometry with its real layer count instead (bf16 as\n"
            "                      released unless --recipe)\n"
            "  --memory SIZE       the machine's memory, e.g. 16G, 24GiB (required)\n"
            "  --reserve SIZE      kept free for the OS and other programs, e.g. 3.5G (default 0)\n"
            "  --recipe NAME|FILE  size the weights after quantizing with a preset (qmix presets) or\n"
            "                      a recipe file (docs/recipes.md)\n"
            "  --ctx N             context to predict the peak for (default 4096)\n"
            "  --kv-bits B         qmix's KV cache for the fit, as --kv-bits of generate/serve:\n"
            "                      32 f32 (the default), 16 f16, 8 q8_0, 4 q4_0 (block scales\n"
            "                      counted: 8.5 and 4.5 bits per value); --kv-type f32|f16|q8_0|q4_0\n"
            "                      names the same\n"
            "  --vision            count the vision tower (the checkpoint's model.visual.* tensors,\n"
            "                      else the family's vision config in bf16)\n"
            "  --threads N         threads of the session (default: all cores)\n"
            "  --json              one JSON object instead of the tables\n\n"
            "SIZE is a number with an optional unit B, K, M, G, T (also KB/KiB, MB/MiB, ...);\n"
            "every unit is binary: 1K = 1024, 16G = 16 GiB. Printed sizes are binary too.\n");
}

/* "12.50 GiB" / "63.0 MiB": binary units at the precision model cards print. */
static void gib(uint64_t bytes, char *buf, size_t len)
{
    double b = (double)bytes;
    if (b >= 1024.0 * 1024 * 1024) snprintf(buf, len, "%.2f GiB", b / (1024.0 * 1024 * 1024));
    else if (b >= 1024.0 * 1024) snprintf(buf, len, "%.1f MiB", b / (1024.0 * 1024));
    else if (b >= 1024.0) snprintf(buf, len, "%.1f KiB", b / 1024.0);
    else snprintf(buf, len, "%llu B", (unsigned long long)bytes);
}

/* A size as the flags take it back: "16G", "3.5G", "512M", "0". */
static const char *size_arg(uint64_t bytes, char *buf, size_t len)
{
    if (bytes % (1ull << 30) == 0 || bytes >= (1ull << 30))
        snprintf(buf, len, "%.4gG", (double)bytes / (1ull << 30));
    else
        snprintf(buf, len, "%.4gM", (double)bytes / (1ull << 20));
    if (!bytes) snprintf(buf, len, "0");
    return buf;
}

static void ctx_label(int ctx, char *buf, size_t len)
{
    if (ctx % 1024 == 0) snprintf(buf, len, "%dK", ctx / 1024);
    else snprintf(buf, len, "%d", ctx);
}

static const char *kv_bits_name(int bits)
{
    switch (bits) {
    case 32: return "f32";
    case 16: return "f16";
    case 8: return "q8_0, 8.5 bits per value with its scales";
    default: return "q4_0, 4.5 bits per value with its scales";
    }
}

static void print_tables(const char *source, const qmix_plan *p, const qmix_plan_opts *o,
                         const char *recipe_name)
{
    const qmix_config *c = &p->cfg;
    char b1[32], b2[32], b3[32];
    printf("model    %s: %d layers (%d Gated DeltaNet + %d full attention), hidden %d, %d experts "
           "top-%d, vocab %d\n",
           source, c->n_layers, p->n_linear, p->n_full, c->hidden_size, c->n_experts,
           c->n_experts_used, c->vocab_size);
    gib(p->weight_bytes, b1, sizeof b1);
    printf("weights  %s, %.3f bpw (%s)", b1, p->bpw,
           recipe_name ? recipe_name : p->from_checkpoint ? "as stored" : "bf16 as released");
    if (p->skipped_bytes) {
        gib(p->skipped_bytes, b2, sizeof b2);
        printf("; %s in the checkpoint never read (%s)", b2,
               p->skipped_vision ? "MTP block, vision tower" : "MTP block");
    }
    if (p->embed_bytes) {
        gib(p->embed_bytes, b2, sizeof b2);
        printf("\n         of them the embedding table %s, counted whole (it becomes resident as "
               "tokens are seen)", b2);
    }
    printf("\nsession  %d thread(s), context %d, KV cache %s\n\n", p->n_threads, p->ctx,
           kv_bits_name(p->kv_bits));

    gib(o->memory, b1, sizeof b1);
    printf("Memory Budget (%s)\n", b1);
    printf("Total Memory: %s\n", b1);
    gib(o->reserve, b1, sizeof b1);
    printf("- Reserve (OS, other programs): -%s\n", b1);
    gib(p->weight_bytes, b1, sizeof b1);
    printf("- Weights (%s, %.3f bpw): -%s\n",
           recipe_name ? recipe_name : p->from_checkpoint ? "as stored" : "bf16", p->bpw, b1);
    if (o->vision) {
        gib(p->vision_bytes, b1, sizeof b1);
        printf("- Vision tower%s: -%s\n", p->vision_estimated ? " (vision config, bf16)" : "", b1);
    }
    gib(p->engine_bytes, b1, sizeof b1);
    printf("- Engine (process, widened 1-D parameters, tensor views): -%s\n", b1);
    gib(p->runtime_bytes, b1, sizeof b1);
    printf("- Runtime buffers (activations for %d tokens, %d thread(s), logits): -%s\n",
           p->ctx < 512 ? p->ctx : 512, p->n_threads, b1);
    gib(p->state_bytes, b1, sizeof b1);
    printf("- GatedDeltaNet state (%d layers, fixed): -%s\n", p->n_linear, b1);
    if (p->headroom >= 0) {
        gib((uint64_t)p->headroom, b1, sizeof b1);
        printf("= KV headroom: %s (%lld tokens at %d-bit KV%s)\n", b1, (long long)p->max_context,
               p->kv_bits, p->max_context_is_model_limit ? ", the model's limit" : "");
    } else {
        gib((uint64_t)-p->headroom, b1, sizeof b1);
        printf("= KV headroom: -%s (does not fit even without a KV cache)\n", b1);
    }

    gib(p->peak_bytes, b1, sizeof b1);
    gib(p->kv_bytes, b2, sizeof b2);
    gib(p->available, b3, sizeof b3);
    printf("\nPeak at %d tokens: %s (KV cache %s) — %s in %s\n", p->ctx, b1, b2,
           p->fits ? "fits" : "does NOT fit", b3);
    printf("Longest context that fits: %lld tokens (%d-bit KV)%s\n", (long long)p->max_context,
           p->kv_bits, p->max_context_is_model_limit ? ", the model's max_position_embeddings" : "");

    printf("\nKV Cache and Context Length\n");
    printf("- Full attention: %d of %d layers (the other %d are Gated DeltaNet)\n", p->n_full,
           c->n_layers, p->n_linear);
    printf("- KV heads: %d, head_dim %d\n", c->n_kv_heads, c->head_dim);
    for (int i = 0; i < QMIX_PLAN_N_TABLE_BITS; i++) {
        int bits = qmix_plan_table_bits[i];
        gib(qmix_plan_kv_per_token(c, bits), b1, sizeof b1);
        printf("- %d-bit KV per token: %s (%s)\n", bits, b1, kv_bits_name(bits));
    }
    gib(p->state_bytes, b1, sizeof b1);
    printf("- GatedDeltaNet state: %s (float32, fixed, independent of context length)\n", b1);
    printf("| KV Bits |");
    for (int j = 0; j < QMIX_PLAN_N_TABLE_CTX; j++) {
        ctx_label(qmix_plan_table_ctx[j], b1, sizeof b1);
        printf(" %s |", b1);
    }
    printf(" Longest that fits |\n|---|");
    for (int j = 0; j <= QMIX_PLAN_N_TABLE_CTX; j++) printf("---|");
    printf("\n");
    for (int i = 0; i < QMIX_PLAN_N_TABLE_BITS; i++) {
        int bits = qmix_plan_table_bits[i];
        printf("| %d-bit |", bits);
        for (int j = 0; j < QMIX_PLAN_N_TABLE_CTX; j++) {
            int ctx = qmix_plan_table_ctx[j];
            gib(qmix_plan_kv_per_token(c, bits) * (uint64_t)ctx, b1, sizeof b1);
            int fits = qmix_plan_peak_at(p, ctx, bits) <= p->available;
            printf(" %s %s |", b1, fits ? "✅" : "❌");
        }
        int lim = 0;
        long long mc = (long long)qmix_plan_max_context(p, bits, &lim);
        printf(" %lld%s |\n", mc, lim ? " (model limit)" : "");
    }
    printf("\n✅: the whole peak (weights, session, state and that KV cache) fits in memory − "
           "reserve.\n");
}

static int print_json(const char *source, const qmix_plan *p, const qmix_plan_opts *o,
                      const char *recipe_name)
{
    const qmix_config *c = &p->cfg;
    json_t *j = json_object();
    json_t *table = json_array();
    if (!j || !table) return -1;
    for (int i = 0; i < QMIX_PLAN_N_TABLE_BITS; i++) {
        int bits = qmix_plan_table_bits[i], lim = 0;
        json_t *ctxs = json_array();
        for (int k = 0; k < QMIX_PLAN_N_TABLE_CTX; k++) {
            int ctx = qmix_plan_table_ctx[k];
            uint64_t peak = qmix_plan_peak_at(p, ctx, bits);
            json_array_append_new(
                ctxs, json_pack("{s:i, s:I, s:I, s:b}", "ctx", ctx, "kv_bytes",
                                (json_int_t)(qmix_plan_kv_per_token(c, bits) * (uint64_t)ctx),
                                "peak_bytes", (json_int_t)peak, "fits", peak <= p->available));
        }
        int64_t mc = qmix_plan_max_context(p, bits, &lim);
        json_array_append_new(
            table, json_pack("{s:i, s:I, s:I, s:b, s:o}", "kv_bits", bits, "kv_bytes_per_token",
                             (json_int_t)qmix_plan_kv_per_token(c, bits), "max_context",
                             (json_int_t)mc, "max_context_is_model_limit", lim, "contexts", ctxs));
    }
    json_object_set_new(j, "model", json_string(source));
    json_object_set_new(j, "from_checkpoint", json_boolean(p->from_checkpoint));
    json_object_set_new(j, "recipe", recipe_name ? json_string(recipe_name) : json_null());
    json_object_set_new(j, "n_layers", json_integer(c->n_layers));
    json_object_set_new(j, "n_full_attention", json_integer(p->n_full));
    json_object_set_new(j, "n_linear_attention", json_integer(p->n_linear));
    json_object_set_new(j, "n_kv_heads", json_integer(c->n_kv_heads));
    json_object_set_new(j, "head_dim", json_integer(c->head_dim));
    json_object_set_new(j, "threads", json_integer(p->n_threads));
    json_object_set_new(j, "ctx", json_integer(p->ctx));
    json_object_set_new(j, "kv_bits", json_integer(p->kv_bits));
    json_object_set_new(j, "kv_is_qmix_cache", json_true());
    json_object_set_new(j, "memory_bytes", json_integer((json_int_t)o->memory));
    json_object_set_new(j, "reserve_bytes", json_integer((json_int_t)o->reserve));
    json_object_set_new(j, "available_bytes", json_integer((json_int_t)p->available));
    json_object_set_new(j, "weight_bytes", json_integer((json_int_t)p->weight_bytes));
    json_object_set_new(j, "weight_params", json_integer((json_int_t)p->weight_params));
    json_object_set_new(j, "bpw", json_real(p->bpw));
    json_object_set_new(j, "embed_bytes", json_integer((json_int_t)p->embed_bytes));
    json_object_set_new(j, "skipped_bytes", json_integer((json_int_t)p->skipped_bytes));
    json_object_set_new(j, "vision_bytes", json_integer((json_int_t)p->vision_bytes));
    json_object_set_new(j, "vision_estimated", json_boolean(p->vision_estimated));
    json_object_set_new(j, "engine_bytes", json_integer((json_int_t)p->engine_bytes));
    json_object_set_new(j, "runtime_bytes", json_integer((json_int_t)p->runtime_bytes));
    json_object_set_new(j, "gdn_state_bytes", json_integer((json_int_t)p->state_bytes));
    json_object_set_new(j, "kv_bytes_per_token", json_integer((json_int_t)p->kv_bytes_per_token));
    json_object_set_new(j, "kv_bytes", json_integer((json_int_t)p->kv_bytes));
    json_object_set_new(j, "fixed_bytes", json_integer((json_int_t)p->fixed_bytes));
    json_object_set_new(j, "peak_bytes", json_integer((json_int_t)p->peak_bytes));
    json_object_set_new(j, "kv_headroom_bytes", json_integer((json_int_t)p->headroom));
    json_object_set_new(j, "fits", json_boolean(p->fits));
    json_object_set_new(j, "max_context", json_integer((json_int_t)p->max_context));
    json_object_set_new(j, "max_context_is_model_limit",
                        json_boolean(p->max_context_is_model_limit));
    json_object_set_new(j, "kv_table", table);
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    if (!s) return -1;
    puts(s);
    free(s);
    return 0;
}

static int size_flag(const char *flag, const char *v, uint64_t *out)
{
    qmix_err err;
    if (qmix_parse_bytes(v, out, &err)) {
        fprintf(stderr, "qmix plan: %s: %s\n", flag, err.msg);
        return -1;
    }
    return 0;
}

int qmix_cmd_plan(int argc, char **argv)
{
    const char *model_path = NULL, *like = NULL, *recipe_arg = NULL;
    long ctx = 0, kv_bits = 32, threads = 0;
    int json = 0, have_memory = 0;
    qmix_plan_opts o = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--like")) {
            if (!(like = cli_value("plan", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--recipe")) {
            if (!(recipe_arg = cli_value("plan", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--memory")) {
            if (!(v = cli_value("plan", argc, argv, &i)) || size_flag(a, v, &o.memory)) return 2;
            have_memory = 1;
        } else if (!strcmp(a, "--reserve")) {
            if (!(v = cli_value("plan", argc, argv, &i)) || size_flag(a, v, &o.reserve)) return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = cli_value("plan", argc, argv, &i)) ||
                cli_int("plan", a, v, 1, 1 << 30, &ctx))
                return 2;
        } else if (!strcmp(a, "--kv-bits") || !strcmp(a, "--kv-type")) {
            qmix_kv_type kv;
            if (cli_kv_option("plan", argc, argv, &i, &kv) < 0) return 2;
            kv_bits = kv == QMIX_KV_F16 ? 16 : kv == QMIX_KV_Q8_0 ? 8 : kv == QMIX_KV_Q4_0 ? 4 : 32;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = cli_value("plan", argc, argv, &i)) ||
                cli_int("plan", a, v, 1, 1024, &threads))
                return 2;
        } else if (!strcmp(a, "--vision")) {
            o.vision = 1;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix plan: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "qmix plan: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path && !like) return cli_missing("plan", "MODEL (or --like 35b-a3b|122b-a10b|397b-a17b)");
    if (model_path && like) {
        fprintf(stderr, "qmix plan: give a MODEL or --like NAME, not both\n");
        return 2;
    }
    if (!have_memory) {
        fprintf(stderr, "qmix plan: --memory SIZE is required (e.g. --memory 16G)\n");
        return 2;
    }
    if (!o.memory) {
        fprintf(stderr, "qmix plan: --memory must be more than 0 bytes\n");
        return 2;
    }
    if (like && !qmix_geometry_find(like)) {
        fprintf(stderr, "qmix plan: --like: unknown geometry '%s' (35b-a3b, 122b-a10b, "
                        "397b-a17b, tiny)\n", like);
        return 2;
    }
    o.ctx = (int)ctx;
    o.kv_bits = (int)kv_bits;
    o.n_threads = (int)threads;

    qmix_err err;
    qmix_recipe recipe;
    if (recipe_arg) {
        if (qmix_recipe_get(recipe_arg, &recipe, &err)) {
            fprintf(stderr, "qmix plan: %s\n", err.msg);
            return 1;
        }
        o.recipe = &recipe;
    }
    qmix_plan p;
    char dir[4096] = ""; /* the checkpoint's directory (not with --like) */
    if (like) {
        if (qmix_plan_like(like, &o, &p, &err)) {
            fprintf(stderr, "qmix plan: %s\n", err.msg);
            return 1;
        }
    } else {
        if (cli_model_dir(model_path, dir, sizeof dir)) return 1;
        if (qmix_plan_checkpoint(dir, &o, &p, &err)) {
            fprintf(stderr, "qmix plan: %s\n", err.msg);
            return 1;
        }
    }
    const char *source = like ? like : model_path;
    const char *rname = recipe_arg ? recipe.name : NULL;
    /* Does not fit: which built-in recipe would (the most bits that still hold --ctx), so the
     * answer is a next step, not only a no */
    const char *fit_name = NULL;
    qmix_plan fit_plan = {0};
    if (!p.fits) {
        double best_bpw = -1;
        for (int i = 0; qmix_recipe_preset_names[i]; i++) {
            qmix_recipe pr;
            qmix_plan pp;
            qmix_plan_opts po = o;
            if (qmix_recipe_preset(qmix_recipe_preset_names[i], &pr, &err)) continue;
            po.recipe = &pr;
            int prc = like ? qmix_plan_like(like, &po, &pp, &err)
                           : qmix_plan_checkpoint(dir, &po, &pp, &err);
            if (prc || !pp.fits || pp.bpw <= best_bpw) continue;
            best_bpw = pp.bpw;
            fit_name = qmix_recipe_preset_names[i];
            fit_plan = pp;
        }
    }
    if (json) {
        if (print_json(source, &p, &o, rname)) {
            fprintf(stderr, "qmix plan: out of memory writing JSON\n");
            return 1;
        }
    } else {
        print_tables(source, &p, &o, rname);
        if (!p.fits && fit_name) {
            char b1[32], m1[32], m2[32], extra[64] = "";
            if (o.ctx > 0 && o.ctx != 4096)
                snprintf(extra, sizeof extra, " --ctx %d", o.ctx);
            if (o.kv_bits && o.kv_bits != 32)
                snprintf(extra + strlen(extra), sizeof extra - strlen(extra), " --kv-bits %d",
                         o.kv_bits);
            gib(fit_plan.peak_bytes, b1, sizeof b1);
            printf("\nDoes not fit as it is. The built-in recipe with the most bits that fits is %s "
                   "(%.2f bpw): peak %s at %d tokens, longest context %lld tokens (%d-bit KV).\n"
                   "  qmix plan %s%s --memory %s --reserve %s%s --recipe %s   (qmix presets "
                   "describes it)\n",
                   fit_name, fit_plan.bpw, b1, o.ctx > 0 ? o.ctx : 4096,
                   (long long)fit_plan.max_context, o.kv_bits ? o.kv_bits : 32, like ? "--like " : "",
                   source, size_arg(o.memory, m1, sizeof m1), size_arg(o.reserve, m2, sizeof m2),
                   extra, fit_name);
        } else if (!p.fits) {
            printf("\nDoes not fit, and no built-in recipe fits either: more memory, a smaller "
                   "--reserve or --ctx, or a recipe with fewer bits.\n");
        }
    }
    return 0;
}

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/quantize_budget.h"
#include "quant/quantize.h"
#include "quant/recipe.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix quantize IN OUT --recipe NAME|FILE [--group-size 32|64|128]\n"
            "                     [--dtype bf16|f16] [--allow-requant] [--force] [--quiet]\n"
            "       qmix quantize IN OUT (--budget SIZE | --memory SIZE [--reserve SIZE] |\n"
            "                     --bpw X) (--calib FILE | --sensitivity FILE) [options]\n\n"
            "Quantizes the checkpoint IN (Hugging Face bf16, or an unquantized MLX checkpoint)\n"
            "with a role recipe into an MLX mixed-precision checkpoint OUT (mlx-vlm layout:\n"
            "language_model.model.*, stacked switch_mlp experts, 1+w norms, [C, K, 1] conv1d,\n"
            "sharded safetensors <= 5 GiB, config.json with per-module `quantization`), streaming\n"
            "one tensor at a time. Tokenizer and side files are copied.\n\n"
            "  --recipe NAME|FILE   a preset (qmix presets) or a recipe file (docs/recipes.md)\n"
            "  --group-size G       override the group size of every quantized rule\n"
            "  --dtype bf16|f16     dtype of unquantized tensors, scales and biases (bf16)\n"
            "  --allow-requant      accept an already-quantized IN (dequantized, re-quantized)\n"
            "  --force              write into a non-empty OUT\n"
            "  --quiet              no progress on stderr\n\n%s",
            budget_help);
}

static void bits_str(uint32_t mask, char *buf, size_t len)
{
    buf[0] = 0;
    size_t off = 0;
    for (int b = 2; b <= 8 && off < len; b++)
        if (mask & (1u << b)) off += (size_t)snprintf(buf + off, len - off, "%s%d", off ? "," : "", b);
    if ((mask & (1u << 16)) && off < len) snprintf(buf + off, len - off, "%s16", off ? "," : "");
}

int qmix_cmd_quantize(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *recipe = NULL;
    long group = 0;
    qmix_quant_opts o = {.dtype = QMIX_BF16, .progress = 1};
    budget_args budget;
    budget_defaults(&budget);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int taken = budget_option(argc, argv, &i, &budget);
        if (taken < 0) return 2;
        if (taken) continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--recipe")) {
            if (!(recipe = cli_value("quantize", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--group-size")) {
            if (!(v = cli_value("quantize", argc, argv, &i)) ||
                cli_int("quantize", a, v, 32, 128, &group))
                return 2;
            if (group != 32 && group != 64 && group != 128) {
                fprintf(stderr, "qmix quantize: --group-size must be 32, 64 or 128\n");
                return 2;
            }
        } else if (!strcmp(a, "--dtype")) {
            if (!(v = cli_value("quantize", argc, argv, &i))) return 2;
            if (!strcmp(v, "bf16")) o.dtype = QMIX_BF16;
            else if (!strcmp(v, "f16")) o.dtype = QMIX_F16;
            else {
                fprintf(stderr, "qmix quantize: --dtype must be bf16 or f16\n");
                return 2;
            }
        } else if (!strcmp(a, "--allow-requant")) {
            o.allow_requant = 1;
        } else if (!strcmp(a, "--force")) {
            o.force = 1;
        } else if (!strcmp(a, "--quiet")) {
            o.progress = 0;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix quantize: unknown option '%s' (see --help)\n", a);
            return 2;
        } else if (!in) {
            in = a;
        } else if (!out) {
            out = a;
        } else {
            fprintf(stderr, "qmix quantize: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (in && out && budget_requested(&budget)) {
        if (recipe) {
            fprintf(stderr, "qmix quantize: give --recipe or a budget (--budget, --memory, --bpw), "
                    "not both (--fixed FILE adds rules to an allocation)\n");
            return 2;
        }
        if (group) budget.group = (int)group;
        return quantize_with_budget(in, out, &budget, &o);
    }
    if (!in || !out || !recipe) {
        usage(stderr);
        return 2;
    }
    qmix_err err;
    qmix_recipe r;
    if (qmix_recipe_get(recipe, &r, &err)) {
        fprintf(stderr, "qmix quantize: %s\n", err.msg);
        return 1;
    }
    if (group) qmix_recipe_set_group(&r, (int)group);
    o.recipe = &r;
    qmix_quant_report rep;
    if (qmix_quantize(in, out, &o, &rep, &err)) {
        fprintf(stderr, "qmix quantize: %s\n", err.msg);
        return 1;
    }
    char hb[32], hr[32];
    cli_human_bytes((double)rep.bytes, hb, sizeof hb);
    cli_human_bytes((double)cli_peak_rss(), hr, sizeof hr);
    printf("quantized %s -> %s with recipe %s\n", in, out, r.name);
    printf("bits per weight %.3f (mlx-lm's count), %s in %d shard(s), %d tensors\n", rep.bpw, hb,
           rep.n_shards, rep.n_tensors);
    printf("defaults bits=%d group_size=%d; %.2f s (%.2f GB/s of input), peak RSS %s\n",
           rep.default_bits, rep.default_group, rep.seconds,
           rep.seconds > 0 ? (double)rep.input_bytes / rep.seconds / 1e9 : 0.0, hr);
    printf("\n%-20s %-10s %16s %12s %7s\n", "role", "bits", "parameters", "bytes", "share");
    for (int i = 0; i < QMIX_ROLE_COUNT; i++) {
        const qmix_quant_role_stat *s = &rep.roles[i];
        if (!s->tensors) continue;
        char bs[40], by[32];
        bits_str(s->bits_mask, bs, sizeof bs);
        cli_human_bytes((double)s->bytes, by, sizeof by);
        printf("%-20s %-10s %16llu %12s %6.2f%%\n", qmix_role_name((qmix_role)i), bs,
               (unsigned long long)s->params, by,
               rep.bytes ? 100.0 * (double)s->bytes / (double)rep.bytes : 0.0);
    }
    return 0;
}

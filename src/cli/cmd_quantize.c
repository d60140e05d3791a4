#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/quantize_budget.h"
#include "quant/calib.h"
#include "quant/imatrix.h"
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
            "  --format mlx|gptq|gguf  output layout: MLX mixed precision (default), GPTQModel/vLLM\n"
            "                       (docs/formats.md), or a GGUF file OUT for llama.cpp\n"
            "                       gptq: symmetric 2/3/4/8-bit (vLLM Marlin: 4/8), desc_act false,\n"
            "                       v1 zeros, HF names, routed experts as per-expert modules, MTP\n"
            "                       and vision copied; per-module bits as `dynamic` rules; routed\n"
            "                       experts 4 or 8 bits with one setting per layer, q/k/v (and\n"
            "                       other vLLM-fused groups) alike; router, shared-expert gate and\n"
            "                       embedding kept 16-bit; scales f16 (README.md: serving)\n"
            "  --group-size G       override the group size of every quantized rule\n"
            "  --dtype bf16|f16     dtype of unquantized tensors, scales and biases (bf16)\n"
            "  --allow-requant      accept an already-quantized IN (dequantized, re-quantized)\n"
            "  --force              write into a non-empty OUT\n"
            "  --quiet              no progress on stderr\n\n"
            "Calibrated methods (docs/formats.md; per role: method= in a recipe):\n"
            "  --method rtn|gptq|imatrix|awq  rules without method= (rtn: round to nearest, MLX's\n"
            "                       rule; awq: activation-aware scales folded into the norms / up_proj\n"
            "                       rows, then RTN)\n"
            "  --stats STATS        statistics from qmix calibrate (GPTQ Hessians, importance)\n"
            "  --imatrix FILE       llama.cpp importance matrix (.dat or .gguf) for imatrix, awq\n"
            "  --act-order          GPTQ group-aware act-order (columns by diag(H), inside groups)\n"            "  --mlx-groups         GPTQ group scale/bias by MLX's min/max rule (default: searched,\n"
            "                       weighted by diag(H))\n"
            "  --damp X             GPTQ relative damping (0.01)\n"
            "  --min-tokens N|P%%    GPTQ RTN failsafe: inputs with fewer calibration rows are\n"
            "                       rounded to nearest (0.5%% of the calibration tokens)\n\n%s",
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
    const char *imatrix = NULL, *method = NULL, *format = "mlx";
    double min_pct = -1;
    o.min_tokens = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--method")) {
            if (!(method = cli_value("quantize", argc, argv, &i))) return 2;
            if ((o.method = qmix_method_parse(method)) < 0) {
                fprintf(stderr, "qmix quantize: --method must be rtn, gptq, imatrix or awq\n");
                return 2;
            }
            continue;
        } else if (!strcmp(a, "--format")) {
            if (!(format = cli_value("quantize", argc, argv, &i))) return 2;
            if (!strcmp(format, "mlx")) o.format = QMIX_QFORMAT_MLX;
            else if (!strcmp(format, "gptq")) o.format = QMIX_QFORMAT_GPTQ;
            else if (strcmp(format, "gguf")) {
                fprintf(stderr, "qmix quantize: --format must be mlx, gptq or gguf\n");
                return 2;
            }
            continue;
        } else if (!strcmp(a, "--imatrix")) {
            if (!(imatrix = cli_value("quantize", argc, argv, &i))) return 2;
            continue;
        } else if (!strcmp(a, "--act-order")) {
            o.gptq.act_order = 1;
            continue;
        } else if (!strcmp(a, "--mlx-groups")) {
            o.gptq.mlx_rule = 1;
            continue;
        } else if (!strcmp(a, "--damp")) {
            if (!(v = cli_value("quantize", argc, argv, &i)) || cli_double("quantize", a, v, &o.gptq.damp))
                return 2;
            if (!(o.gptq.damp > 0 && o.gptq.damp < 1)) {
                fprintf(stderr, "qmix quantize: --damp must be in (0, 1)\n");
                return 2;
            }
            continue;
        } else if (!strcmp(a, "--min-tokens")) {
            if (!(v = cli_value("quantize", argc, argv, &i))) return 2;
            char *end;
            double x = strtod(v, &end);
            if (end == v || x < 0 || (*end && strcmp(end, "%")) || (!*end && x != floor(x))) {
                fprintf(stderr, "qmix quantize: --min-tokens takes a count or a percentage (0.5%%)\n");
                return 2;
            }
            if (*end) min_pct = x;
            else o.min_tokens = (int64_t)x;
            continue;
        }
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
        if (method || imatrix) {
            fprintf(stderr, "qmix quantize: --method/--imatrix with a budget is not supported yet "
                    "(quantize with --recipe and the method)\n");
            return 2;
        }
        budget.gguf = !strcmp(format, "gguf");
        if (group) {
            budget.groups[0] = (int)group;
            budget.n_groups = 1;
            budget.group_given = 1;
        }
        return quantize_with_budget(in, out, &budget, &o);
    }
    if (!in || !out || !recipe)
        return cli_missing("quantize", !in ? "IN and OUT" : !out ? "OUT" :
                                       "--recipe NAME|FILE (or --bpw, --budget, --memory)");
    qmix_err err;
    qmix_recipe r;
    if (qmix_recipe_get(recipe, &r, &err)) {
        fprintf(stderr, "qmix quantize: %s\n", err.msg);
        return 1;
    }
    if (group) qmix_recipe_set_group(&r, (int)group);
    o.recipe = &r;
    /* without a budget the statistics of qmix calibrate come in --stats; --calib (calibration
     * text everywhere else) is still read as statistics here, as it was before --stats */
    const char *stats_path = budget.stats ? budget.stats : budget.calib;
    qmix_calib *calib = NULL;
    qmix_imatrix *im = NULL;
    if (stats_path && qmix_calib_open(stats_path, &calib, &err)) {
        fprintf(stderr, "qmix quantize: %s: %s%s\n", budget.stats ? "--stats" : "--calib", err.msg,
                budget.stats ? "" : " (with --recipe, statistics from qmix calibrate go in --stats)");
        return 1;
    }
    if (budget.calib && !budget.stats)
        fprintf(stderr, "qmix quantize: note: --calib STATS is now spelled --stats STATS (--calib is "
                "calibration text)\n");
    if (imatrix && qmix_imatrix_load(imatrix, &im, &err)) {
        fprintf(stderr, "qmix quantize: --imatrix: %s\n", err.msg);
        qmix_calib_close(calib);
        return 1;
    }
    o.calib = calib;
    o.imatrix = im;
    if (!strcmp(format, "gguf")) {
        int grc = quantize_to_gguf(in, out, &r, &o);
        qmix_calib_close(calib);
        qmix_imatrix_free(im);
        return grc;
    }
    if (min_pct >= 0) o.min_tokens = calib ? qmix_calib_failsafe_rows(qmix_calib_tokens(calib), min_pct) : 0;
    qmix_quant_report rep;
    int qrc = qmix_quantize(in, out, &o, &rep, &err);
    qmix_calib_close(calib);
    qmix_imatrix_free(im);
    if (qrc) {
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
    if (rep.n_gptq || rep.fb_tokens || rep.fb_cholesky)
        printf("gptq: %lld matrices; RTN failsafe for %lld of %lld (fewer than %lld calibration "
               "rows), %lld more after a failed Cholesky\n", (long long)rep.n_gptq,
               (long long)rep.fb_tokens, (long long)(rep.n_gptq + rep.fb_tokens + rep.fb_cholesky),
               (long long)rep.min_tokens, (long long)rep.fb_cholesky);
    if (rep.n_imatrix) printf("imatrix: %lld matrices with importance-weighted scales\n",
                              (long long)rep.n_imatrix);
    if (rep.n_awq)
        printf("awq: %lld matrices with scaled columns; %lld scale vectors folded, %lld groups left "
               "unscaled\n", (long long)rep.n_awq, (long long)rep.awq_folds,
               (long long)rep.awq_unfolded);
    if (rep.fb_nostats)
        printf("no statistics for %lld matrices (rounded to nearest)\n", (long long)rep.fb_nostats);
    if (o.format == QMIX_QFORMAT_GPTQ) {
        printf("gptq: symmetric, desc_act false, v1 zeros (serve with vLLM: see README.md)\n");
        if (rep.gptq_kept16)
            printf("gptq: %lld tensors the recipe quantizes kept 16-bit (vLLM never quantizes the "
                   "router, shared-expert gate, embedding or vision tower)\n",
                   (long long)rep.gptq_kept16);
        if (rep.gptq_non_marlin)
            fprintf(stderr, "qmix quantize: warning: %d modules at 2/3 bits: vLLM serves them "
                    "with its slower gptq kernel, not Marlin (4/8 bits)\n", rep.gptq_non_marlin);
    }
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

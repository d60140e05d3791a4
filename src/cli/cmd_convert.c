/* qmix convert: between checkpoint formats. Any checkpoint qmix opens -> GGUF (one type, or
 * --type); any (a GGUF above all) -> Hugging Face bf16 (--to hf); a GGUF -> MLX mixed precision
 * through a temporary HF checkpoint and qmix_quantize (--to mlx, seed 003's route: BF16 GGUF +
 * imatrix -> MLX with AWQ pre-scaling); GPTQ in or out is cmd_convert_gptq.c's. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/quantize_budget.h"
#include "cli/commands.h"
#include "cli/convert_gptq.h"
#include "quant/ggml_blocks.h"
#include "quant/gguf_export.h"
#include "quant/gguf_mmproj.h"
#include "quant/hf_export.h"
#include "quant/imatrix.h"
#include "quant/quantize.h"
#include "quant/recipe.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix convert IN OUT.gguf --to gguf [--type TYPE] [--quiet]\n"
            "       qmix convert IN OUT --to hf [--force] [--quiet]\n"
            "       qmix convert IN OUT --to mlx --recipe NAME|FILE [--imatrix F]\n"
            "                    [--method rtn|imatrix|awq] [--force] [--quiet]\n\n"
            "--to gguf writes the checkpoint IN (Hugging Face, MLX or GGUF; quantized weights\n"
            "are dequantized) as a qwen35moe GGUF that llama.cpp loads: metadata, tokenizer and\n"
            "chat template KVs, and llama.cpp's converter transforms (norms as 1 + w, ssm_a =\n"
            "-exp(A_log), squeezed conv1d, split gate/up experts, tiled GDN value heads). Norms,\n"
            "1-D tensors, the router, ffn_gate_inp_shexp and ssm_conv1d are F32; other matrices\n"
            "are --type: f32, f16, bf16 (default), q8_0, q6_k, q5_k, q4_k, q3_k, q2_k, q5_1,\n"
            "q5_0, q4_1, q4_0, or the non-linear 4-bit iq4_nl (4.5 bpw) and iq4_xs (4.25 bpw)\n"
            "(searched block scales, docs/formats.md). Rows the block does not divide fall back\n"
            "as llama-quantize does (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0, q2_k/q3_k -> q4_0,\n"
            "iq4_xs -> iq4_nl, else f16). For per-role types from a recipe and an importance\n"
            "matrix use `qmix quantize IN OUT.gguf --format gguf --recipe R`.\n\n"
            "--to hf writes IN (a GGUF above all) as a Hugging Face bf16 checkpoint directory in\n"
            "the released layout: config.json, model.safetensors (fused 3-D experts, norms as w,\n"
            "A_log, [C, 1, K] conv1d, GDN value heads back in grouped order), tokenizer.json and\n"
            "tokenizer_config.json rebuilt from the GGUF's tokenizer KVs. Block-quantized weights\n"
            "are dequantized (a warning says so). No MTP block (GGUFs carry none).\n\n"
            "--to mlx quantizes IN into an MLX mixed-precision checkpoint with a recipe (as qmix\n"
            "quantize does); a GGUF input is first written as a temporary bf16 HF checkpoint next\n"
            "to OUT (removed afterwards). --imatrix gives llama.cpp importance for --method\n"
            "imatrix or awq (AWQ scales folded into the norms). A quantized GGUF is dequantized\n"
            "and re-quantized (warned on stderr).\n\n"
            "Everything streams tensor by tensor, row by row. --quiet: no progress on stderr.\n");
}

/* Removes a directory of plain files (the temporary HF checkpoint this command made). */
static void remove_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[PATH_MAX];
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) < (int)sizeof path)
                    unlink(path);
            }
        closedir(d);
    }
    rmdir(dir);
}

static int is_dir(const char *p)
{
    struct stat sb;
    return !stat(p, &sb) && S_ISDIR(sb.st_mode);
}

static int to_mlx(const char *in, const char *out, const char *recipe, const char *imatrix,
                  int method, int force, int progress)
{
    if (!recipe) {
        fprintf(stderr, "qmix convert: --to mlx needs --recipe NAME|FILE (see qmix presets)\n");
        return 2;
    }
    qmix_err err;
    qmix_recipe r;
    if (qmix_recipe_get(recipe, &r, &err)) {
        fprintf(stderr, "qmix convert: %s\n", err.msg);
        return 1;
    }
    if ((method == QMIX_METHOD_IMATRIX || method == QMIX_METHOD_AWQ) && !imatrix) {
        fprintf(stderr, "qmix convert: --method %s needs --imatrix FILE\n",
                method == QMIX_METHOD_AWQ ? "awq" : "imatrix");
        return 2;
    }
    qmix_imatrix *im = NULL;
    if (imatrix && qmix_imatrix_load(imatrix, &im, &err)) {
        fprintf(stderr, "qmix convert: --imatrix: %s\n", err.msg);
        return 1;
    }
    /* a checkpoint directory goes straight in; anything else (a GGUF) through bf16 HF */
    char tmp[PATH_MAX] = "";
    const char *src = in;
    int rc = 1;
    if (!is_dir(in)) {
        if (snprintf(tmp, sizeof tmp, "%s.hf-tmp-XXXXXX", out) >= (int)sizeof tmp ||
            !mkdtemp(tmp)) {
            fprintf(stderr, "qmix convert: cannot create a temporary directory next to %s: %s\n",
                    out, strerror(errno));
            qmix_imatrix_free(im);
            return 1;
        }
        qmix_hf_export_opts ho = {.progress = progress, .force = 1};
        if (qmix_hf_export(in, tmp, &ho, NULL, &err)) {
            fprintf(stderr, "qmix convert: %s\n", err.msg);
            goto done;
        }
        src = tmp;
    }
    qmix_quant_opts qo = {.recipe = &r, .format = QMIX_QFORMAT_MLX, .dtype = QMIX_BF16,
                          .force = force, .progress = progress, .method = method,
                          .imatrix = im, .min_tokens = -1};
    qmix_quant_report rep;
    if (qmix_quantize(src, out, &qo, &rep, &err)) {
        fprintf(stderr, "qmix convert: %s\n", err.msg);
        goto done;
    }
    char hb[32];
    cli_human_bytes((double)rep.bytes, hb, sizeof hb);
    printf("converted %s -> %s (MLX, recipe %s): %.3f bits per weight, %s in %d shard(s)\n", in,
           out, r.name, rep.bpw, hb, rep.n_shards);
    if (rep.n_imatrix) printf("imatrix: %lld matrices with importance-weighted scales\n",
                              (long long)rep.n_imatrix);
    if (rep.n_awq)
        printf("awq: %lld matrices with scaled columns; %lld scale vectors folded\n",
               (long long)rep.n_awq, (long long)rep.awq_folds);
    rc = 0;
done:
    if (tmp[0]) remove_tree(tmp);
    qmix_imatrix_free(im);
    return rc;
}

int qmix_cmd_convert(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *to = NULL, *recipe = NULL, *imatrix = NULL;
    int force = 0, method = QMIX_METHOD_DEFAULT;
    /* progress redraws one line: only on a terminal */
    qmix_gguf_export_opts o = {.type = QMIX_GGML_BF16, .progress = isatty(STDERR_FILENO)};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--to")) {
            if (!(to = cli_value("convert", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--type")) {
            if (!(v = cli_value("convert", argc, argv, &i))) return 2;
            o.type = -1;
            for (int t = 0; t < QMIX_GGML_TYPE_LIMIT; t++)
                if (qmix_ggml_can_quantize(t) && !strcasecmp(v, qmix_ggml_type_name(t))) o.type = t;
            if (o.type < 0) {
                fprintf(stderr, "qmix convert: --type must be f32, f16, bf16, q8_0, q6_k, q5_k, "
                        "q4_k, q3_k, q2_k, q5_1, q5_0, q4_1, q4_0, iq4_nl or iq4_xs\n");
                return 2;
            }
        } else if (!strcmp(a, "--recipe")) {
            if (!(recipe = cli_value("convert", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--imatrix")) {
            if (!(imatrix = cli_value("convert", argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--method")) {
            if (!(v = cli_value("convert", argc, argv, &i))) return 2;
            if (!strcmp(v, "rtn")) method = QMIX_METHOD_RTN;
            else if (!strcmp(v, "imatrix")) method = QMIX_METHOD_IMATRIX;
            else if (!strcmp(v, "awq")) method = QMIX_METHOD_AWQ;
            else {
                fprintf(stderr, "qmix convert: --method must be rtn, imatrix or awq (GPTQ needs "
                        "calibration statistics: qmix quantize --calib)\n");
                return 2;
            }
        } else if (!strcmp(a, "--force")) {
            force = 1;
        } else if (!strcmp(a, "--quiet")) {
            o.progress = 0;
        } else if (a[0] == '-') {
            fprintf(stderr, "qmix convert: unknown option %s\n", a);
            usage(stderr);
            return 2;
        } else if (!in) {
            in = a;
        } else if (!out) {
            out = a;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (!in || !out || !to)
        return cli_missing("convert", !in ? "IN and OUT" : !out ? "OUT" : "--to gguf|hf|mlx|gptq");
    /* GPTQ in or out is cmd_convert_gptq.c's; only a directory can hold a GPTQ checkpoint */
    if (!strcmp(to, "gptq") || (!strcmp(to, "mlx") && is_dir(in) && convert_is_gptq(in)))
        return convert_gptq(in, out, to, o.progress);
    if (!strcmp(to, "gguf") && (recipe || imatrix || method)) {
        fprintf(stderr, "qmix convert: --recipe/--imatrix/--method go with --to mlx (for a GGUF "
                "from a recipe: qmix quantize IN OUT.gguf --format gguf --recipe R)\n");
        return 2;
    }
    qmix_err err;
    if (!strcmp(to, "mlx")) return to_mlx(in, out, recipe, imatrix, method, force, o.progress);
    if (!strcmp(to, "hf")) {
        if (recipe || imatrix || method) {
            fprintf(stderr, "qmix convert: --to hf writes bf16; --recipe/--imatrix/--method go "
                    "with --to mlx\n");
            return 2;
        }
        qmix_hf_export_opts ho = {.progress = o.progress, .force = force};
        qmix_hf_export_report rep;
        if (qmix_hf_export(in, out, &ho, &rep, &err)) {
            fprintf(stderr, "qmix convert: %s\n", err.msg);
            return 1;
        }
        printf("converted %s -> %s (Hugging Face bf16): %d tensors, %llu parameters\n", in, out,
               rep.n_tensors, (unsigned long long)rep.params);
        return 0;
    }
    if (strcmp(to, "gguf")) {
        fprintf(stderr, "qmix convert: --to must be gguf, hf, mlx or gptq, not '%s'\n", to);
        return 2;
    }
    qmix_gguf_export_report rep;
    o.report = &rep;
    if (qmix_gguf_export(in, out, &o, &err)) {
        fprintf(stderr, "qmix convert: %s\n", err.msg);
        return 1;
    }
    /* a vision tower goes beside, as llama.cpp's mmproj file */
    char mmproj[4096];
    int wrote;
    qmix_mmproj_path_for(out, mmproj, sizeof mmproj);
    if (qmix_gguf_write_mmproj(in, mmproj, o.type == QMIX_GGML_F32, &wrote, &err)) {
        fprintf(stderr, "qmix convert: the vision tower: %s\n", err.msg);
        return 1;
    }
    if (wrote)
        printf("vision tower (%s) -> %s\n", o.type == QMIX_GGML_F32 ? "F32" : "F16", mmproj);
    char what[600];
    snprintf(what, sizeof what, "converted %s -> %s (GGUF, matrices %s)", in, out,
             qmix_ggml_type_name(o.type));
    cli_print_gguf_report(what, &rep, 0);
    return 0;
}

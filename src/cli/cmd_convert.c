/* qmix convert: between checkpoint formats. So far any checkpoint qmix opens -> GGUF. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/convert_gptq.h"
#include "quant/ggml_blocks.h"
#include "quant/gguf_export.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: qmix convert IN OUT.gguf --to gguf [--type f32|f16|bf16|q8_0] [--quiet]\n\n"
            "Writes the checkpoint IN (Hugging Face, MLX or GGUF; quantized MLX weights are\n"
            "dequantized) as a qwen35moe GGUF that llama.cpp loads: metadata, tokenizer and chat\n"
            "template KVs, and llama.cpp's converter transforms (norms as 1 + w, ssm_a =\n"
            "-exp(A_log), squeezed conv1d, split gate/up experts, tiled GDN value heads). Norms,\n"
            "1-D tensors, the router, ffn_gate_inp_shexp and ssm_conv1d are F32; other matrices\n"
            "are --type (default bf16; q8_0 falls back to f16 for rows not a multiple of 32).\n"
            "Streams row by row. The MTP block is not written.\n\n"
            "       qmix convert IN OUT --to mlx|gptq [--quiet]\n\n"
            "GPTQ <-> MLX (spec/quant-formats.md §2.9). --to mlx from a GPTQ checkpoint keeps the\n"
            "codes (scale s, bias -s*z; F32 scales/biases for asymmetric modules so nothing is\n"
            "rounded), stacks per-expert modules into switch_mlp, 1 + w norms, drops MTP; needs\n"
            "desc_act false (trivial g_idx). --to gptq from a quantized MLX checkpoint keeps the\n"
            "codes where every group is s*(q - z) with an integer z in [1, maxq] (negative scales\n"
            "flipped), else re-quantizes that matrix symmetrically with a warning; 2/3/4/8-bit\n"
            "modules only; router, shared-expert gate and embedding are dequantized to bf16.\n");
}

int qmix_cmd_convert(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *to = NULL;
    qmix_gguf_export_opts o = {.type = QMIX_GGML_BF16, .progress = 1};
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
                        "q4_k, q3_k, q2_k, q5_1, q5_0, q4_1 or q4_0\n");
                return 2;
            }
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
    if (!in || !out || !to) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(to, "gptq") || (!strcmp(to, "mlx") && convert_is_gptq(in)))
        return convert_gptq(in, out, to, o.progress);
    if (strcmp(to, "gguf")) {
        fprintf(stderr, "qmix convert: --to %s is not supported yet (gguf)\n", to);
        return 2;
    }
    qmix_err err;
    if (qmix_gguf_export(in, out, &o, &err)) {
        fprintf(stderr, "qmix convert: %s\n", err.msg);
        return 1;
    }
    return 0;
}

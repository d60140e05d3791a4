/* Any checkpoint qmix opens (HF, MLX, GGUF) -> a qwen35moe GGUF that llama.cpp loads, with the
 * converter's transforms applied (spec/quant-formats.md §5.6, §5.9): norms stored as 1 + w,
 * ssm_a = -exp(A_log), squeezed conv, split gate/up experts, tiled GDN value heads; 1-D tensors,
 * norms, the router, ffn_gate_inp_shexp and ssm_conv1d in F32, other matrices in the requested
 * type. Streams row by row: memory is one row plus the header. */
#ifndef QMIX_QUANT_GGUF_EXPORT_H
#define QMIX_QUANT_GGUF_EXPORT_H

#include "qmix.h"

typedef struct qmix_gguf_export_opts {
    int type;          /* ggml type of the matrices: F32, F16, BF16 or Q8_0 */
    int progress;      /* a progress line on stderr */
} qmix_gguf_export_opts;

int qmix_gguf_export(const char *in, const char *out, const qmix_gguf_export_opts *o,
                     qmix_err *err);

#endif

/* Any checkpoint qmix opens (a GGUF above all; also HF or MLX) -> a Hugging Face bf16 checkpoint
 * in the released Qwen3.5-MoE text layout (spec/checkpoint-layout.md): config.json with
 * text_config, model.safetensors with model.language_model.* names, fused 3-D experts
 * (gate_up_proj [E, 2I, D], down_proj [E, D, I]), norms stored as w (not 1 + w), A_log, conv1d
 * [C, 1, Kc], GDN value heads in HF's grouped order (the GGUF tiling of §5.9 undone), plus
 * tokenizer.json / tokenizer_config.json (rebuilt from a GGUF's tokenizer KVs, copied otherwise).
 * Quantized weights are dequantized. Streams row by row; the MTP block and vision tower are not
 * written (a GGUF has neither). */
#ifndef QMIX_QUANT_HF_EXPORT_H
#define QMIX_QUANT_HF_EXPORT_H

#include "qmix.h"

typedef struct qmix_hf_export_opts {
    int progress;      /* a progress line on stderr */
    int force;         /* write into a non-empty out_dir */
    int quiet_requant; /* no warning that quantized weights were dequantized */
} qmix_hf_export_opts;

typedef struct qmix_hf_export_report {
    int n_tensors;
    int n_dequantized;          /* tensors whose source was block-quantized */
    uint64_t params, bytes;
} qmix_hf_export_report;

/* rep may be NULL. */
int qmix_hf_export(const char *in, const char *out_dir, const qmix_hf_export_opts *o,
                   qmix_hf_export_report *rep, qmix_err *err);

#endif

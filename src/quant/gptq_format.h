/* The GPTQ checkpoint format as GPTQModel writes it and vLLM reads it (spec/quant-formats.md §2):
 * packing of qweight/qzeros (§2.2), the v1 zero-point offset (§2.3), the quantization_config
 * block with its `dynamic` overrides (§2.5, §2.7), and vLLM's constraints (§2.8). Shared by the
 * writer (qmix quantize --format gptq), the loader (model.c) and qmix convert.
 *
 * qmix writes symmetric GPTQ only (sym = true, zero = 2^(bits−1), v1 zeros): that is what vLLM's
 * Marlin kernels run, and it never stores a true zero of 0 (the v1 underflow hazard of §2.3).
 * On that grid a GPTQ group is exactly an MLX affine group with scale s and bias −s·2^(bits−1),
 * and a GPTQ qweight column is exactly an MLX packed row (the same LE bit stream, §2.2), so
 * both directions are a transpose of uint32 words plus scale/zero bookkeeping. */
#ifndef QMIX_QUANT_GPTQ_FORMAT_H
#define QMIX_QUANT_GPTQ_FORMAT_H

#include <jansson.h>
#include <stdint.h>

#include "qmix.h"

/* Bits a GPTQ file can hold and vLLM's gptq kernels read: 2, 3, 4, 8 (§2.2, §2.5). */
int qmix_gptq_bits_valid(int bits);
/* Whether vLLM's fast Marlin path serves a module: sym 4 or 8 bits, group −1/32/64/128. */
int qmix_gptq_marlin_ok(int bits, int group, int sym);

/* One qzeros row for n output channels, every true zero equal to zero, stored with the v1
 * offset (stored = zero − 1, field-wise) when v1: out[n·bits/32]. n·bits must be a multiple
 * of 32 (3 bits: n a multiple of 32). */
void qmix_gptq_zeros_row(int64_t n, int bits, uint32_t zero, int v1, uint32_t *out);

/* What a linear module of the text model becomes in a GPTQ checkpoint, for the config. */
typedef struct qmix_gptq_module {
    const char *name;   /* HF module path without suffix ("model.language_model.layers.3.
                           self_attn.q_proj", "…mlp.experts.7.down_proj", "lm_head") */
    int bits, group;    /* bits 0: kept 16-bit */
    int sym;
} qmix_gptq_module;

typedef struct qmix_gptq_qconfig_opts {
    int n_layers;
    int has_mtp, has_vision;  /* add "-:" rules so vLLM never expects qweight there */
    int act_group_aware;      /* informational (meta) */
    double damp;              /* informational (meta); 0: omitted */
    const char *quantizer;    /* meta.quantizer, e.g. "qmix:0.1" */
} qmix_gptq_qconfig_opts;

/* Checks a checkpoint's linear modules against §2.8 (fused groups share one setting, routed
 * experts 4/8 bits and one setting per layer, bits 2/3/4/8) and builds the quantization_config
 * object: defaults from the routed experts (else the most common setting), `dynamic` rules for
 * every (role class, setting) that differs from them, "-:" for 16-bit classes. Linear in the
 * number of modules. *non_marlin: modules vLLM serves with the slower non-Marlin kernel. */
int qmix_gptq_build_qconfig(const qmix_gptq_module *mods, size_t n,
                            const qmix_gptq_qconfig_opts *o, json_t **out, int *non_marlin,
                            qmix_err *err);

/* The quantization_config of a GPTQ checkpoint, as a reader needs it. */
typedef struct qmix_gptq_info {
    int bits, group;     /* defaults; group −1: one group per column */
    int sym, desc_act;
    int v1;              /* checkpoint_format "gptq" (stored zero = true zero − 1) vs "gptq_v2" */
    int has_dynamic;
} qmix_gptq_info;

/* 1: config.json at path is a GPTQ checkpoint (*info filled), 0: not GPTQ, -1: a GPTQ variant
 * qmix cannot read (clear message), or unreadable JSON. */
int qmix_gptq_info_load(const char *config_path, qmix_gptq_info *info, qmix_err *err);
/* Same, from the quantization_config object. */
int qmix_gptq_info_parse(const json_t *qc, const char *label, qmix_gptq_info *info, qmix_err *err);

/* A quantized GPTQ module's tensors, bound and validated, as the MLX affine layout:
 * the caller provides the four safetensors views (any may be NULL: a clear error). */
struct qmix_tensor;
typedef struct qmix_gptq_unpacked {
    int64_t rows, cols;  /* N, K */
    int bits, group;     /* group: K when the file says −1 */
    uint32_t *codes;     /* [N][K·bits/32], the MLX packed rows (malloc'd) */
    float *scales;       /* [N][K/group] s (malloc'd) */
    float *biases;       /* [N][K/group] −s·z (malloc'd) */
    int sym;             /* every true zero was 2^(bits−1) */
} qmix_gptq_unpacked;

/* Infers bits and group from the shapes (the config's `dynamic` regexes are not needed: a module
 * is quantized iff it has qweight, and its tensors fix bits and group), checks every shape and
 * dtype, requires a trivial g_idx (g_idx[k] = k/group: act-order files with scattered groups
 * cannot be expressed as contiguous MLX groups, §2.4), and unpacks. expect_rows/expect_cols:
 * the logical shape the caller needs (−1: any). */
int qmix_gptq_unpack(const char *module, const struct qmix_tensor *qweight,
                     const struct qmix_tensor *qzeros, const struct qmix_tensor *scales,
                     const struct qmix_tensor *g_idx, int64_t expect_rows, int64_t expect_cols,
                     const qmix_gptq_info *info, qmix_gptq_unpacked *out, qmix_err *err);
void qmix_gptq_unpacked_free(qmix_gptq_unpacked *u);

#endif

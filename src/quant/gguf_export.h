/* Any checkpoint qmix opens (HF, MLX, GGUF) -> a qwen35moe GGUF that llama.cpp loads, with the
 * converter's transforms applied (spec/quant-formats.md §5.6, §5.9): norms stored as 1 + w,
 * ssm_a = -exp(A_log), squeezed conv, split gate/up experts, tiled GDN value heads; 1-D tensors,
 * norms, the router, ffn_gate_inp_shexp and ssm_conv1d in F32, other matrices in the requested
 * type, or in the type a recipe's bits map to (§6.5/§6.6: 2→Q2_K, 3→Q3_K, 4→Q4_K, 5→Q5_K,
 * 6→Q6_K, 8→Q8_0, keep → BF16/F16), with llama-quantize's fallbacks for rows its blocks do not
 * divide (§5.7). An importance matrix weights the block scale search, per expert for the 3-D
 * expert tensors (§5.8). Streams row by row: memory is a batch of rows plus the header. */
#ifndef QMIX_QUANT_GGUF_EXPORT_H
#define QMIX_QUANT_GGUF_EXPORT_H

#include <stdint.h>

#include "model/roles.h"
#include "qmix.h"

struct qmix_recipe;
struct qmix_imatrix;

typedef struct qmix_gguf_role_stat {
    uint64_t params, bytes, tensors;
    uint64_t type_mask;        /* bit t set: some tensor of this role has ggml type t */
} qmix_gguf_role_stat;

/* What was written, and what the recipe asked that GGUF cannot express. */
typedef struct qmix_gguf_export_report {
    uint64_t params, bytes;    /* all tensors (data only); bpw = 8·bytes/params */
    int n_tensors;
    int n_fallback;            /* matrices whose row length the wanted block does not divide */
    int64_t n_imatrix;         /* matrices (an expert counts once) quantized with importance */
    int64_t n_no_imatrix;      /* quantized matrices the imatrix had no entry for */
    uint32_t file_type;        /* general.file_type written */
    qmix_gguf_role_stat roles[QMIX_ROLE_COUNT];
    char notes[2048];          /* one line each: what could not be expressed, and what was done */
} qmix_gguf_export_report;

typedef struct qmix_gguf_export_opts {
    int type;          /* ggml type of the matrices without a recipe: F32, F16, BF16, Q8_0, Q4_0,
                          Q4_1, Q5_0, Q5_1, Q2_K…Q6_K */
    int progress;      /* a progress line on stderr */
    const struct qmix_recipe *recipe;    /* or NULL: every matrix `type` */
    int keep_type;     /* a recipe's `keep` tensors: QMIX_GGML_BF16 (0 = default) or F16 */
    const struct qmix_imatrix *imatrix;  /* or NULL */
    const char *imatrix_file;            /* quantize.imatrix.file (NULL: the imatrix's path) */
    int n_threads;     /* quantizing threads; 0: all cores */
    int dry_run;       /* 1: decide every type and fill the report (sizes exact), write nothing
                          (out may be NULL) */
    qmix_gguf_export_report *report;     /* filled when not NULL */
} qmix_gguf_export_opts;

int qmix_gguf_export(const char *in, const char *out, const qmix_gguf_export_opts *o,
                     qmix_err *err);

/* GGUF type for recipe bits (0 = keep → keep_type); -1 for bits GGUF has no type for. */
int qmix_gguf_type_for_bits(int bits, int keep_type);
/* llama-quantize's stand-in when type's block does not divide a row of `cols` (§5.7: Q4_K →
 * Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0, IQ4_XS → IQ4_NL, else F16); type itself when
 * it fits. */
int qmix_gguf_fallback_type(int type, int64_t cols);
/* llama.cpp's file type id (general.file_type) for a dominant tensor type. */
uint32_t qmix_gguf_file_type(int type);

#endif

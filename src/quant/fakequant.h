/* Fake quantization: a model's qk_mat views pointed at in-memory MLX affine copies of their
 * weights (rounded to nearest, by GPTQ or by importance-weighted RTN, stored with bf16
 * scales/biases as qmix quantize stores them), or at GGUF block copies (any block type the GGUF
 * writer writes, with or without importance), and restored bitwise afterwards. The checkpoint
 * mapping is never written: the copies are malloc'd, the views swapped.
 *
 * Used by sensitivity analysis (one role quantized at a time, eval/sensitivity.c) and by
 * sequential calibration (the layers already calibrated run quantized while the next layer's
 * statistics are collected, cli/cmd_calibrate.c). No printing; errors through qmix_err. */
#ifndef QMIX_QUANT_FAKEQUANT_H
#define QMIX_QUANT_FAKEQUANT_H

#include <stdint.h>

#include "kernels/kernels.h"
#include "qmix.h"
#include "quant/gptq.h"

struct qmix_calib;
struct qmix_calib_collector;
struct qmix_pool;
struct qmix_model;
struct qmix_recipe;

/* What was done to a target (after qmix_fq_quantize). */
enum { QMIX_FQ_NONE = 0, QMIX_FQ_RTN, QMIX_FQ_GPTQ, QMIX_FQ_IMATRIX };

typedef struct qmix_fq_target {
    qk_mat *field;            /* the model's view */
    qk_mat orig;              /* the view as it was when added */
    qk_mat quant;             /* the installed copy; .data NULL while there is none */
    uint32_t *codes;
    uint16_t *scales, *biases;
    int alias;                /* index of the target whose copy it shares (a tied lm_head is
                                 the embedding), or -1 */
    int quantizable;          /* shape allows group: rows, cols > 0 and cols % group == 0 */
    int bits, group;          /* bits 0: left as it is */
    int ggml_type;            /* > 0: quantized to this GGUF block type (ggml id, group ignored)
                                 as qmix quantize --format gguf writes it, instead of MLX affine;
                                 importance-weighted when method is IMATRIX */
    int method;               /* QMIX_METHOD_RTN (or DEFAULT), _GPTQ or _IMATRIX (quant/recipe.h);
                                 others are rounded to nearest */
    int layer, kind, expert;  /* its calibration input (quant/calib.h); kind -1: none */
    int how;                  /* QMIX_FQ_*: what qmix_fq_quantize did (fallbacks included) */
} qmix_fq_target;

typedef struct qmix_fq_set {
    qmix_fq_target *t;
    int n, cap;
} qmix_fq_set;

/* Where calibrated methods find statistics: a .qcal file, or a collector still attached (its
 * entries as accumulated so far). Matrices without statistics, GPTQ inputs with fewer than
 * min_tokens rows or whose Hessian no damping makes positive definite are rounded to nearest,
 * as qmix quantize falls back. */
typedef struct qmix_fq_opts {
    const struct qmix_calib *calib;
    const struct qmix_calib_collector *collector;
    int64_t min_tokens;
    qmix_gptq_opts gptq;
} qmix_fq_opts;

/* Fallback and method counts of one qmix_fq_quantize call, in matrices. */
typedef struct qmix_fq_counts {
    int64_t rtn, gptq, imatrix;
    int64_t fb_nostats, fb_tokens, fb_cholesky; /* calibrated method asked, RTN done */
} qmix_fq_counts;

/* Appends a view (not yet quantized). -1: out of memory. */
int qmix_fq_add(qmix_fq_set *s, qk_mat *field, int alias, int bits, int group, int method,
                int layer, int kind, int expert);
/* Adds the matrices of decoder layer `layer` of m that recipe r quantizes, with the recipe's
 * bits, group and method (rules without method=: `method`), decided as qmix quantize decides
 * them: on the names and shapes it writes (MLX layout, language_model.model.layers.L…, routed
 * experts as stacked switch_mlp tensors [E, rows, cols]), one target per expert matrix reading
 * that expert's statistics. Returns the number of targets added, -1 out of memory. */
int qmix_fq_add_layer(qmix_fq_set *s, struct qmix_model *m, const struct qmix_recipe *r,
                      int layer, int method);
/* Quantizes every quantizable, non-alias target with bits > 0 into fresh copies (aliases share
 * them). err2/norm2 (may be NULL) get Σ‖W − Q(W)‖² and Σ‖W‖² over them, summed in an order
 * independent of the thread count; counts (may be NULL) are added to. On error no copy is
 * left. */
int qmix_fq_quantize(qmix_fq_set *s, struct qmix_pool *pool, const qmix_fq_opts *o,
                     double *err2, double *norm2, qmix_fq_counts *counts, qmix_err *err);
/* Points every target that has a copy at it; restore puts the original views back. */
void qmix_fq_install(qmix_fq_set *s);
void qmix_fq_restore(qmix_fq_set *s);
/* Frees the copies (restore first if installed); the targets stay. */
void qmix_fq_free_copies(qmix_fq_set *s);
/* Restores, frees the copies and the set. */
void qmix_fq_free(qmix_fq_set *s);
/* Bytes of the copies held. */
uint64_t qmix_fq_bytes(const qmix_fq_set *s);

#endif

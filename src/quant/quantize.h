/* `qmix quantize`: an HF bf16 (or unquantized MLX) checkpoint → an MLX mixed-precision checkpoint
 * (spec/quant-formats.md §1.5–1.7), streamed tensor by tensor with bounded memory: one source row
 * in float32, one packed row, and the scales/biases of the module being written. Also the reader
 * side of the MLX `quantization` block of config.json (§1.6) and bpw as mlx-lm computes it (§1.7). */
#ifndef QMIX_QUANT_QUANTIZE_H
#define QMIX_QUANT_QUANTIZE_H

#include <stdint.h>

#include "formats/safetensors.h"
#include "model/roles.h"
#include "qmix.h"
#include "quant/gptq.h"
#include "quant/recipe.h"

struct qmix_calib;
struct qmix_imatrix;

/* Output layouts of qmix_quantize. */
enum { QMIX_QFORMAT_MLX = 0, QMIX_QFORMAT_GPTQ = 1 };

typedef struct qmix_quant_opts {
    const qmix_recipe *recipe;
    int format;                 /* QMIX_QFORMAT_*: MLX mixed precision, or GPTQModel/vLLM (§2) */
    qmix_dtype dtype;           /* unquantized tensors, scales and biases: QMIX_BF16 or QMIX_F16 */
    int allow_requant;          /* accept an already-quantized input (dequantized, re-quantized) */
    int force;                  /* write into a non-empty OUT */
    int progress;               /* 0 silent, 1 progress with ETA on stderr */
    uint64_t shard_bytes;       /* largest shard; 0: 5 GiB */
    int n_threads;              /* 0: all cores */
    int dry_run;                /* plan only: fill the report's sizes (not seconds/input_bytes),
                                   write nothing; out_dir is not looked at (may be NULL) */
    /* calibrated methods (src/quant/gptq.h): method for rules without method= (0: RTN) */
    int method;                 /* QMIX_METHOD_* */
    const struct qmix_calib *calib;     /* statistics: GPTQ Hessians, importance */
    const struct qmix_imatrix *imatrix; /* llama.cpp importance matrix (imatrix, awq) */
    qmix_gptq_opts gptq;
    int64_t min_tokens;         /* GPTQ RTN failsafe: a matrix whose input saw fewer calibration
                                   rows is rounded to nearest; < 0: 0.5 % of the calibration
                                   tokens (GPTQModel's default, spec §3.10) */
} qmix_quant_opts;

typedef struct qmix_quant_role_stat {
    uint64_t params, bytes, tensors;
    uint32_t bits_mask;         /* bit b set: some tensor at b bits; bit 16: some kept 16/32-bit */
} qmix_quant_role_stat;

typedef struct qmix_quant_report {
    uint64_t params, bytes;     /* mlx-lm's bpw = 8·bytes/params */
    double bpw;
    uint64_t input_bytes;       /* source tensor bytes read */
    int n_tensors, n_shards;
    double seconds;
    int default_bits, default_group;
    qmix_quant_role_stat roles[QMIX_ROLE_COUNT];
    /* calibrated methods, counted in matrices (an expert's gate_proj is one) */
    int64_t n_gptq, n_imatrix;  /* quantized with GPTQ / importance-weighted RTN */
    int64_t n_awq;              /* quantized with AWQ-scaled columns (RTN) */
    int64_t awq_folds, awq_unfolded; /* AWQ scale vectors folded; groups left unscaled (no
                                        statistics, or a consumer with another method) */
    int64_t fb_tokens;          /* GPTQ → RTN: fewer than min_tokens calibration rows */
    int64_t fb_cholesky;        /* GPTQ → RTN: no damping made H positive definite */
    int64_t fb_nostats;         /* asked for a calibrated method, no statistics for the input */
    int64_t min_tokens;         /* the failsafe threshold used */
    /* --format gptq */
    int64_t gptq_kept16;        /* modules the recipe quantizes that vLLM builds unquantized
                                   (router, shared-expert gate, embedding, vision): kept 16-bit */
    int gptq_non_marlin;        /* quantized modules outside Marlin (2/3 bits): vLLM's slower
                                   gptq kernel serves them */
} qmix_quant_report;

int qmix_quantize(const char *in, const char *out_dir, const qmix_quant_opts *o,
                  qmix_quant_report *rep, qmix_err *err);

/* The report a recipe would give on a geometry, from the config alone (text model, MLX layout:
 * MTP dropped, lm_head dropped if tied, no vision tower). */
int qmix_quant_estimate(const qmix_config *cfg, const qmix_recipe *r, qmix_quant_report *rep,
                        qmix_err *err);

/* The MLX `quantization` block of a config.json. */
typedef struct qmix_qconfig qmix_qconfig;
/* *out = NULL when config.json has no top-level "quantization" object. */
int qmix_qconfig_load(const char *config_path, qmix_qconfig **out, qmix_err *err);
void qmix_qconfig_free(qmix_qconfig *q);
/* For module path P (no ".weight"): 1 quantized (*bits, *group set), 0 plain, -1 bad entry.
 * Rule (§1.6): an entry decides (object → quantized with its fields over the defaults, true →
 * defaults, false → plain); without one, quantized with the defaults iff P.scales exists. */
int qmix_qconfig_module(const qmix_qconfig *q, const char *module, int has_scales, int *bits,
                        int *group, qmix_err *err);
/* bpw over every tensor of a checkpoint, as mlx-lm computes it; q may be NULL (nothing
 * quantized). */
int qmix_store_bpw(const qmix_st_store *s, const qmix_qconfig *q, double *bpw, uint64_t *params,
                   uint64_t *bytes, qmix_err *err);

#endif

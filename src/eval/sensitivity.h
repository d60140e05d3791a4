/* Sensitivity analysis: the error that quantizing ONE tensor role alone (MLX affine at given bits
 * and group size, rounded to nearest or by a calibrated method) adds to a model, per role or per (role, layer):
 *   - relative weight error ‖W − Q(W)‖_F / ‖W‖_F over the role's matrices (no data needed);
 *   - with calibration tokens, the relative output error of the role's matmuls on the real
 *     activations entering them, sqrt(Σ‖(W − Q(W))x‖² / Σ‖Wx‖²) over every token (x as the
 *     model with the role quantized computes it, i.e. what Q(W) really sees; for embed, the
 *     looked-up rows), and the end-to-end KLD, mean over the calibration tokens of
 *     KL(base ‖ model with that role quantized).
 * The checkpoint is never touched: the role's qk_mat views are pointed at in-memory quantized
 * copies for the measurement and restored (bitwise) afterwards, one role (one layer's worth with
 * per_layer) at a time. Nothing here prints: progress goes through a callback, Ctrl-C through a
 * stop flag. */
#ifndef QMIX_EVAL_SENSITIVITY_H
#define QMIX_EVAL_SENSITIVITY_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "model/roles.h"
#include "qmix.h"

struct qmix_calib;

#define QMIX_SENS_MAX_BITS 6
/* Base logits are kept whole while n_rows · vocab · 4 bytes stays under this; above it, the
 * top-k compact rows of eval/kld.h (QMIX_KLD_TOPK_DEFAULT tokens per row). */
#define QMIX_SENS_FULL_BASE_BYTES ((int64_t)512 << 20)

typedef struct qmix_sens_opts {
    int bits[QMIX_SENS_MAX_BITS];  /* each in {2,3,4,5,6,8}, distinct */
    int n_bits;
    int group_size;                /* 32, 64 or 128 */
    /* How the role is quantized: QMIX_METHOD_RTN (or 0), _GPTQ or _IMATRIX (quant/recipe.h),
       with the statistics of qmix calibrate for the calibrated ones; matrices without
       statistics, and GPTQ inputs with fewer than min_tokens rows, are rounded to nearest as
       qmix quantize does. */
    int method;
    const struct qmix_calib *calib;
    int64_t min_tokens;
    /* 1: measure GGUF block types instead of MLX affine: bits b is the type the GGUF writer
       gives a recipe's bits=b (2 Q2_K, 3 Q3_K, 4 Q4_K, 5 Q5_K, 6 Q6_K, 8 Q8_0) after its
       fallback for rows the block does not divide (Q4_K -> Q5_0, ...; F16 -> not quantized);
       group_size must then be 32 and method rtn or imatrix. */
    int gguf;
    int per_layer;                 /* one row per (role, layer) instead of per role */
    int sample;                    /* > 0: that many layers per role (evenly spaced) and experts
                                      per layer; 0: everything */
    /* Calibration: NULL/0 for weight error only. ctx tokens per window, n_windows windows
       (0: as many whole windows as the tokens hold). */
    const int32_t *tokens;
    int64_t n_tokens;
    int ctx, n_windows;
    int n_threads;                 /* 0: all cores */
    int64_t max_base_bytes;        /* whole base logits up to this; 0: QMIX_SENS_FULL_BASE_BYTES */
    /* Called after each unit of work (done of total; a unit = one window of a forward pass, or
       one quantization without calibration). */
    void (*progress)(void *user, int64_t done, int64_t total);
    void *user;
    const volatile sig_atomic_t *stop; /* once set: stop, keep what was measured */
} qmix_sens_opts;

/* One (row, bits) measurement, as sums so rows can be merged exactly. */
typedef struct qmix_sens_cell {
    int has_weight, has_output, has_kld;
    double w_err2, w_norm2;        /* Σ‖W − Q(W)‖², Σ‖W‖² */
    double o_err2, o_norm2;        /* Σ‖(W − Q(W))x‖², Σ‖Wx‖² */
    double kld_sum;                /* Σ over calibration rows of KL(base ‖ quantized) */
    int64_t kld_rows;
} qmix_sens_cell;

typedef struct qmix_sens_row {
    qmix_role role;
    int layer;                     /* -1: every layer of the role (or embed / lm_head) */
    int quantizable;               /* 0: no matrix of it has an input dim divisible by the group */
    int64_t in_dim;                /* an input dimension that blocked quantization (when 0) */
    int64_t params;                /* parameters the row stands for (whole role / layer) */
    int64_t params_measured;       /* of which quantized in the measurement (< params: sampled) */
    int layers_total, layers_measured; /* per-layer rows: the role's layers, and how many of
                                          them have rows (sampled); else 1, 1 */
    double t_quant, t_eval;        /* seconds spent quantizing and running the model */
    qmix_sens_cell cell[QMIX_SENS_MAX_BITS];
} qmix_sens_row;

typedef struct qmix_sens_result {
    int n_bits, bits[QMIX_SENS_MAX_BITS], group_size, per_layer, sample, method;
    int gguf;                      /* measured with GGUF block types */
    qmix_sens_row *rows;
    int n_rows;
    int has_calib;
    int ctx, n_windows;            /* windows actually used */
    int64_t calib_rows;            /* scored calibration tokens per pass */
    int base_topk;                 /* 0: base logits kept whole; else top-k rows */
    int stopped;                   /* interrupted: later cells are missing */
    double elapsed_s;
    double full_estimate_s;        /* time a full (unsampled) run would take; = elapsed if not sampled */
} qmix_sens_result;

/* The roles measured (every matmul role) and those never quantized by any recipe (norm,
 * gdn_params: 1-D or tiny, kept at 16 bits; listed, not measured). */
extern const qmix_role qmix_sens_roles[];
extern const int qmix_sens_n_roles;
extern const qmix_role qmix_sens_kept_roles[];
extern const int qmix_sens_n_kept_roles;

/* Runs the analysis on model (restored exactly before returning, error or not). Returns 0 (also
 * when stopped: out->stopped), -1 with err. out->rows are in role order; see qmix_sens_sort. */
int qmix_sensitivity_run(qmix_model *model, const qmix_sens_opts *opts, qmix_sens_result *out,
                         qmix_err *err);
void qmix_sens_result_free(qmix_sens_result *r);

/* Cell values; NAN when not measured. */
double qmix_sens_weight_error(const qmix_sens_cell *c);
double qmix_sens_output_error(const qmix_sens_cell *c);
double qmix_sens_kld(const qmix_sens_cell *c);

/* Most sensitive first: by KLD at the lowest bits when measured, else by output error, else by
 * weight error; unquantizable rows last. */
void qmix_sens_sort(qmix_sens_result *r);

/* A recipe (docs/recipes.md format) from the measurements: every measured role starts at the
 * lowest bits; the upgrade (to higher bits or keep) buying the most error reduction per extra
 * bit·parameter is taken while the average code bits per quantized weight stay within
 * target_bits (<= 0: the lowest bits + 0.25). Error = summed KLD when measured, else output
 * error, else weight error. Writes NUL-terminated text into buf; -1 with err if it does not fit. */
int qmix_sens_recipe(const qmix_sens_result *r, double target_bits, const char *label, char *buf,
                     size_t len, qmix_err *err);

#endif

/* Calibrated quantizers writing MLX affine groups (spec/quant-formats.md §3, §4.4):
 *
 * - GPTQ (§3): from the input Hessian H = Σ x xᵀ of a linear layer, the upper Cholesky factor U of
 *   H⁻¹ (damped, dead columns neutralised, optional group-aware act-order), then each output row
 *   is quantized column by column with the error of each column fed forward to the columns not
 *   yet quantized (block size B, lazy block updates). Rows are independent given U, so the
 *   streaming quantizer runs GPTQ one row at a time on its worker threads.
 * - importance-weighted RTN (§4.4): per group, the scale/bias minimising Σ c_j (w_j − ŵ_j)²
 *   over a few candidate ranges, refined by weighted least squares.
 *
 * Both write what qmix_affine_quantize_row writes (codes, per-group scale s and bias β with
 * w ≈ s·q + β), so the output stays an MLX checkpoint. Choices (documented per §3.8):
 * - group parameters are computed on the *fully updated* weights of the group (all earlier
 *   columns' feedback included), not GPTQModel's stale-within-block copy, by the search of the
 *   importance-weighted RTN below with weights diag(H) (the role of GPTQModel's optional MSE grid,
 *   §3.6 step 5: clipping the range pays at 2-4 bits), or with opts.mlx_rule by MLX's
 *   asymmetric min/max rule (§1.2);
 * - s and β are rounded to the output dtype before the codes are chosen, so the error fed
 *   forward is the error of what readers will actually compute;
 * - act-order is GPTQModel's group-aware reordering (GAR, §3.5): MLX groups are contiguous input
 *   columns, so columns are reordered only inside their group and whole groups by importance;
 *   plain desc_act would scatter a group's columns, which MLX cannot express.
 * No printing; errors through qmix_err. */
#ifndef QMIX_QUANT_GPTQ_H
#define QMIX_QUANT_GPTQ_H

#include <stdint.h>

#include "qmix.h"

typedef struct qmix_gptq_opts {
    double damp;      /* relative diagonal damping (§3.4), in (0, 1); 0 → 0.01 */
    int act_order;    /* group-aware act-order (GAR) */
    int block;        /* column block of the lazy update; 0 → 128 */
    int mlx_rule;     /* group parameters by MLX's min/max rule instead of the search below */
    int grid;         /* QMIX_GRID_*: the code grid group parameters must lie on */
    struct qmix_pool *pool; /* threads for the factorisation of qmix_gptq_prepare; NULL: this one.
                               Must not be running a job (qmix_pool_run is not reentrant). */
} qmix_gptq_opts;

/* Code grids. MLX: any scale and bias. SYM: GPTQ's symmetric grid w ≈ s·(q − 2^(bits−1)) (§2.3,
 * §3.6), written as an MLX group with bias −s·2^(bits−1) (exact: a power-of-two multiple), so a
 * GPTQ checkpoint (sym, integer zero) holds exactly the codes and scales chosen. */
enum { QMIX_GRID_MLX = 0, QMIX_GRID_SYM = 1 };

/* What rows of one matrix share: the factor U in processing order and the order itself. */
typedef struct qmix_gptq_prep {
    int64_t k;
    int group;
    int block;
    float *u;         /* [k][k] row-major, upper triangle used: Uᵀ U = (H + λI)⁻¹ (permuted) */
    int32_t *perm;    /* perm[p] = original column processed at position p */
    uint8_t *dead;    /* [k] original column never saw a non-zero input */
    float *hdiag;     /* [k] diag(H) in processing order: group search weights; NULL: MLX rule */
    double damp;      /* damping actually used */
    int grid;         /* QMIX_GRID_* (from the options) */
    int n_dead;
} qmix_gptq_prep;

/* Prepares from the Hessian: h_upper packed upper triangle (row i holds H[i][i..k-1]) of Σ x xᵀ,
 * or h_full [k][k] when h_upper is NULL (any positive scale; only ratios matter). Returns 0, 1 when
 * no damping made H positive definite (the caller falls back to RTN, §3.4 step 3), -1 on error
 * (out of memory, bad arguments). */
int qmix_gptq_prepare(const double *h_upper, const double *h_full, int64_t k, int group,
                      const qmix_gptq_opts *o, qmix_gptq_prep *out, qmix_err *err);
void qmix_gptq_prep_free(qmix_gptq_prep *p);

/* One output row: w[k] original weights (not modified); work[2·k + 128] scratch. scale_dtype is the
 * dtype scales/biases are stored in (QMIX_BF16, QMIX_F16 or QMIX_F32); scales/biases come back
 * already rounded to it. packed[k·bits/32] codes. */
void qmix_gptq_quantize_row(const qmix_gptq_prep *p, const float *w, int bits,
                            qmix_dtype scale_dtype, float *work, uint32_t *packed, float *scales,
                            float *biases);

/* Importance-weighted RTN of one row: imp[k] ≥ 0 per input channel (NULL: all 1). Same outputs
 * as above. work[k] scratch. */
void qmix_wrtn_quantize_row(const float *w, const float *imp, int64_t k, int bits, int group,
                            qmix_dtype scale_dtype, float *work, uint32_t *packed, float *scales,
                            float *biases);

/* One group of n values on the symmetric grid: s rounded to scale_dtype, *b = −s·2^(bits−1).
 * Without c (or search 0): the smallest scale that represents both extremes (the negative one at
 * code 0, the positive one at code maxq), not GPTQModel's 2·absmax/maxq, which clips a positive
 * extreme (§3.6 quirk). With search: that scale shrunk in steps, keeping the least Σ c·err². */
void qmix_sym_group_params(const float *x, const float *c, int n, int bits, qmix_dtype scale_dtype,
                           int search, float *s, float *b);
/* A row on the symmetric grid (RTN when imp is NULL and search 0, else importance-weighted).
 * Same outputs as qmix_affine_quantize_row, scales/biases rounded to scale_dtype. */
void qmix_sym_quantize_row(const float *w, const float *imp, int64_t k, int bits, int group,
                           qmix_dtype scale_dtype, int search, uint32_t *packed, float *scales,
                           float *biases);

/* MLX's min/max rule (§1.2) for one group of n values, with s and β rounded to scale_dtype. */
void qmix_mlx_group_params(const float *x, int n, int bits, qmix_dtype scale_dtype, float *s,
                           float *b);
/* v rounded to dtype (BF16, F16; F32: unchanged). */
float qmix_round_to_dtype(float v, qmix_dtype dt);

#endif

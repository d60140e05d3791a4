/* Compute kernels. They know dtypes and shapes, never models. Every kernel has a scalar
 * reference; SIMD versions are picked at run time from the CPU's features and tested against it. */
#ifndef QMIX_KERNELS_H
#define QMIX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "qmix.h"

/* A row-major weight matrix [rows, cols], rows row_bytes apart. dtype F32, F16 or BF16: plain
 * values. dtype U32: MLX affine codes (bits, group_size; see src/quant/affine.h), one packed row
 * of cols·bits/32 words per row, with per-group scales and biases [rows][cols/group_size] of
 * scale_dtype (BF16, F16 or F32), scale rows scale_row_bytes apart. The data may be unaligned
 * (it sits where the checkpoint put it). dtype U8: rows of ggml blocks of type ggml_type
 * (quant/ggml_blocks.h, a GGUF tensor as stored), row_bytes apart. */
typedef struct qk_mat {
    qmix_dtype dtype;
    int64_t rows, cols;
    size_t row_bytes;
    const void *data;
    int bits, group_size;
    qmix_dtype scale_dtype;
    const void *scales, *biases;
    size_t scale_row_bytes;
    int ggml_type;
} qk_mat;

/* Y[t][o] = Σ_i W[o][i]·X[t][i] for rows o in [row_begin, row_end) and tokens t in [0, n).
 * X rows are ldx floats apart, Y rows ldy. Each output is accumulated in the same order whatever
 * n or the row range, so splitting rows across threads or tokens across calls changes nothing. */
typedef void (*qk_matmul_fn)(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                             int n, int64_t ldx, float *y, int64_t ldy);

void qk_matmul(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
               int64_t ldx, float *y, int64_t ldy);

/* Widen row r of w into out[cols] as float32. */
void qk_mat_row_f32(const qk_mat *w, int64_t r, float *out);

typedef enum qk_isa { QK_ISA_SCALAR = 0, QK_ISA_AVX2, QK_ISA_AVX512, QK_ISA_COUNT } qk_isa;

/* The best the CPU supports, unless QMIX_ISA=scalar|avx2|avx512 asks for less. */
qk_isa qk_isa_active(void);
const char *qk_isa_name(qk_isa isa);
int qk_isa_supported(qk_isa isa);
/* Int8 activations for quantized decode (n = 1): on by default where the CPU
 * has AVX-512 VNNI, off with QMIX_ACT_INT8=0; qk_set_act_int8 overrides both (tests). */
int qk_act_int8(void);
void qk_set_act_int8(int on);
/* 3-, 5- and 6-bit weights take the int8 path too where the CPU also has AVX512-VBMI. */
int qk_act_int8_vbmi(void);

/* The matmul of one ISA, for tests and benchmarks; NULL if not compiled in. */
qk_matmul_fn qk_matmul_for(qk_isa isa);

/* Scalar conversions. */
float qk_bf16_to_f32(uint16_t h);
uint16_t qk_f32_to_bf16(float f); /* round to nearest even */
float qk_f16_to_f32(uint16_t h);
uint16_t qk_f32_to_f16(float f);  /* round to nearest even */

/* The gated delta rule for one head over n tokens (see deltanet.c): state S[dk][dv] is updated in
 * place; q, k rows are ld_qk floats apart, v rows ld_v, outputs o rows ld_o; log_decay[t] (≤ 0)
 * and beta[t] per token. The recurrent form needs scratch of dv floats, the chunked form
 * qk_delta_rule_chunked_scratch() floats; both give the same result within float32 rounding. */
void qk_delta_rule_recurrent(float *S, int dk, int dv, int n, const float *q, const float *k,
                             const float *v, int64_t ld_qk, int64_t ld_v, const float *log_decay,
                             const float *beta, float *o, int64_t ld_o, float *scratch);
void qk_delta_rule_chunked(float *S, int dk, int dv, int n, const float *q, const float *k,
                           const float *v, int64_t ld_qk, int64_t ld_v, const float *log_decay,
                           const float *beta, float *o, int64_t ld_o, int chunk, float *scratch);
size_t qk_delta_rule_chunked_scratch(int dk, int dv, int chunk);

/* KV cache rows (kvcache.c). A row of n values of one type: F32 / F16 plain values; Q8_0 and
 * Q4_0 blocks of QK_KV_BLOCK values {f16 scale d; codes}: Q8_0 value = d·int8, Q4_0 value =
 * d·(nibble − 8), nibble i of a block in the low half of byte i for i < 16, the high half of byte
 * i − 16 otherwise. Quantized rows need n a multiple of QK_KV_BLOCK (qk_kv_valid). */
#define QK_KV_BLOCK 32
int qk_kv_valid(qmix_kv_type kv, int64_t n);
size_t qk_kv_bytes(qmix_kv_type kv, int64_t n);
void qk_kv_quantize(qmix_kv_type kv, const float *x, int64_t n, void *dst);
void qk_kv_dequantize(qmix_kv_type kv, const void *src, int64_t n, float *out);

/* Attention over a KV cache in its stored form, for nq queries sharing one head's keys/values:
 * out[i][dim] = Σ_{j < n[i]} softmax_j(scale·q[i]·k_j)·v_j, key/value rows ld bytes apart (each
 * dim values of type kv; F32 rows 4-byte aligned). Online softmax over tiles of QK_ATTN_TILE keys,
 * every query sharing each tile read (a quantized tile is widened to float32 once, into the
 * scratch): scratch holds
 * qk_attend_kv_scratch(nq, dim) floats whatever n, so the context is bounded only by the cache.
 * Each query's result is the same whatever queries it is grouped with. Dispatched to the active
 * ISA like qk_matmul. */
#define QK_ATTN_TILE 64
#define QK_ATTN_MAX_Q 64 /* queries per call */
#define qk_attend_kv_scratch(nq, dim) ((size_t)((nq) + (dim)) * QK_ATTN_TILE + 2 * (size_t)(nq))
typedef void (*qk_attend_kv_fn)(qmix_kv_type kv, int nq, const float *const *q, float *const *out,
                                const int64_t *n, const void *keys, const void *values, size_t ld,
                                int64_t dim, float scale, float *scratch);
void qk_attend_kv(qmix_kv_type kv, int nq, const float *const *q, float *const *out,
                  const int64_t *n, const void *keys, const void *values, size_t ld, int64_t dim,
                  float scale, float *scratch);
/* The kernel of one ISA, for tests and benchmarks. */
qk_attend_kv_fn qk_attend_kv_for(qk_isa isa);

/* Elementwise and reduction ops on float32 vectors (scalar; the compiler vectorises them). */
float qk_dot(const float *a, const float *b, int64_t n);
void qk_rmsnorm(float *out, const float *x, const float *weight, int64_t n, float eps);
void qk_l2norm(float *x, int64_t n, float eps);
void qk_softmax(float *x, int64_t n);
float qk_silu(float x);
float qk_sigmoid(float x);
float qk_softplus(float x);

#endif

/* Per-ISA entry points, seen only by the dispatcher and the kernel tests. */
#ifndef QMIX_KERNELS_IMPL_H
#define QMIX_KERNELS_IMPL_H

#include "kernels/kernels.h"

void qk_matmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                      int64_t ldx, float *y, int64_t ldy);
void qk_matmul_avx2(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                    int64_t ldx, float *y, int64_t ldy);
void qk_matmul_avx512(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                      int64_t ldx, float *y, int64_t ldy);

/* The quantized matmuls (dtype QMIX_U32, MLX affine codes): the dense entry points above call
 * them for a U32 matrix. qk_qmat_valid: bits, group size, scale dtype and cols usable (outputs are
 * NaN otherwise); qk_qmat_scale reads one scale or bias of dtype dt. */
void qk_qmatmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                       int64_t ldx, float *y, int64_t ldy);
void qk_qmatmul_avx2(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                     int64_t ldx, float *y, int64_t ldy);
void qk_qmatmul_avx512(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                       int n, int64_t ldx, float *y, int64_t ldy);
int qk_qmat_valid(const qk_mat *w);
float qk_qmat_scale(const void *p, qmix_dtype dt);

/* The ggml block-format matmuls (dtype QMIX_U8, spec/quant-formats.md §5.3), fused
 * dequantize-and-dot: each block of a row is dequantized once (on the stack) and dotted with
 * every token. qk_gmat_valid: the type is one qmix dequantizes and cols a whole number of blocks
 * (outputs are NaN otherwise). */
void qk_gmatmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                       int64_t ldx, float *y, int64_t ldy);
void qk_gmatmul_avx2(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                     int64_t ldx, float *y, int64_t ldy);
void qk_gmatmul_avx512(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                       int n, int64_t ldx, float *y, int64_t ldy);
int qk_gmat_valid(const qk_mat *w);

/* Decode with int8 activations (qmatvec_q8.c): the reference takes every width; the VNNI kernel
 * 2, 4 and 8 bits, the VBMI one 3, 5 and 6 (it needs AVX512-VBMI too); rows of at most
 * QK_Q8_MAX_COLS inputs. qk_quantize_x_q8 quantizes x in blocks of 32 (xq[cols], d[cols/32]) and
 * sums it per weight group (gsum[cols/group_size]). y[o] for rows [row_begin, row_end). */
#define QK_Q8_MAX_COLS 16384
int qk_q8_supported(const qk_mat *w);
void qk_quantize_x_q8(const float *x, int64_t cols, int group_size, int8_t *xq, float *d,
                      float *gsum);
void qk_qmatvec_q8_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                          float *y);
void qk_qmatvec_q8_vnni(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                        float *y);
void qk_qmatvec_q8_vbmi(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                        float *y);

/* Decode with int8 activations for ggml blocks (gmatvec_q8.c): Q4_K, Q5_K, Q6_K, Q8_0 (cols a
 * multiple of 64) and Q4_0/Q5_0 (cols a multiple of 128), rows of at most QK_Q8_MAX_COLS inputs (qk_gq8_supported; outputs are NaN
 * otherwise). x is quantized with qk_quantize_x_q8; y[o] for rows [row_begin, row_end). The
 * scalar reference and the AVX-512 VNNI kernel do the same integer sums. */
int qk_gq8_supported(const qk_mat *w);
void qk_gmatvec_q8_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                          float *y);
void qk_gmatvec_q8_vnni(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                        float *y);

/* Attention over a quantized KV cache (see qk_attend_kv), one per ISA. */
#define QK_ATTEND_KV_ARGS                                                                          \
    qmix_kv_type kv, int nq, const float *const *q, float *const *out, const int64_t *n,           \
        const void *keys, const void *values, size_t ld, int64_t dim, float scale, float *scratch
void qk_attend_kv_scalar(QK_ATTEND_KV_ARGS);
void qk_attend_kv_avx2(QK_ATTEND_KV_ARGS);
void qk_attend_kv_avx512(QK_ATTEND_KV_ARGS);

/* Tokens are processed in chunks of this many so a chunk of X stays in L2 while the weight rows
 * stream past it; the weights are read once per chunk. */
#define QK_TOKEN_CHUNK 64

#endif

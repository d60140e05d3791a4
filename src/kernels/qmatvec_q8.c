/* Quantized matrix × int8 vector: the decode path for 2-, 4- and 8-bit MLX affine weights. The
 * activation vector is quantized to int8 in blocks of 32 (d = max|x|/127, q = round(x/d)), so a
 * group's dot product becomes integer multiply-adds, which VNNI does 64 at a time:
 *   Σ_k (s·q_k + β)·x_k ≈ s·Σ_blocks d_b·Σ_{k∈b} q_k·xq_k + β·Σ_k x_k
 * (the bias term uses the exact float sums). This file holds the quantizer every variant shares
 * and the scalar reference; qmatvec_q8_vnni.c the AVX-512 VNNI version for 2/4/8 bits,
 * qmatvec_q8_vbmi.c the VNNI + VBMI one for 3/5/6 bits. */
#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"

int qk_q8_supported(const qk_mat *w) { return qk_qmat_valid(w) && w->cols <= QK_Q8_MAX_COLS; }

void qk_quantize_x_q8(const float *x, int64_t cols, int group_size, int8_t *xq, float *d,
                      float *gsum)
{
    for (int64_t b = 0; b < cols / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float id = amax > 0 ? 127.0f / amax : 0.0f;
        d[b] = amax / 127.0f;
        for (int i = 0; i < 32; i++) xq[b * 32 + i] = (int8_t)nearbyintf(xb[i] * id);
    }
    for (int64_t g = 0; g < cols / group_size; g++) {
        float s = 0;
        for (int i = 0; i < group_size; i++) s += x[g * group_size + i];
        gsum[g] = s;
    }
}

/* Code k of a row's LSB-first bit stream (a code never spans more than two bytes). */
static inline int code_at(const uint8_t *row, int64_t k, int bits)
{
    uint64_t o = (uint64_t)k * (uint64_t)bits;
    unsigned sh = (unsigned)(o & 7);
    unsigned v = row[o >> 3];
    if (sh + (unsigned)bits > 8) v |= (unsigned)row[(o >> 3) + 1] << 8;
    return (int)((v >> sh) & ((1u << bits) - 1));
}

void qk_qmatvec_q8_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                          float *y)
{
    const int bits = w->bits, gs = w->group_size;
    const int64_t cols = w->cols;
    const size_t sesz = w->scale_dtype == QMIX_F32 ? 4 : 2;
    int8_t xq[QK_Q8_MAX_COLS];
    float d[QK_Q8_MAX_COLS / 32], gsum[QK_Q8_MAX_COLS / 32];
    qk_quantize_x_q8(x, cols, gs, xq, d, gsum);
    for (int64_t o = row_begin; o < row_end; o++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
        const uint8_t *srow = (const uint8_t *)w->scales + (size_t)o * w->scale_row_bytes;
        const uint8_t *brow = (const uint8_t *)w->biases + (size_t)o * w->scale_row_bytes;
        float acc = 0;
        for (int64_t g = 0; g < cols / gs; g++) {
            float s = qk_qmat_scale(srow + (size_t)g * sesz, w->scale_dtype);
            float b = qk_qmat_scale(brow + (size_t)g * sesz, w->scale_dtype);
            for (int64_t blk = g * gs / 32; blk < (g + 1) * gs / 32; blk++) {
                int32_t isum = 0;
                for (int64_t k = blk * 32; k < blk * 32 + 32; k++)
                    isum += code_at(row, k, bits) * xq[k];
                acc += (float)isum * (s * d[blk]);
            }
            acc += b * gsum[g];
        }
        y[o] = acc;
    }
}

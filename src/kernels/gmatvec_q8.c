/* ggml block-format matrix × int8 vector: the decode path (n = 1) for Q4_K, Q5_K, Q6_K, Q8_0, Q4_0
 * and Q5_0 (spec/quant-formats.md §5.3). x is quantized once per call with the MLX path's quantizer
 * (qk_quantize_x_q8: blocks of 32, d_b = max|x|/127) and its exact float sum per block of 32 is
 * kept. Every format's sub-blocks are 16 or 32 wide and start on a 16-element border, so each
 * sub-block's dot with x is an integer sum times one float factor:
 *   Q4_K/Q5_K (32-wide, w = d·sc·q − dmin·m):  d·sc·d_b·Σ q·xq − dmin·m·Σx
 *   Q6_K      (16-wide, w = d·sc·(q − 32)):    d·sc·d_b·Σ (q − 32)·xq
 *   Q8_0      (32-wide, w = d·q):              d·d_b·Σ q·xq
 *   Q4_0/Q5_0 (32-wide, w = d·(q − 8 or 16)):  d·d_b·Σ (q − 8 or 16)·xq
 * (the min term uses the exact Σx, as the MLX path does for its bias). This file holds the
 * support test and the scalar reference, which states that arithmetic plainly; gmatvec_q8_vnni.c
 * does the same integer sums with AVX-512 VNNI. */
#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"

int qk_gq8_supported(const qk_mat *w)
{
    switch (w->ggml_type) {
    case QMIX_GGML_Q4_K: case QMIX_GGML_Q5_K: case QMIX_GGML_Q6_K: break;
    /* the VNNI kernel takes Q8_0 two blocks (one 64-byte vector) at a time */
    case QMIX_GGML_Q8_0: if (w->cols % 64) return 0; break;
    /* and Q4_0/Q5_0 four blocks (two vectors of codes) at a time */
    case QMIX_GGML_Q4_0: case QMIX_GGML_Q5_0: if (w->cols % 128) return 0; break;
    default: return 0;
    }
    return qk_gmat_valid(w) && w->cols <= QK_Q8_MAX_COLS;
}

static float f16_at(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return qk_f16_to_f32(h);
}

/* The 6-bit scale and min of sub-block s of a Q4_K/Q5_K block's 12-byte field (§5.3). */
static void k4_scale_min(const uint8_t *sc, int s, int *scale, int *min)
{
    if (s < 4) {
        *scale = sc[s] & 63;
        *min = sc[s + 4] & 63;
    } else {
        *scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
        *min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
}

/* One row's Σ over its blocks; xq/d/bsum cover the row's cols. */
static float row_dot(int type, const uint8_t *b, int64_t cols, const int8_t *xq, const float *d,
                     const float *bsum)
{
    float acc = 0;
    if (type == QMIX_GGML_Q8_0) {
        for (int64_t k0 = 0; k0 < cols; k0 += 32, b += 34) {
            int32_t isum = 0;
            for (int i = 0; i < 32; i++) isum += (int8_t)b[2 + i] * xq[k0 + i];
            acc += f16_at(b) * d[k0 / 32] * (float)isum;
        }
    } else if (type == QMIX_GGML_Q4_0 || type == QMIX_GGML_Q5_0) {
        const int q5 = type == QMIX_GGML_Q5_0;
        const uint8_t *qs = b + (q5 ? 6 : 2);
        for (int64_t k0 = 0; k0 < cols; k0 += 32, b += q5 ? 22 : 18, qs += q5 ? 22 : 18) {
            uint32_t qh;
            memcpy(&qh, b + 2, 4);
            int32_t isum = 0;
            for (int j = 0; j < 32; j++) {
                int q = j < 16 ? qs[j] & 15 : qs[j - 16] >> 4;
                if (q5) q |= (int)((qh >> j) & 1) << 4;
                isum += (q - (q5 ? 16 : 8)) * xq[k0 + j];
            }
            acc += f16_at(b) * d[k0 / 32] * (float)isum;
        }
    } else if (type == QMIX_GGML_Q6_K) {
        for (int64_t k0 = 0; k0 < cols; k0 += 256, b += 210) {
            const uint8_t *ql = b, *qh = b + 128;
            const int8_t *sc = (const int8_t *)(b + 192);
            float dd = f16_at(b + 208);
            for (int s = 0; s < 16; s++) {
                int32_t isum = 0;
                for (int j = 16 * s; j < 16 * s + 16; j++) {
                    int h = j / 128, t = (j % 128) / 32, l = j % 32;
                    int lb = ql[64 * h + 32 * (t & 1) + l];
                    int q = (t < 2 ? lb & 15 : lb >> 4) | ((qh[32 * h + l] >> (2 * t)) & 3) << 4;
                    isum += (q - 32) * xq[k0 + j];
                }
                acc += dd * (float)sc[s] * d[(k0 + 16 * s) / 32] * (float)isum;
            }
        }
    } else { /* Q4_K, Q5_K */
        const int q5 = type == QMIX_GGML_Q5_K;
        const size_t bb = q5 ? 176 : 144;
        for (int64_t k0 = 0; k0 < cols; k0 += 256, b += bb) {
            float dd = f16_at(b), dmin = f16_at(b + 2);
            const uint8_t *qh = b + 16, *qs = b + (q5 ? 48 : 16);
            for (int s = 0; s < 8; s++) {
                int scale, min;
                k4_scale_min(b + 4, s, &scale, &min);
                const uint8_t *q = qs + 32 * (s / 2);
                int32_t isum = 0;
                for (int l = 0; l < 32; l++) {
                    int v = s % 2 ? q[l] >> 4 : q[l] & 15;
                    if (q5) v |= ((qh[l] >> s) & 1) << 4;
                    isum += v * xq[k0 + 32 * s + l];
                }
                int64_t blk = (k0 + 32 * s) / 32;
                acc += dd * (float)scale * d[blk] * (float)isum - dmin * (float)min * bsum[blk];
            }
        }
    }
    return acc;
}

void qk_gmatvec_q8_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                          float *y)
{
    if (!qk_gq8_supported(w)) {
        for (int64_t o = row_begin; o < row_end; o++) y[o] = NAN;
        return;
    }
    int8_t xq[QK_Q8_MAX_COLS];
    float d[QK_Q8_MAX_COLS / 32], bsum[QK_Q8_MAX_COLS / 32];
    qk_quantize_x_q8(x, w->cols, 32, xq, d, bsum);
    for (int64_t o = row_begin; o < row_end; o++)
        y[o] = row_dot(w->ggml_type, (const uint8_t *)w->data + (size_t)o * w->row_bytes, w->cols,
                       xq, d, bsum);
}

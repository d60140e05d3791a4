/* The reference every SIMD matmul is tested against: plain loops, each weight widened to float32
 * as it is read. Allocates nothing, so it can serve decode on CPUs without a SIMD path. */
#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"

/* Widens cols [k, k + n) of a row into out. */
static void widen(const uint8_t *row, qmix_dtype dtype, int64_t k, int n, float *out)
{
    for (int i = 0; i < n; i++) {
        uint16_t h;
        switch (dtype) {
        case QMIX_F32: memcpy(&out[i], row + 4 * (k + i), 4); break;
        case QMIX_BF16: memcpy(&h, row + 2 * (k + i), 2); out[i] = qk_bf16_to_f32(h); break;
        case QMIX_F16: memcpy(&h, row + 2 * (k + i), 2); out[i] = qk_f16_to_f32(h); break;
        default: out[i] = NAN; break;
        }
    }
}

#define BLOCK 256 /* columns widened at a time, on the stack */

void qk_matmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                      int64_t ldx, float *y, int64_t ldy)
{
    if (w->dtype == QMIX_U32) {
        qk_qmatmul_scalar(w, row_begin, row_end, x, n, ldx, y, ldy);
        return;
    }
    if (w->dtype == QMIX_U8) {
        qk_gmatmul_scalar(w, row_begin, row_end, x, n, ldx, y, ldy);
        return;
    }
    float buf[BLOCK];
    for (int64_t o = row_begin; o < row_end; o++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
        for (int t = 0; t < n; t++) y[(int64_t)t * ldy + o] = 0;
        for (int64_t k = 0; k < w->cols; k += BLOCK) {
            int len = w->cols - k < BLOCK ? (int)(w->cols - k) : BLOCK;
            widen(row, w->dtype, k, len, buf);
            for (int t = 0; t < n; t++) {
                const float *xt = x + (int64_t)t * ldx + k;
                float acc = y[(int64_t)t * ldy + o];
                for (int i = 0; i < len; i++) acc += buf[i] * xt[i];
                y[(int64_t)t * ldy + o] = acc;
            }
        }
    }
}

/* The reference every SIMD matmul is tested against: plain loops, each weight widened to float32
 * as it is read. Allocates nothing, so it can serve decode on CPUs without a SIMD path. */
#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"

static float weight_at(const uint8_t *row, qmix_dtype dtype, int64_t i)
{
    uint16_t h;
    float f;
    switch (dtype) {
    case QMIX_F32: memcpy(&f, row + 4 * i, 4); return f;
    case QMIX_BF16: memcpy(&h, row + 2 * i, 2); return qk_bf16_to_f32(h);
    case QMIX_F16: memcpy(&h, row + 2 * i, 2); return qk_f16_to_f32(h);
    default: return NAN;
    }
}

void qk_matmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                      int64_t ldx, float *y, int64_t ldy)
{
    for (int64_t o = row_begin; o < row_end; o++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
        for (int t = 0; t < n; t++) {
            const float *xt = x + (int64_t)t * ldx;
            float acc = 0;
            for (int64_t i = 0; i < w->cols; i++) acc += weight_at(row, w->dtype, i) * xt[i];
            y[(int64_t)t * ldy + o] = acc;
        }
    }
}

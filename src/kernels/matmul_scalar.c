/* The reference every SIMD matmul is tested against: one row at a time, widened to float32. */
#include <stdlib.h>

#include "kernels/kernels_impl.h"

void qk_matmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                      int64_t ldx, float *y, int64_t ldy)
{
    float *row = malloc((size_t)w->cols * sizeof *row);
    if (!row) abort(); /* a reference kernel: tests and tiny models only */
    for (int64_t o = row_begin; o < row_end; o++) {
        qk_mat_row_f32(w, o, row);
        for (int t = 0; t < n; t++) {
            const float *xt = x + (int64_t)t * ldx;
            float acc = 0;
            for (int64_t i = 0; i < w->cols; i++) acc += row[i] * xt[i];
            y[(int64_t)t * ldy + o] = acc;
        }
    }
    free(row);
}

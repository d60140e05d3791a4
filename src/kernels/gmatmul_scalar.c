/* The reference ggml block-format matmul (dtype QMIX_U8): each block of a row is dequantized to
 * float32 on the stack with the scalar reference of quant/ggml_blocks.c and accumulated
 * sequentially into each output, like the dense and MLX references. Allocates nothing. */
#include <math.h>

#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"

int qk_gmat_valid(const qk_mat *w)
{
    int be = qmix_ggml_block_elems(w->ggml_type);
    return qmix_ggml_type_supported(w->ggml_type) && be && be <= 256 && w->cols % be == 0 &&
           w->row_bytes >= qmix_ggml_row_bytes(w->ggml_type, w->cols);
}

void qk_gmatmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                       int64_t ldx, float *y, int64_t ldy)
{
    if (!qk_gmat_valid(w)) {
        for (int64_t o = row_begin; o < row_end; o++)
            for (int t = 0; t < n; t++) y[(int64_t)t * ldy + o] = NAN;
        return;
    }
    const int type = w->ggml_type, be = qmix_ggml_block_elems(type);
    const size_t bb = qmix_ggml_block_bytes(type);
    float buf[256];
    for (int64_t o = row_begin; o < row_end; o++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
        for (int t = 0; t < n; t++) y[(int64_t)t * ldy + o] = 0;
        for (int64_t k0 = 0; k0 < w->cols; k0 += be, row += bb) {
            qmix_ggml_dequant_block(type, row, buf);
            for (int t = 0; t < n; t++) {
                const float *xt = x + (int64_t)t * ldx + k0;
                float acc = y[(int64_t)t * ldy + o];
                for (int i = 0; i < be; i++) acc += buf[i] * xt[i];
                y[(int64_t)t * ldy + o] = acc;
            }
        }
    }
}

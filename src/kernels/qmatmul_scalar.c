/* The reference quantized matmul (dtype QMIX_U32, MLX affine codes): each group of a row is
 * dequantized to float32 on the stack (w = s·q + β, the codes read byte-wise from the LSB-first
 * bit stream of spec/quant-formats.md §1.4) and accumulated sequentially into each output, like
 * the dense reference. Allocates nothing; never widens more than one group at a time. */
#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"

int qk_qmat_valid(const qk_mat *w)
{
    int b = w->bits, g = w->group_size;
    int bits_ok = b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8;
    int group_ok = g == 32 || g == 64 || g == 128;
    int sdt_ok = w->scale_dtype == QMIX_F32 || w->scale_dtype == QMIX_BF16 ||
                 w->scale_dtype == QMIX_F16;
    return bits_ok && group_ok && sdt_ok && w->cols % g == 0;
}

float qk_qmat_scale(const void *p, qmix_dtype dt)
{
    uint16_t h;
    float f;
    switch (dt) {
    case QMIX_F32: memcpy(&f, p, 4); return f;
    case QMIX_BF16: memcpy(&h, p, 2); return qk_bf16_to_f32(h);
    case QMIX_F16: memcpy(&h, p, 2); return qk_f16_to_f32(h);
    default: return NAN;
    }
}

/* Code k of a row's bit stream, read byte-wise (§1.4: a code never spans more than two bytes). */
static inline uint32_t code_at(const uint8_t *row, int64_t k, int bits)
{
    uint64_t o = (uint64_t)k * (uint64_t)bits;
    unsigned sh = (unsigned)(o & 7);
    uint32_t v = row[o >> 3];
    if (sh + (unsigned)bits > 8) v |= (uint32_t)row[(o >> 3) + 1] << 8;
    return (v >> sh) & ((1u << bits) - 1);
}

void qk_qmatmul_scalar(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                       int64_t ldx, float *y, int64_t ldy)
{
    if (!qk_qmat_valid(w)) {
        for (int64_t o = row_begin; o < row_end; o++)
            for (int t = 0; t < n; t++) y[(int64_t)t * ldy + o] = NAN;
        return;
    }
    const int bits = w->bits, gs = w->group_size;
    const size_t sesz = w->scale_dtype == QMIX_F32 ? 4 : 2;
    float buf[128];
    for (int64_t o = row_begin; o < row_end; o++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
        const uint8_t *srow = (const uint8_t *)w->scales + (size_t)o * w->scale_row_bytes;
        const uint8_t *brow = (const uint8_t *)w->biases + (size_t)o * w->scale_row_bytes;
        for (int t = 0; t < n; t++) y[(int64_t)t * ldy + o] = 0;
        for (int64_t g = 0; g * gs < w->cols; g++) {
            float s = qk_qmat_scale(srow + (size_t)g * sesz, w->scale_dtype);
            float b = qk_qmat_scale(brow + (size_t)g * sesz, w->scale_dtype);
            int64_t k0 = g * gs;
            const uint8_t *gp = row + (size_t)k0 * bits / 8; /* groups start on a byte */
            switch (bits) { /* the byte-aligned widths directly, the others bit by bit */
            case 8:
                for (int i = 0; i < gs; i++) buf[i] = s * (float)gp[i] + b;
                break;
            case 4:
                for (int i = 0; i < gs; i += 2) {
                    buf[i] = s * (float)(gp[i / 2] & 15) + b;
                    buf[i + 1] = s * (float)(gp[i / 2] >> 4) + b;
                }
                break;
            case 2:
                for (int i = 0; i < gs; i += 4)
                    for (int j = 0; j < 4; j++)
                        buf[i + j] = s * (float)((gp[i / 4] >> (2 * j)) & 3) + b;
                break;
            default:
                for (int i = 0; i < gs; i++) buf[i] = s * (float)code_at(gp, i, bits) + b;
                break;
            }
            for (int t = 0; t < n; t++) {
                const float *xt = x + (int64_t)t * ldx + k0;
                float acc = y[(int64_t)t * ldy + o];
                for (int i = 0; i < gs; i++) acc += buf[i] * xt[i];
                y[(int64_t)t * ldy + o] = acc;
            }
        }
    }
}

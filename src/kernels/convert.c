#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"

float qk_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t qk_f32_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

float qk_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else {
        float f = ldexpf((float)mant, -24); /* subnormal or zero: exact in float32 */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t qk_f32_to_f16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00;       /* NaN */
    if (abs >= 0x477ff000u) return sign | 0x7c00;      /* overflow (rounds to) inf */
    if (abs < 0x38800000u) {                           /* result is subnormal or zero */
        float a;
        memcpy(&a, &abs, 4);
        return sign | (uint16_t)lrintf(a * 16777216.0f); /* units of 2^-24, ties to even */
    }
    uint32_t mant = abs + 0xfffu + ((abs >> 13) & 1);  /* round the 13 dropped bits to even */
    return sign | (uint16_t)((mant - 0x38000000u) >> 13);
}

/* Row r of an MLX affine U32 matrix (a quantized embedding): w = s·q + β per group, codes read
 * from the LSB-first bit stream of the row (spec/quant-formats.md §1.4). */
static void qrow_f32(const qk_mat *w, int64_t r, float *out)
{
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
    if (!qk_qmat_valid(w)) {
        for (int64_t i = 0; i < w->cols; i++) out[i] = NAN;
        return;
    }
    const uint8_t *srow = (const uint8_t *)w->scales + (size_t)r * w->scale_row_bytes;
    const uint8_t *brow = (const uint8_t *)w->biases + (size_t)r * w->scale_row_bytes;
    size_t sesz = w->scale_dtype == QMIX_F32 ? 4 : 2;
    const int bits = w->bits;
    for (int64_t k = 0; k < w->cols; k++) {
        int64_t g = k / w->group_size;
        float s = qk_qmat_scale(srow + (size_t)g * sesz, w->scale_dtype);
        float b = qk_qmat_scale(brow + (size_t)g * sesz, w->scale_dtype);
        uint64_t o = (uint64_t)k * (uint64_t)bits;
        unsigned sh = (unsigned)(o & 7);
        uint32_t v = row[o >> 3];
        if (sh + (unsigned)bits > 8) v |= (uint32_t)row[(o >> 3) + 1] << 8;
        out[k] = s * (float)((v >> sh) & ((1u << bits) - 1)) + b;
    }
}

void qk_mat_row_f32(const qk_mat *w, int64_t r, float *out)
{
    if (w->dtype == QMIX_U32) {
        qrow_f32(w, r, out);
        return;
    }
    if (w->dtype == QMIX_U8) { /* ggml blocks (a GGUF embedding) */
        if (qk_gmat_valid(w))
            qmix_ggml_dequant_row(w->ggml_type, (const uint8_t *)w->data + (size_t)r * w->row_bytes,
                                  w->cols, out);
        else
            for (int64_t i = 0; i < w->cols; i++) out[i] = NAN;
        return;
    }
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
    for (int64_t i = 0; i < w->cols; i++) {
        uint16_t h;
        switch (w->dtype) {
        case QMIX_F32: memcpy(&out[i], row + 4 * i, 4); break;
        case QMIX_BF16: memcpy(&h, row + 2 * i, 2); out[i] = qk_bf16_to_f32(h); break;
        case QMIX_F16: memcpy(&h, row + 2 * i, 2); out[i] = qk_f16_to_f32(h); break;
        default: out[i] = NAN; break;
        }
    }
}

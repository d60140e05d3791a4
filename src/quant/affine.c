/* MLX affine quantization (spec/quant-formats.md §1): the scale/bias rule of mx.quantize's CPU
 * backend (§1.2) and the LSB-first bit stream of codes (§1.4). */
#include "quant/affine.h"

#include <math.h>
#include <string.h>

#include "kernels/kernels.h"

int qmix_affine_valid(int bits, int group_size)
{
    int bits_ok = bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
    int group_ok = group_size == 32 || group_size == 64 || group_size == 128;
    return bits_ok && group_ok;
}

int64_t qmix_affine_row_words(int64_t cols, int bits) { return cols * bits / 32; }

/* Words are little-endian in the file; on a little-endian host word w holds stream bits
 * 32w … 32w + 31, least significant first, so the stream can be addressed through words. */
uint32_t qmix_affine_get_code(const uint32_t *row, int64_t k, int bits)
{
    uint64_t o = (uint64_t)k * (uint64_t)bits;
    uint64_t word = o >> 5;
    unsigned sh = (unsigned)(o & 31);
    uint32_t mask = (1u << bits) - 1;
    uint32_t v = row[word] >> sh;
    if (sh + (unsigned)bits > 32) v |= row[word + 1] << (32 - sh);
    return v & mask;
}

void qmix_affine_set_code(uint32_t *row, int64_t k, int bits, uint32_t code)
{
    uint64_t o = (uint64_t)k * (uint64_t)bits;
    uint64_t word = o >> 5;
    unsigned sh = (unsigned)(o & 31);
    uint32_t mask = (1u << bits) - 1;
    code &= mask;
    row[word] = (row[word] & ~(mask << sh)) | (code << sh);
    if (sh + (unsigned)bits > 32) {
        unsigned lo = 32 - sh; /* bits that went into the first word */
        row[word + 1] = (row[word + 1] & ~(mask >> lo)) | (code >> lo);
    }
}

void qmix_affine_quantize_row(const float *w, int64_t cols, int bits, int group_size,
                              uint32_t *packed, float *scales, float *biases)
{
    const float n_bins = (float)((1 << bits) - 1);
    const float eps = 1e-7f;
    memset(packed, 0, (size_t)qmix_affine_row_words(cols, bits) * sizeof *packed);
    for (int64_t g = 0; (g + 1) * group_size <= cols; g++) { /* whole groups only */
        const float *wg = w + g * group_size;
        float w_max = -INFINITY, w_min = INFINITY;
        for (int j = 0; j < group_size; j++) { /* std::max / std::min, as MLX writes them */
            w_max = w_max < wg[j] ? wg[j] : w_max;
            w_min = wg[j] < w_min ? wg[j] : w_min;
        }
        int neg_edge = fabsf(w_min) > fabsf(w_max);
        float s = fmaxf((w_max - w_min) / n_bins, eps);
        s = neg_edge ? s : -s;
        float edge = neg_edge ? w_min : w_max;
        float q0 = nearbyintf(edge / s);
        float b = 0;
        if (q0 != 0) {
            s = edge / q0;
            b = edge;
        }
        scales[g] = s;
        biases[g] = b;
        for (int j = 0; j < group_size; j++) {
            float q = nearbyintf((wg[j] - b) / s);
            q = q > 0 ? (q < n_bins ? q : n_bins) : 0; /* clamp both ends; a NaN gives 0 */
            int64_t k = g * group_size + j;
            uint64_t o = (uint64_t)k * (uint64_t)bits;
            uint32_t code = (uint32_t)q;
            packed[o >> 5] |= code << (o & 31);
            if ((o & 31) + (uint64_t)bits > 32) packed[(o >> 5) + 1] |= code >> (32 - (o & 31));
        }
    }
}

static float load_scale(const void *p, int64_t i, qmix_dtype dt)
{
    uint16_t h;
    float f;
    switch (dt) {
    case QMIX_F32: memcpy(&f, (const uint8_t *)p + 4 * i, 4); return f;
    case QMIX_BF16: memcpy(&h, (const uint8_t *)p + 2 * i, 2); return qk_bf16_to_f32(h);
    case QMIX_F16: memcpy(&h, (const uint8_t *)p + 2 * i, 2); return qk_f16_to_f32(h);
    default: return NAN;
    }
}

void qmix_affine_dequantize_row(const uint32_t *packed, const void *scales, const void *biases,
                                qmix_dtype scale_dtype, int64_t cols, int bits, int group_size,
                                float *out)
{
    for (int64_t g = 0; (g + 1) * group_size <= cols; g++) { /* whole groups only */
        float s = load_scale(scales, g, scale_dtype), b = load_scale(biases, g, scale_dtype);
        for (int j = 0; j < group_size; j++) {
            int64_t k = g * group_size + j;
            out[k] = s * (float)qmix_affine_get_code(packed, k, bits) + b;
        }
    }
}

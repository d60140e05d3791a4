/* KV cache rows: the storage formats (written once per token as it enters the cache) and the
 * scalar reference of attention over them.
 *
 * Why these formats: blocks of 32 values of one head with one float16 scale, symmetric, the
 * layout llama.cpp's q8_0 / q4_0 caches use (so its users' numbers carry over). Keys after
 * RMSNorm and RoPE and values are centred on zero per block, so a zero point (q4_1's min) buys
 * little and costs 0.5 bit per value more; the 4-bit scale maps the block's largest-magnitude
 * value to −8, which uses all 16 levels. Quantizing per head row means a token's rows never
 * change after they are written, so the prefix cache and batching see the same bytes. */
#include <math.h>
#include <string.h>

#include "kernels/attend_tiles.h"

const char *qmix_kv_type_name(qmix_kv_type kv)
{
    switch (kv) {
    case QMIX_KV_DEFAULT:
    case QMIX_KV_F32: return "f32";
    case QMIX_KV_F16: return "f16";
    case QMIX_KV_Q8_0: return "q8_0";
    case QMIX_KV_Q4_0: return "q4_0";
    default: return "?";
    }
}

qmix_kv_type qmix_kv_type_parse(const char *name)
{
    static const struct { const char *name, *bits; qmix_kv_type kv; } names[] = {
        {"f32", "32", QMIX_KV_F32}, {"f16", "16", QMIX_KV_F16},
        {"q8_0", "8", QMIX_KV_Q8_0}, {"q4_0", "4", QMIX_KV_Q4_0},
    };
    for (size_t i = 0; name && i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(name, names[i].name) || !strcmp(name, names[i].bits)) return names[i].kv;
    return QMIX_KV_DEFAULT;
}

double qmix_kv_type_bits(qmix_kv_type kv)
{
    return 8.0 * (double)qk_kv_bytes(kv, QK_KV_BLOCK) / QK_KV_BLOCK;
}

int qk_kv_valid(qmix_kv_type kv, int64_t n)
{
    if (n <= 0) return 0;
    if (kv == QMIX_KV_Q8_0 || kv == QMIX_KV_Q4_0) return n % QK_KV_BLOCK == 0;
    return kv == QMIX_KV_DEFAULT || kv == QMIX_KV_F32 || kv == QMIX_KV_F16;
}

size_t qk_kv_bytes(qmix_kv_type kv, int64_t n)
{
    size_t blocks = (size_t)(n + QK_KV_BLOCK - 1) / QK_KV_BLOCK;
    switch (kv) {
    case QMIX_KV_F16: return 2 * (size_t)n;
    case QMIX_KV_Q8_0: return blocks * KV_Q8_BLOCK_BYTES;
    case QMIX_KV_Q4_0: return blocks * KV_Q4_BLOCK_BYTES;
    default: return 4 * (size_t)n;
    }
}

/* The scale as stored (rounded to float16) is the one the codes are computed with, so the
 * rounding of the scale does not add to the codes' error. */
static float store_scale(uint8_t *block, float d)
{
    uint16_t h = qk_f32_to_f16(d);
    memcpy(block, &h, 2);
    return qk_f16_to_f32(h);
}

static void quantize_q8(const float *x, uint8_t *b)
{
    float amax = 0;
    for (int i = 0; i < QK_KV_BLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
    float d = store_scale(b, amax / 127.0f), id = d > 0 ? 1.0f / d : 0;
    for (int i = 0; i < QK_KV_BLOCK; i++) {
        float c = roundf(x[i] * id);
        b[2 + i] = (uint8_t)(int8_t)(c > 127 ? 127 : c < -127 ? -127 : c);
    }
}

static void quantize_q4(const float *x, uint8_t *b)
{
    float amax = 0, max = 0;
    for (int i = 0; i < QK_KV_BLOCK; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
    float d = store_scale(b, max / -8.0f), id = d != 0 ? 1.0f / d : 0;
    uint8_t c[QK_KV_BLOCK];
    for (int i = 0; i < QK_KV_BLOCK; i++) {
        float v = roundf(x[i] * id) + 8;
        c[i] = (uint8_t)(v > 15 ? 15 : v < 0 ? 0 : v);
    }
    for (int i = 0; i < QK_KV_BLOCK / 2; i++) b[2 + i] = (uint8_t)(c[i] | c[i + QK_KV_BLOCK / 2] << 4);
}

void qk_kv_quantize(qmix_kv_type kv, const float *x, int64_t n, void *dst)
{
    uint8_t *out = dst;
    switch (kv) {
    case QMIX_KV_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = qk_f32_to_f16(x[i]);
            memcpy(out + 2 * i, &h, 2);
        }
        break;
    case QMIX_KV_Q8_0:
        for (int64_t i = 0; i < n; i += QK_KV_BLOCK, out += KV_Q8_BLOCK_BYTES) quantize_q8(x + i, out);
        break;
    case QMIX_KV_Q4_0:
        for (int64_t i = 0; i < n; i += QK_KV_BLOCK, out += KV_Q4_BLOCK_BYTES) quantize_q4(x + i, out);
        break;
    default: memcpy(out, x, (size_t)n * sizeof *x); break;
    }
}

void qk_kv_dequantize(qmix_kv_type kv, const void *src, int64_t n, float *out)
{
    const uint8_t *b = src;
    switch (kv) {
    case QMIX_KV_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, b + 2 * i, 2);
            out[i] = qk_f16_to_f32(h);
        }
        break;
    case QMIX_KV_Q8_0:
        for (int64_t i = 0; i < n; i += QK_KV_BLOCK, b += KV_Q8_BLOCK_BYTES) {
            float d = kv_block_scale(b);
            for (int j = 0; j < QK_KV_BLOCK; j++) out[i + j] = d * (float)(int8_t)b[2 + j];
        }
        break;
    case QMIX_KV_Q4_0:
        for (int64_t i = 0; i < n; i += QK_KV_BLOCK, b += KV_Q4_BLOCK_BYTES) {
            float d = kv_block_scale(b);
            for (int j = 0; j < QK_KV_BLOCK / 2; j++) {
                out[i + j] = d * (float)((b[2 + j] & 15) - 8);
                out[i + j + QK_KV_BLOCK / 2] = d * (float)((b[2 + j] >> 4) - 8);
            }
        }
        break;
    default: memcpy(out, b, (size_t)n * sizeof *out); break;
    }
}

/* ---- scalar reference -------------------------------------------------------------------- */

static inline __attribute__((always_inline)) void deq_scalar(qmix_kv_type kv, const uint8_t *row,
                                                             float *out, int64_t dim)
{
    qk_kv_dequantize(kv, row, dim, out);
}

static inline __attribute__((always_inline)) float dot_scalar(const float *q, const float *row,
                                                              int64_t dim)
{
    float sum = 0;
    for (int64_t i = 0; i < dim; i++) sum += q[i] * row[i];
    return sum;
}

static inline __attribute__((always_inline)) void acc_scalar(const float *p, int cnt,
                                                             const float *rows, size_t ld,
                                                             float *out, int64_t dim)
{
    for (int j = 0; j < cnt; j++)
        for (int64_t i = 0; i < dim; i++) out[i] += p[j] * rows[(size_t)j * ld + (size_t)i];
}

void qk_attend_kv_scalar(QK_ATTEND_KV_ARGS)
{
    attend_dispatch(kv, nq, q, out, n, keys, values, ld, dim, scale, scratch, deq_scalar,
                    dot_scalar, acc_scalar);
}

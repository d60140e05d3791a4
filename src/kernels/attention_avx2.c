/* Attention over the KV cache, AVX2 + FMA + F16C: as the AVX-512 kernel, 8 lanes (a 32-value
 * block is four registers). */
#include <immintrin.h>

#include "kernels/attend_tiles.h"

/* Codes k*8 .. k*8+7 of a block as floats. */
static inline __attribute__((always_inline)) __m256 code8_q8(const uint8_t *b, int k)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * k))));
}

static inline __attribute__((always_inline)) __m256 code8_q4(const uint8_t *b, int k)
{
    /* k 0, 1: low nibbles of bytes 0..7, 8..15; k 2, 3: their high nibbles */
    __m128i bytes = _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * (k & 1)));
    if (k >= 2) bytes = _mm_srli_epi16(bytes, 4);
    bytes = _mm_and_si128(bytes, _mm_set1_epi8(15));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(8)));
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) float dot_avx2(qmix_kv_type kv, const float *q,
                                                            const uint8_t *row, int64_t dim)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    float tail = 0;
    if (kv == QMIX_KV_Q8_0 || kv == QMIX_KV_Q4_0) {
        size_t bb = kv == QMIX_KV_Q8_0 ? KV_Q8_BLOCK_BYTES : KV_Q4_BLOCK_BYTES;
        for (; i < dim; i += QK_KV_BLOCK, row += bb) {
            __m256 s = _mm256_setzero_ps();
            for (int k = 0; k < 4; k++)
                s = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8 * k),
                                    kv == QMIX_KV_Q8_0 ? code8_q8(row, k) : code8_q4(row, k), s);
            acc = _mm256_fmadd_ps(s, _mm256_set1_ps(kv_block_scale(row)), acc);
        }
    } else if (kv == QMIX_KV_F16) {
        for (; i + 8 <= dim; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i),
                                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))), acc);
        for (; i < dim; i++) {
            uint16_t h;
            memcpy(&h, row + 2 * i, 2);
            tail += q[i] * qk_f16_to_f32(h);
        }
    } else {
        for (; i + 8 <= dim; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps((const float *)row + i), acc);
        for (; i < dim; i++) {
            float f;
            memcpy(&f, row + 4 * i, 4);
            tail += q[i] * f;
        }
    }
    return hsum(acc) + tail;
}

static inline __attribute__((always_inline)) void axpy_avx2(qmix_kv_type kv, float a,
                                                            const uint8_t *row, float *acc,
                                                            int64_t dim)
{
    int64_t i = 0;
    if (kv == QMIX_KV_Q8_0 || kv == QMIX_KV_Q4_0) {
        size_t bb = kv == QMIX_KV_Q8_0 ? KV_Q8_BLOCK_BYTES : KV_Q4_BLOCK_BYTES;
        for (; i < dim; i += QK_KV_BLOCK, row += bb) {
            __m256 ad = _mm256_set1_ps(a * kv_block_scale(row));
            for (int k = 0; k < 4; k++) {
                __m256 c = kv == QMIX_KV_Q8_0 ? code8_q8(row, k) : code8_q4(row, k);
                float *o = acc + i + 8 * k;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(ad, c, _mm256_loadu_ps(o)));
            }
        }
        return;
    }
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= dim; i += 8) {
        __m256 v = kv == QMIX_KV_F16
                       ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)))
                       : _mm256_loadu_ps((const float *)row + i);
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(acc + i)));
    }
    for (; i < dim; i++) {
        float f;
        if (kv == QMIX_KV_F16) {
            uint16_t h;
            memcpy(&h, row + 2 * i, 2);
            f = qk_f16_to_f32(h);
        } else {
            memcpy(&f, row + 4 * i, 4);
        }
        acc[i] += a * f;
    }
}

void qk_attend_kv_avx2(qmix_kv_type kv, const float *q, const void *keys, const void *values,
                       size_t ld, int64_t n, int64_t dim, float scale, float *scratch, float *out)
{
    attend_dispatch(kv, q, keys, values, ld, n, dim, scale, scratch, out, dot_avx2, axpy_avx2);
}

/* Attention over the KV cache, AVX-512: quantized rows widened to float32 in registers block by
 * block (32 values: two registers), never into memory. */
#include <immintrin.h>

#include "kernels/attend_tiles.h"

/* 32 codes of a block as two float vectors (values 0..15 and 16..31). */
static inline __attribute__((always_inline)) void codes_q8(const uint8_t *b, __m512 *c0, __m512 *c1)
{
    *c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))));
    *c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18))));
}

static inline __attribute__((always_inline)) void codes_q4(const uint8_t *b, __m512 *c0, __m512 *c1)
{
    __m128i bytes = _mm_loadu_si128((const __m128i *)(b + 2)), low = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    __m512i eight = _mm512_set1_epi32(8);
    *c0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight));
    *c1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight));
}

static inline __attribute__((always_inline)) float dot_avx512(qmix_kv_type kv, const float *q,
                                                              const uint8_t *row, int64_t dim)
{
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    float tail = 0;
    if (kv == QMIX_KV_Q8_0 || kv == QMIX_KV_Q4_0) {
        size_t bb = kv == QMIX_KV_Q8_0 ? KV_Q8_BLOCK_BYTES : KV_Q4_BLOCK_BYTES;
        for (; i < dim; i += QK_KV_BLOCK, row += bb) {
            __m512 c0, c1;
            if (kv == QMIX_KV_Q8_0) codes_q8(row, &c0, &c1);
            else codes_q4(row, &c0, &c1);
            __m512 s = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), c0,
                                       _mm512_mul_ps(_mm512_loadu_ps(q + i + 16), c1));
            acc = _mm512_fmadd_ps(s, _mm512_set1_ps(kv_block_scale(row)), acc);
        }
    } else if (kv == QMIX_KV_F16) {
        for (; i + 16 <= dim; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i),
                                  _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i))),
                                  acc);
        for (; i < dim; i++) {
            uint16_t h;
            memcpy(&h, row + 2 * i, 2);
            tail += q[i] * qk_f16_to_f32(h);
        }
    } else {
        for (; i + 16 <= dim; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps((const float *)row + i), acc);
        for (; i < dim; i++) {
            float f;
            memcpy(&f, row + 4 * i, 4);
            tail += q[i] * f;
        }
    }
    return _mm512_reduce_add_ps(acc) + tail;
}

static inline __attribute__((always_inline)) void axpy_avx512(qmix_kv_type kv, float a,
                                                              const uint8_t *row, float *acc,
                                                              int64_t dim)
{
    int64_t i = 0;
    if (kv == QMIX_KV_Q8_0 || kv == QMIX_KV_Q4_0) {
        size_t bb = kv == QMIX_KV_Q8_0 ? KV_Q8_BLOCK_BYTES : KV_Q4_BLOCK_BYTES;
        for (; i < dim; i += QK_KV_BLOCK, row += bb) {
            __m512 c0, c1;
            if (kv == QMIX_KV_Q8_0) codes_q8(row, &c0, &c1);
            else codes_q4(row, &c0, &c1);
            __m512 ad = _mm512_set1_ps(a * kv_block_scale(row));
            _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(ad, c0, _mm512_loadu_ps(acc + i)));
            _mm512_storeu_ps(acc + i + 16, _mm512_fmadd_ps(ad, c1, _mm512_loadu_ps(acc + i + 16)));
        }
        return;
    }
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= dim; i += 16) {
        __m512 v = kv == QMIX_KV_F16
                       ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i)))
                       : _mm512_loadu_ps((const float *)row + i);
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(va, v, _mm512_loadu_ps(acc + i)));
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

void qk_attend_kv_avx512(qmix_kv_type kv, const float *q, const void *keys, const void *values,
                         size_t ld, int64_t n, int64_t dim, float scale, float *scratch, float *out)
{
    attend_dispatch(kv, q, keys, values, ld, n, dim, scale, scratch, out, dot_avx512, axpy_avx512);
}

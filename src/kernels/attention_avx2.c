/* Attention over the KV cache, AVX2 + FMA + F16C: as the AVX-512 kernel, 8 lanes. */
#include <immintrin.h>

#include "kernels/attend_tiles.h"

/* A block's float16 scale with F16C, inline (the scalar conversion is a call into another file). */
static inline float block_scale(const uint8_t *block)
{
    uint16_t h;
    memcpy(&h, block, 2);
    return _cvtsh_ss(h);
}

static inline __attribute__((always_inline)) void deq_avx2(qmix_kv_type kv, const uint8_t *row,
                                                           float *out, int64_t dim)
{
    if (kv == QMIX_KV_F16) {
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))));
        for (; i < dim; i++) {
            uint16_t h;
            memcpy(&h, row + 2 * i, 2);
            out[i] = qk_f16_to_f32(h);
        }
        return;
    }
    size_t bb = kv == QMIX_KV_Q8_0 ? KV_Q8_BLOCK_BYTES : KV_Q4_BLOCK_BYTES;
    for (int64_t i = 0; i < dim; i += QK_KV_BLOCK, row += bb) {
        __m256 d = _mm256_set1_ps(block_scale(row));
        for (int k = 0; k < 4; k++) { /* values 8k .. 8k+7 of the block */
            __m256i c;
            if (kv == QMIX_KV_Q8_0) {
                c = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + 2 + 8 * k)));
            } else { /* k 0, 1: low nibbles of bytes 0..7, 8..15; k 2, 3: their high nibbles */
                __m128i bytes = _mm_loadl_epi64((const __m128i *)(row + 2 + 8 * (k & 1)));
                if (k >= 2) bytes = _mm_srli_epi16(bytes, 4);
                bytes = _mm_and_si128(bytes, _mm_set1_epi8(15));
                c = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(8));
            }
            _mm256_storeu_ps(out + i + 8 * k, _mm256_mul_ps(d, _mm256_cvtepi32_ps(c)));
        }
    }
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) float dot_avx2(const float *q, const float *row,
                                                            int64_t dim)
{
    /* four chains: one accumulator would wait on each FMA's latency */
    __m256 acc = _mm256_setzero_ps(), a1 = acc, a2 = acc, a3 = acc;
    int64_t i = 0;
    for (; i + 32 <= dim; i += 32) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(row + i), acc);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(row + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), _mm256_loadu_ps(row + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), _mm256_loadu_ps(row + i + 24), a3);
    }
    acc = _mm256_add_ps(_mm256_add_ps(acc, a1), _mm256_add_ps(a2, a3));
    for (; i + 8 <= dim; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(row + i), acc);
    float tail = 0;
    for (; i < dim; i++) tail += q[i] * row[i];
    return hsum(acc) + tail;
}

/* Registers hold 32 outputs while the tile's rows stream past. */
static inline __attribute__((always_inline)) void acc_avx2(const float *p, int cnt,
                                                           const float *rows, size_t ld,
                                                           float *out, int64_t dim)
{
    int64_t d = 0;
    for (; d + 32 <= dim; d += 32) {
        __m256 a0 = _mm256_loadu_ps(out + d), a1 = _mm256_loadu_ps(out + d + 8),
               a2 = _mm256_loadu_ps(out + d + 16), a3 = _mm256_loadu_ps(out + d + 24);
        for (int j = 0; j < cnt; j++) {
            const float *r = rows + (size_t)j * ld + d;
            __m256 pj = _mm256_set1_ps(p[j]);
            a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r), a0);
            a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 8), a1);
            a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 16), a2);
            a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 24), a3);
        }
        _mm256_storeu_ps(out + d, a0);
        _mm256_storeu_ps(out + d + 8, a1);
        _mm256_storeu_ps(out + d + 16, a2);
        _mm256_storeu_ps(out + d + 24, a3);
    }
    for (; d + 8 <= dim; d += 8) {
        __m256 a0 = _mm256_loadu_ps(out + d);
        for (int j = 0; j < cnt; j++)
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(rows + (size_t)j * ld + d), a0);
        _mm256_storeu_ps(out + d, a0);
    }
    for (; d < dim; d++) {
        float a0 = out[d];
        for (int j = 0; j < cnt; j++) a0 = fmaf(p[j], rows[(size_t)j * ld + (size_t)d], a0);
        out[d] = a0;
    }
}

void qk_attend_kv_avx2(QK_ATTEND_KV_ARGS)
{
    attend_dispatch(kv, nq, q, out, n, keys, values, ld, dim, scale, scratch, deq_avx2, dot_avx2,
                    acc_avx2);
}

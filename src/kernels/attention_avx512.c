/* Attention over the KV cache, AVX-512: each cache row widened to float32 once (16 lanes, a
 * 32-value block in two registers), then dotted with / accumulated into every query. */
#include <immintrin.h>

#include "kernels/attend_tiles.h"

/* A block's float16 scale with F16C, inline (the scalar conversion is a call into another file). */
static inline float block_scale(const uint8_t *block)
{
    uint16_t h;
    memcpy(&h, block, 2);
    return _cvtsh_ss(h);
}

static inline __attribute__((always_inline)) void deq_avx512(qmix_kv_type kv, const uint8_t *row,
                                                             float *out, int64_t dim)
{
    if (kv == QMIX_KV_F16) {
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i))));
        for (; i < dim; i++) {
            uint16_t h;
            memcpy(&h, row + 2 * i, 2);
            out[i] = qk_f16_to_f32(h);
        }
        return;
    }
    size_t bb = kv == QMIX_KV_Q8_0 ? KV_Q8_BLOCK_BYTES : KV_Q4_BLOCK_BYTES;
    for (int64_t i = 0; i < dim; i += QK_KV_BLOCK, row += bb) {
        __m512i c0, c1;
        if (kv == QMIX_KV_Q8_0) {
            c0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 2)));
            c1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 18)));
        } else { /* low nibbles are values 0..15 of the block, high nibbles 16..31 */
            __m128i bytes = _mm_loadu_si128((const __m128i *)(row + 2)), low = _mm_set1_epi8(15);
            __m512i eight = _mm512_set1_epi32(8);
            c0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low)), eight);
            c1 = _mm512_sub_epi32(
                _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low)), eight);
        }
        __m512 d = _mm512_set1_ps(block_scale(row));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(d, _mm512_cvtepi32_ps(c0)));
        _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(c1)));
    }
}

static inline __attribute__((always_inline)) float dot_avx512(const float *q, const float *row,
                                                              int64_t dim)
{
    /* four chains: one accumulator would wait on each FMA's latency */
    __m512 acc = _mm512_setzero_ps(), a1 = acc, a2 = acc, a3 = acc;
    int64_t i = 0;
    for (; i + 64 <= dim; i += 64) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(row + i), acc);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), _mm512_loadu_ps(row + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 32), _mm512_loadu_ps(row + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 48), _mm512_loadu_ps(row + i + 48), a3);
    }
    acc = _mm512_add_ps(_mm512_add_ps(acc, a1), _mm512_add_ps(a2, a3));
    for (; i + 16 <= dim; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(row + i), acc);
    if (i < dim) {
        __mmask16 m = (__mmask16)((1u << (dim - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), _mm512_maskz_loadu_ps(m, row + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Registers hold 64 outputs while the tile's rows stream past: one load and one store of the
 * output per tile instead of per row. */
static inline __attribute__((always_inline)) void acc_avx512(const float *p, int cnt,
                                                             const float *rows, size_t ld,
                                                             float *out, int64_t dim)
{
    int64_t d = 0;
    for (; d + 64 <= dim; d += 64) {
        __m512 a0 = _mm512_loadu_ps(out + d), a1 = _mm512_loadu_ps(out + d + 16),
               a2 = _mm512_loadu_ps(out + d + 32), a3 = _mm512_loadu_ps(out + d + 48);
        for (int j = 0; j < cnt; j++) {
            const float *r = rows + (size_t)j * ld + d;
            __m512 pj = _mm512_set1_ps(p[j]);
            a0 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(r), a0);
            a1 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(r + 16), a1);
            a2 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(r + 32), a2);
            a3 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(r + 48), a3);
        }
        _mm512_storeu_ps(out + d, a0);
        _mm512_storeu_ps(out + d + 16, a1);
        _mm512_storeu_ps(out + d + 32, a2);
        _mm512_storeu_ps(out + d + 48, a3);
    }
    for (; d < dim; d += 16) {
        __mmask16 m = dim - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dim - d)) - 1);
        __m512 a0 = _mm512_maskz_loadu_ps(m, out + d);
        for (int j = 0; j < cnt; j++)
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j]),
                                 _mm512_maskz_loadu_ps(m, rows + (size_t)j * ld + d), a0);
        _mm512_mask_storeu_ps(out + d, m, a0);
    }
}

void qk_attend_kv_avx512(QK_ATTEND_KV_ARGS)
{
    attend_dispatch(kv, nq, q, out, n, keys, values, ld, dim, scale, scratch, deq_avx512,
                    dot_avx512, acc_avx512);
}

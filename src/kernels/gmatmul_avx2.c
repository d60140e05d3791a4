/* AVX2 ggml block-format matmul: like the AVX-512 one (gmatmul_avx512.c) with 8 lanes; Q8_0, Q4_K
 * and Q6_K blocks are dequantized with SIMD, the other types with the scalar reference, the dot
 * is vectorised. Per-row summation order, so splits are bitwise invariant. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"

static void dq_q8_0(const uint8_t *b, float *y)
{
    uint16_t h;
    memcpy(&h, b, 2);
    __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
    for (int i = 0; i < 32; i += 8) {
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + i)));
        _mm256_store_ps(y + i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)));
    }
}

static inline float f16_at(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline __m256i bytes8(const uint8_t *p) /* 8 unsigned bytes -> 8 int32 */
{
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

static void dq_q4_k(const uint8_t *b, float *y)
{
    float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t *sc = b + 4, *qs = b + 16;
    const __m256i m15 = _mm256_set1_epi32(15);
    for (int s = 0; s < 8; s++) {
        int scale, min;
        if (s < 4) {
            scale = sc[s] & 63;
            min = sc[s + 4] & 63;
        } else {
            scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
            min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
        }
        __m256 ds = _mm256_set1_ps(d * (float)scale), dm = _mm256_set1_ps(dmin * (float)min);
        const uint8_t *q = qs + 32 * (s / 2);
        for (int l = 0; l < 32; l += 8) {
            __m256i v = bytes8(q + l);
            v = s % 2 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, m15);
            _mm256_store_ps(y + 32 * s + l, _mm256_fmsub_ps(ds, _mm256_cvtepi32_ps(v), dm));
        }
    }
}

static void dq_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16_at(b + 208);
    const __m256i m15 = _mm256_set1_epi32(15), m3 = _mm256_set1_epi32(3),
                  k32 = _mm256_set1_epi32(32);
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 4; t++)
            for (int l = 0; l < 32; l += 8) {
                __m256i lo = bytes8(ql + 64 * h + 32 * (t & 1) + l);
                lo = t < 2 ? _mm256_and_si256(lo, m15) : _mm256_srli_epi32(lo, 4);
                __m256i hi = _mm256_and_si256(
                    _mm256_srli_epi32(bytes8(qh + 32 * h + l), 2 * t), m3);
                __m256i q = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), k32);
                int j = 128 * h + 32 * t + l;
                _mm256_store_ps(y + j, _mm256_mul_ps(_mm256_set1_ps(d * (float)sc[j / 16]),
                                                     _mm256_cvtepi32_ps(q)));
            }
}

/* Vectorised for the common llama.cpp types, the scalar reference for the rest. */
static void dequant(int type, const uint8_t *b, float *y)
{
    switch (type) {
    case QMIX_GGML_Q8_0: dq_q8_0(b, y); break;
    case QMIX_GGML_Q4_K: dq_q4_k(b, y); break;
    case QMIX_GGML_Q6_K: dq_q6_k(b, y); break;
    default: qmix_ggml_dequant_block(type, b, y); break;
    }
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void qk_gmatmul_avx2(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x, int n,
                     int64_t ldx, float *y, int64_t ldy)
{
    if (!qk_gmat_valid(w) || qmix_ggml_block_elems(w->ggml_type) % 8) {
        qk_gmatmul_scalar(w, row_begin, row_end, x, n, ldx, y, ldy);
        return;
    }
    const int type = w->ggml_type, be = qmix_ggml_block_elems(type);
    const size_t bb = qmix_ggml_block_bytes(type);
    float buf[256] __attribute__((aligned(32)));
    __m256 acc[QK_TOKEN_CHUNK];
    int64_t o0 = row_begin;
    if (n == 1) { /* decode: four rows, four accumulator chains, same per-row arithmetic */
        float bufs[4][256] __attribute__((aligned(32)));
        for (; o0 + 4 <= row_end; o0 += 4) {
            const uint8_t *row[4];
            __m256 a[4];
            for (int r = 0; r < 4; r++) {
                row[r] = (const uint8_t *)w->data + (size_t)(o0 + r) * w->row_bytes;
                a[r] = _mm256_setzero_ps();
            }
            for (int64_t k0 = 0; k0 < w->cols; k0 += be) {
                for (int r = 0; r < 4; r++) {
                    dequant(type, row[r], bufs[r]);
                    row[r] += bb;
                }
                for (int i = 0; i < be; i += 8) {
                    __m256 xv = _mm256_loadu_ps(x + k0 + i);
                    for (int r = 0; r < 4; r++)
                        a[r] = _mm256_fmadd_ps(_mm256_load_ps(bufs[r] + i), xv, a[r]);
                }
            }
            for (int r = 0; r < 4; r++) y[o0 + r] = hsum(a[r]);
        }
    }
    row_begin = o0;
    for (int t0 = 0; t0 < n; t0 += QK_TOKEN_CHUNK) {
        int tn = n - t0 < QK_TOKEN_CHUNK ? n - t0 : QK_TOKEN_CHUNK;
        const float *xc = x + (int64_t)t0 * ldx;
        float *yc = y + (int64_t)t0 * ldy;
        for (int64_t o = row_begin; o < row_end; o++) {
            const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
            for (int t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t k0 = 0; k0 < w->cols; k0 += be, row += bb) {
                dequant(type, row, buf);
                for (int t = 0; t < tn; t++) {
                    const float *xt = xc + (int64_t)t * ldx + k0;
                    __m256 a = acc[t];
                    for (int i = 0; i < be; i += 8)
                        a = _mm256_fmadd_ps(_mm256_load_ps(buf + i), _mm256_loadu_ps(xt + i), a);
                    acc[t] = a;
                }
            }
            for (int t = 0; t < tn; t++) yc[(int64_t)t * ldy + o] = hsum(acc[t]);
        }
    }
}

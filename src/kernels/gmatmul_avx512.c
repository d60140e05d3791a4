/* AVX-512 ggml block-format matmul: per row, each block is dequantized into a 64-byte aligned
 * stack buffer (vectorised for Q8_0, Q4_K and Q6_K, the types of llama.cpp's common Q4_K_M /
 * Q8_0 files; the scalar reference for the rest) and multiplied into one vector accumulator per
 * token, reduced at the end of the row. The order of every output's sum depends only on the row,
 * never on n or the row range, so thread and batch splits give bitwise equal results. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"

static inline float f16_at(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static void dq_q8_0(const uint8_t *b, float *y)
{
    __m512 d = _mm512_set1_ps(f16_at(b));
    for (int i = 0; i < 32; i += 16) {
        __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2 + i)));
        _mm512_store_ps(y + i, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)));
    }
}

static void dq_q4_k(const uint8_t *b, float *y)
{
    float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t *sc = b + 4, *qs = b + 16;
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int s = 0; s < 8; s++) {
        int scale, min;
        if (s < 4) {
            scale = sc[s] & 63;
            min = sc[s + 4] & 63;
        } else {
            scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
            min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
        }
        __m512 ds = _mm512_set1_ps(d * (float)scale), dm = _mm512_set1_ps(dmin * (float)min);
        const uint8_t *q = qs + 32 * (s / 2);
        for (int l = 0; l < 32; l += 16) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + l)));
            v = s % 2 ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, m15);
            _mm512_store_ps(y + 32 * s + l, _mm512_fmsub_ps(ds, _mm512_cvtepi32_ps(v), dm));
        }
    }
}

static void dq_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16_at(b + 208);
    const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3),
                  k32 = _mm512_set1_epi32(32);
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 4; t++)
            for (int l = 0; l < 32; l += 16) {
                __m512i lo = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(ql + 64 * h + 32 * (t & 1) + l)));
                lo = t < 2 ? _mm512_and_si512(lo, m15) : _mm512_srli_epi32(lo, 4);
                __m512i hi = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(qh + 32 * h + l)));
                hi = _mm512_and_si512(_mm512_srlv_epi32(hi, _mm512_set1_epi32(2 * t)), m3);
                __m512i q = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), k32);
                int j = 128 * h + 32 * t + l;
                __m512 scale = _mm512_set1_ps(d * (float)sc[j / 16]);
                _mm512_store_ps(y + j, _mm512_mul_ps(scale, _mm512_cvtepi32_ps(q)));
            }
}

static void dequant(int type, const uint8_t *b, float *y)
{
    switch (type) {
    case QMIX_GGML_Q8_0: dq_q8_0(b, y); break;
    case QMIX_GGML_Q4_K: dq_q4_k(b, y); break;
    case QMIX_GGML_Q6_K: dq_q6_k(b, y); break;
    default: qmix_ggml_dequant_block(type, b, y); break;
    }
}

void qk_gmatmul_avx512(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                       int n, int64_t ldx, float *y, int64_t ldy)
{
    if (!qk_gmat_valid(w) || qmix_ggml_block_elems(w->ggml_type) % 16) {
        qk_gmatmul_scalar(w, row_begin, row_end, x, n, ldx, y, ldy);
        return;
    }
    const int type = w->ggml_type, be = qmix_ggml_block_elems(type);
    const size_t bb = qmix_ggml_block_bytes(type);
    float buf[256] __attribute__((aligned(64)));
    __m512 acc[QK_TOKEN_CHUNK];
    int64_t o0 = row_begin;
    if (n == 1) { /* decode: four rows at once, four independent accumulator chains; the same
                   * arithmetic per row as below, so results are bitwise equal */
        float bufs[4][256] __attribute__((aligned(64)));
        for (; o0 + 4 <= row_end; o0 += 4) {
            const uint8_t *row[4];
            __m512 a[4];
            for (int r = 0; r < 4; r++) {
                row[r] = (const uint8_t *)w->data + (size_t)(o0 + r) * w->row_bytes;
                a[r] = _mm512_setzero_ps();
            }
            for (int64_t k0 = 0; k0 < w->cols; k0 += be) {
                for (int r = 0; r < 4; r++) {
                    _mm_prefetch((const char *)(row[r] + 8 * bb), _MM_HINT_T0);
                    dequant(type, row[r], bufs[r]);
                    row[r] += bb;
                }
                for (int i = 0; i < be; i += 16) {
                    __m512 xv = _mm512_loadu_ps(x + k0 + i);
                    for (int r = 0; r < 4; r++)
                        a[r] = _mm512_fmadd_ps(_mm512_load_ps(bufs[r] + i), xv, a[r]);
                }
            }
            for (int r = 0; r < 4; r++) y[o0 + r] = _mm512_reduce_add_ps(a[r]);
        }
    }
    row_begin = o0;
    for (int t0 = 0; t0 < n; t0 += QK_TOKEN_CHUNK) {
        int tn = n - t0 < QK_TOKEN_CHUNK ? n - t0 : QK_TOKEN_CHUNK;
        const float *xc = x + (int64_t)t0 * ldx;
        float *yc = y + (int64_t)t0 * ldy;
        for (int64_t o = row_begin; o < row_end; o++) {
            const uint8_t *row = (const uint8_t *)w->data + (size_t)o * w->row_bytes;
            for (int t = 0; t < tn; t++) acc[t] = _mm512_setzero_ps();
            for (int64_t k0 = 0; k0 < w->cols; k0 += be, row += bb) {
                /* the next row's first blocks: rows of a decode stream once from DRAM */
                if (k0 == 0 && o + 1 < row_end)
                    _mm_prefetch((const char *)(row + w->row_bytes), _MM_HINT_T0);
                _mm_prefetch((const char *)(row + 4 * bb), _MM_HINT_T0);
                dequant(type, row, buf);
                for (int t = 0; t < tn; t++) {
                    const float *xt = xc + (int64_t)t * ldx + k0;
                    __m512 a = acc[t];
                    for (int i = 0; i < be; i += 16)
                        a = _mm512_fmadd_ps(_mm512_load_ps(buf + i), _mm512_loadu_ps(xt + i), a);
                    acc[t] = a;
                }
            }
            for (int t = 0; t < tn; t++) yc[(int64_t)t * ldy + o] = _mm512_reduce_add_ps(acc[t]);
        }
    }
}

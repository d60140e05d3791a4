/* AVX2 ggml block-format matmul: like the AVX-512 one (gmatmul_avx512.c) with 8 lanes; blocks are
 * dequantized with the scalar reference except Q8_0 (widened in registers), the dot is
 * vectorised. Per-row summation order, so splits are bitwise invariant. */
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
                    if (type == QMIX_GGML_Q8_0) dq_q8_0(row[r], bufs[r]);
                    else qmix_ggml_dequant_block(type, row[r], bufs[r]);
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
                if (type == QMIX_GGML_Q8_0) dq_q8_0(row, buf);
                else qmix_ggml_dequant_block(type, row, buf);
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

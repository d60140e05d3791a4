/* AVX-512 ggml block-format matmul: per row, each block is dequantized into a 64-byte aligned
 * stack buffer (vectorised for Q8_0, Q4_K and Q6_K, the types of llama.cpp's common Q4_K_M /
 * Q8_0 files; the scalar reference for the rest) and multiplied into one vector accumulator per
 * token, reduced at the end of the row. Decode (n = 1) runs four rows at once with the weights
 * fed from registers for Q8_0/Q4_K/Q6_K: the same vectors, products and order per row, so every
 * output's sum depends only on its row, never on n or the row range, and thread and batch splits
 * give bitwise equal results. */
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

/* Each block format's vectorised dequantization is written once, as a body that hands every
 * 16-lane vector of weights (element offset j, in ascending j) to EMIT: storing it (dequantize
 * into a buffer, for many tokens) or multiplying it into an accumulator (decode, no buffer). Both
 * see the same vectors in the same order, so the two paths give bitwise equal sums. */
#define Q8_0_BODY(b, EMIT)                                                                         \
    do {                                                                                           \
        __m512 d_ = _mm512_set1_ps(f16_at(b));                                                     \
        for (int i_ = 0; i_ < 32; i_ += 16) {                                                      \
            __m512i q_ = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((b) + 2 + i_)));  \
            EMIT(i_, _mm512_mul_ps(d_, _mm512_cvtepi32_ps(q_)));                                   \
        }                                                                                          \
    } while (0)

#define Q4_K_BODY(b, EMIT)                                                                         \
    do {                                                                                           \
        float d_ = f16_at(b), dmin_ = f16_at((b) + 2);                                             \
        const uint8_t *sc_ = (b) + 4, *qs_ = (b) + 16;                                             \
        for (int s_ = 0; s_ < 8; s_++) {                                                           \
            int scale_, min_;                                                                      \
            if (s_ < 4) {                                                                          \
                scale_ = sc_[s_] & 63;                                                             \
                min_ = sc_[s_ + 4] & 63;                                                           \
            } else {                                                                               \
                scale_ = (sc_[s_ + 4] & 15) | ((sc_[s_ - 4] >> 6) << 4);                           \
                min_ = (sc_[s_ + 4] >> 4) | ((sc_[s_] >> 6) << 4);                                 \
            }                                                                                      \
            __m512 ds_ = _mm512_set1_ps(d_ * (float)scale_);                                       \
            __m512 dm_ = _mm512_set1_ps(dmin_ * (float)min_);                                      \
            const uint8_t *q_ = qs_ + 32 * (s_ / 2);                                               \
            for (int l_ = 0; l_ < 32; l_ += 16) {                                                  \
                __m512i v_ = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q_ + l_)));    \
                v_ = s_ % 2 ? _mm512_srli_epi32(v_, 4) : _mm512_and_si512(v_, _mm512_set1_epi32(15)); \
                EMIT(32 * s_ + l_, _mm512_fmsub_ps(ds_, _mm512_cvtepi32_ps(v_), dm_));             \
            }                                                                                      \
        }                                                                                          \
    } while (0)

#define Q6_K_BODY(b, EMIT)                                                                         \
    do {                                                                                           \
        const uint8_t *ql_ = (b), *qh_ = (b) + 128;                                                \
        const int8_t *sc_ = (const int8_t *)((b) + 192);                                           \
        float d_ = f16_at((b) + 208);                                                              \
        for (int h_ = 0; h_ < 2; h_++)                                                             \
            for (int t_ = 0; t_ < 4; t_++)                                                         \
                for (int l_ = 0; l_ < 32; l_ += 16) {                                              \
                    __m512i lo_ = _mm512_cvtepu8_epi32(                                            \
                        _mm_loadu_si128((const __m128i *)(ql_ + 64 * h_ + 32 * (t_ & 1) + l_)));   \
                    lo_ = t_ < 2 ? _mm512_and_si512(lo_, _mm512_set1_epi32(15))                    \
                                 : _mm512_srli_epi32(lo_, 4);                                      \
                    __m512i hi_ = _mm512_cvtepu8_epi32(                                            \
                        _mm_loadu_si128((const __m128i *)(qh_ + 32 * h_ + l_)));                   \
                    hi_ = _mm512_and_si512(_mm512_srli_epi32(hi_, (unsigned)(2 * t_)),             \
                                           _mm512_set1_epi32(3));                                  \
                    __m512i q_ = _mm512_sub_epi32(_mm512_or_si512(lo_, _mm512_slli_epi32(hi_, 4)), \
                                                  _mm512_set1_epi32(32));                          \
                    int j_ = 128 * h_ + 32 * t_ + l_;                                              \
                    EMIT(j_, _mm512_mul_ps(_mm512_set1_ps(d_ * (float)sc_[j_ / 16]),               \
                                           _mm512_cvtepi32_ps(q_)));                               \
                }                                                                                  \
    } while (0)

#define STORE(j, v) _mm512_store_ps(y + (j), (v))
#define FMA(j, v) a = _mm512_fmadd_ps((v), _mm512_loadu_ps(x + (j)), a)

static void dq_q8_0(const uint8_t *b, float *y) { Q8_0_BODY(b, STORE); }
static void dq_q4_k(const uint8_t *b, float *y) { Q4_K_BODY(b, STORE); }
static void dq_q6_k(const uint8_t *b, float *y) { Q6_K_BODY(b, STORE); }

static inline __m512 fma_q8_0(const uint8_t *b, const float *x, __m512 a)
{
    Q8_0_BODY(b, FMA);
    return a;
}

/* Q4_K and Q6_K blocks hold 16 vectors: their decode interleaves the four rows vector by vector
 * (a block's worth of one row's dependent FMAs in a row would stall on the chain). */
static inline int k4_scale(const uint8_t *sc, int s, int *min)
{
    if (s < 4) {
        *min = sc[s + 4] & 63;
        return sc[s] & 63;
    }
    *min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    return (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
}

static void decode4_q4_k(const uint8_t *row[4], const float *x, int64_t cols, __m512 a[4])
{
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int64_t k0 = 0; k0 < cols; k0 += 256) {
        __m512 ds[4][8], dm[4][8];
        for (int r = 0; r < 4; r++) {
            const uint8_t *b = row[r];
            _mm_prefetch((const char *)(b + 4 * 144), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + 4 * 144 + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + 4 * 144 + 128), _MM_HINT_T0);
            float d = f16_at(b), dmin = f16_at(b + 2);
            for (int s = 0; s < 8; s++) {
                int mn, sc = k4_scale(b + 4, s, &mn);
                ds[r][s] = _mm512_set1_ps(d * (float)sc);
                dm[r][s] = _mm512_set1_ps(dmin * (float)mn);
            }
        }
        for (int s = 0; s < 8; s++)
            for (int l = 0; l < 32; l += 16) {
                __m512 xv = _mm512_loadu_ps(x + k0 + 32 * s + l);
                for (int r = 0; r < 4; r++) {
                    __m512i v = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128((const __m128i *)(row[r] + 16 + 32 * (s / 2) + l)));
                    v = s % 2 ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, m15);
                    a[r] = _mm512_fmadd_ps(_mm512_fmsub_ps(ds[r][s], _mm512_cvtepi32_ps(v), dm[r][s]),
                                           xv, a[r]);
                }
            }
        for (int r = 0; r < 4; r++) row[r] += 144;
    }
}

static void decode4_q6_k(const uint8_t *row[4], const float *x, int64_t cols, __m512 a[4])
{
    const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3),
                  k32 = _mm512_set1_epi32(32);
    for (int64_t k0 = 0; k0 < cols; k0 += 256) {
        float d[4];
        for (int r = 0; r < 4; r++) {
            for (int c = 0; c < 210; c += 64)
                _mm_prefetch((const char *)(row[r] + 4 * 210 + c), _MM_HINT_T0);
            d[r] = f16_at(row[r] + 208);
        }
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 4; t++)
                for (int l = 0; l < 32; l += 16) {
                    int j = 128 * h + 32 * t + l;
                    __m512 xv = _mm512_loadu_ps(x + k0 + j);
                    for (int r = 0; r < 4; r++) {
                        const uint8_t *b = row[r];
                        __m512i lo = _mm512_cvtepu8_epi32(
                            _mm_loadu_si128((const __m128i *)(b + 64 * h + 32 * (t & 1) + l)));
                        lo = t < 2 ? _mm512_and_si512(lo, m15) : _mm512_srli_epi32(lo, 4);
                        __m512i hi = _mm512_cvtepu8_epi32(
                            _mm_loadu_si128((const __m128i *)(b + 128 + 32 * h + l)));
                        hi = _mm512_and_si512(_mm512_srli_epi32(hi, (unsigned)(2 * t)), m3);
                        __m512i q = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)),
                                                     k32);
                        __m512 scale = _mm512_set1_ps(d[r] * (float)((const int8_t *)(b + 192))[j / 16]);
                        a[r] = _mm512_fmadd_ps(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(q)), xv, a[r]);
                    }
                }
        for (int r = 0; r < 4; r++) row[r] += 210;
    }
}

/* Q8_0 decode: two vectors per block, so each row's block goes straight into its chain. */
static void decode4_q8_0(const uint8_t *row[4], const float *x, int64_t cols, __m512 a[4])
{
    for (int64_t k0 = 0; k0 < cols; k0 += 32)
        for (int r = 0; r < 4; r++) {
            _mm_prefetch((const char *)(row[r] + 8 * 34), _MM_HINT_T0);
            a[r] = fma_q8_0(row[r], x + k0, a[r]);
            row[r] += 34;
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
    if (n == 1 && qk_act_int8() && qk_gq8_supported(w)) { /* decode with int8 activations */
        qk_gmatvec_q8_vnni(w, row_begin, row_end, x, y);
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
            if (type == QMIX_GGML_Q8_0) {
                decode4_q8_0(row, x, w->cols, a);
            } else if (type == QMIX_GGML_Q4_K) {
                decode4_q4_k(row, x, w->cols, a);
            } else if (type == QMIX_GGML_Q6_K) {
                decode4_q6_k(row, x, w->cols, a);
            } else {
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

/* AVX-512 VNNI ggml block-format matrix × int8 vector (decode; reference: gmatvec_q8.c).
 * Per weight block the codes are unpacked to unsigned bytes with a few masks and shifts (no
 * dequantization to float), vpdpbusd multiplies them with int8 activations 64 at a time into
 * int32 lanes of 4 products, and one convert and one FMA per 64 weights applies the float factor
 * of each lane (sub-block scale × activation block scale). x is laid out once per call to match
 * each format's unpacked byte order, so the weight side never shuffles bytes:
 *   Q4_K/Q5_K: the low nibbles of 64 code bytes are sub-blocks s and s+2, the high nibbles s+1
 *              and s+3, so x is stored per super-block in sub-block order 0,2,1,3,4,6,5,7;
 *   Q6_K:      ql's nibbles with qh's bit pairs give 64 consecutive elements per vector;
 *   Q8_0:      two blocks per vector, x in natural order;
 *   Q4_0/Q5_0: four blocks' 16 code bytes side by side: the low nibbles are elements 0..15 of
 *              each block, the high ones 16..31, and x is stored so per four blocks.
 * Q6_K codes (0..63 for q − 32), Q4_0/Q5_0 codes (q − 8 / q − 16) and Q8_0 codes (int8, made unsigned by flipping the sign bit, so
 * q + 128) are offset; the offset times Σxq of each lane is precomputed and seeds the
 * accumulator. Decode runs four rows at once: the x vectors are loaded once for them and four
 * independent FMA chains hide the latency. */
#include <immintrin.h>
#include <string.h>

#include "kernels/kernels_impl.h"
#include "quant/ggml_blocks.h"

#define MAXC QK_Q8_MAX_COLS

/* The activation side, kept per thread and reused while calls bring the same x (compared
 * exactly), as in qmatvec_q8_vnni.c: a decode step's matmul is split into many row tasks. */
typedef struct gxcache {
    int64_t cols;
    float x[MAXC];
    int8_t xq[MAXC] __attribute__((aligned(64)));  /* natural order */
    int8_t xq4[MAXC] __attribute__((aligned(64))); /* Q4_K/Q5_K sub-block order */
    float info[MAXC / 256 * 16] __attribute__((aligned(64))); /* per super-block: d_b ×8, Σx ×8 */
    float dl[MAXC / 4] __attribute__((aligned(64)));          /* d_b of each 4-element lane */
    int32_t n32[MAXC / 4] __attribute__((aligned(64)));       /* −32·Σxq of each lane */
    int8_t xq0[MAXC] __attribute__((aligned(64)));  /* Q4_0/Q5_0 order */
    float dl0[MAXC / 8] __attribute__((aligned(64)));   /* per 4 blocks: d_b of lane l's block */
    int32_t n8[MAXC / 4] __attribute__((aligned(64)));  /* −8·Σxq of each lane of xq0 */
} gxcache;

static _Thread_local gxcache cache;

static void prepare(gxcache *c, const float *x, int64_t cols)
{
    static const int order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    float d[MAXC / 32], bsum[MAXC / 32];
    qk_quantize_x_q8(x, cols, 32, c->xq, d, bsum);
    for (int64_t i = 0; i < cols / 4; i++) {
        int32_t s = 0;
        for (int k = 0; k < 4; k++) s += c->xq[4 * i + k];
        c->n32[i] = -32 * s;
        c->dl[i] = d[i / 8];
    }
    for (int64_t sb = 0; sb < cols / 256; sb++) {
        for (int p = 0; p < 8; p++)
            memcpy(c->xq4 + 256 * sb + 32 * p, c->xq + 256 * sb + 32 * order[p], 32);
        for (int j = 0; j < 8; j++) {
            c->info[16 * sb + j] = d[8 * sb + j];
            c->info[16 * sb + 8 + j] = bsum[8 * sb + j];
        }
    }
    for (int64_t g = 0; g < cols / 128; g++)
        for (int k = 0; k < 4; k++) {
            memcpy(c->xq0 + 128 * g + 16 * k, c->xq + 128 * g + 32 * k, 16);
            memcpy(c->xq0 + 128 * g + 64 + 16 * k, c->xq + 128 * g + 32 * k + 16, 16);
            for (int l = 0; l < 4; l++) c->dl0[16 * g + 4 * k + l] = d[4 * g + k];
        }
    for (int64_t i = 0; i < cols / 128 * 32; i++) {
        int32_t s = 0;
        for (int k = 0; k < 4; k++) s += c->xq0[4 * i + k];
        c->n8[i] = -8 * s;
    }
    memcpy(c->x, x, (size_t)cols * sizeof *x);
    c->cols = cols;
}

/* Per-half 16-bit shift counts: lanes 0..15 get a, 16..31 get b. */
static inline __m512i halves16(int a, int b)
{
    return _mm512_inserti64x4(_mm512_set1_epi16((short)a), _mm256_set1_epi16((short)b), 1);
}

/* Lane l of the result picks element lo (l < 8) or hi (l ≥ 8). */
static inline __m512i pick(int lo, int hi)
{
    return _mm512_inserti64x4(_mm512_set1_epi32(lo), _mm256_set1_epi32(hi), 1);
}

static inline __attribute__((always_inline)) void k4_rows(int R, int q5, const uint8_t *row0,
                                                          size_t rb, int64_t nsb,
                                                          const gxcache *c, float *out)
{
    const size_t bb = q5 ? 176 : 144;
    const __m512i m4 = _mm512_set1_epi8(0x0f), m10 = _mm512_set1_epi8(0x10);
    /* the factor lanes of the four code vectors: sub-blocks (0|2), (1|3), (4|6), (5|7) */
    const __m512i p0 = pick(0, 2), p1 = pick(1, 3), p2 = pick(4, 6), p3 = pick(5, 7);
    const __m512i dsel = pick(0, 1);
    /* Q5_K: bit s of qh[l] is bit 4 of sub-block s's code l; moved there by 16-bit shifts of at
     * most 4 left / 3 right, which never carry a bit across the byte border into bit 4 */
    const __m512i c0 = halves16(4, 2), c1 = halves16(3, 1), c2 = halves16(0, 2),
                  c3 = halves16(1, 3);
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const int8_t *xs = c->xq4 + 256 * sb;
        const __m512i x0 = _mm512_load_si512(xs), x1 = _mm512_load_si512(xs + 64),
                      x2 = _mm512_load_si512(xs + 128), x3 = _mm512_load_si512(xs + 192);
        const __m512 xi = _mm512_load_ps(c->info + 16 * sb);
        for (int r = 0; r < R; r++) {
            const uint8_t *b = row0 + (size_t)r * rb + (size_t)sb * bb;
            _mm_prefetch((const char *)(b + 4 * bb), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + 4 * bb + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + 4 * bb + 128), _MM_HINT_T0);
            /* the eight 6-bit scales and mins (§5.3 layout) as bytes, four at a time */
            uint32_t a, m, h, dw;
            memcpy(&dw, b, 4);
            memcpy(&a, b + 4, 4);
            memcpy(&m, b + 8, 4);
            memcpy(&h, b + 12, 4);
            uint32_t s03 = a & 0x3f3f3f3fu, m03 = m & 0x3f3f3f3fu;
            uint32_t s47 = (h & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);
            uint32_t m47 = ((h >> 4) & 0x0f0f0f0fu) | ((m >> 2) & 0x30303030u);
            __m512 fsm = _mm512_cvtepi32_ps(
                _mm512_cvtepu8_epi32(_mm_set_epi32((int)m47, (int)m03, (int)s47, (int)s03)));
            __m512 dd = _mm512_permutexvar_ps(
                dsel, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dw))));
            /* lanes 0..7: d·sc_j·d_b, lanes 8..15: dmin·m_j·Σx of sub-block j */
            const __m512 f = _mm512_mul_ps(_mm512_mul_ps(fsm, dd), xi);
            const uint8_t *qs = b + (q5 ? 48 : 16);
            __m512i q0 = _mm512_loadu_si512(qs), q1 = _mm512_loadu_si512(qs + 64);
            __m512i w0 = _mm512_and_si512(q0, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
            __m512i w2 = _mm512_and_si512(q1, m4), w3 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
            if (q5) {
                __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
                w0 = _mm512_or_si512(w0, _mm512_and_si512(_mm512_sllv_epi16(hb, c0), m10));
                w1 = _mm512_or_si512(w1, _mm512_and_si512(_mm512_sllv_epi16(hb, c1), m10));
                w2 = _mm512_or_si512(w2, _mm512_and_si512(_mm512_srlv_epi16(hb, c2), m10));
                w3 = _mm512_or_si512(w3, _mm512_and_si512(_mm512_srlv_epi16(hb, c3), m10));
            }
            const __m512i z = _mm512_setzero_si512();
            __m512 s = acc[r];
            s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, w0, x0)),
                                _mm512_permutexvar_ps(p0, f), s);
            s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, w1, x1)),
                                _mm512_permutexvar_ps(p1, f), s);
            s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, w2, x2)),
                                _mm512_permutexvar_ps(p2, f), s);
            s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, w3, x3)),
                                _mm512_permutexvar_ps(p3, f), s);
            acc[r] = _mm512_mask_sub_ps(s, 0xff00, s, f); /* − dmin·m_j·Σx */
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

static inline __attribute__((always_inline)) void q6_rows(int R, const uint8_t *row0, size_t rb,
                                                          int64_t nsb, const gxcache *c,
                                                          float *out)
{
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    /* qh's bit pair t of byte l belongs to code (t, l); for the low-nibble vector (t = 0 | 1)
     * (qh << 4 − 2t) & 0x30 puts it at bits 4–5, for the high one (t = 2 | 3) (qh >> 2t − 4) */
    const __m512i ca = halves16(4, 2), cb = halves16(0, 2);
    /* vector v holds elements 64v..64v+63: lane l's sub-block of 16 is 4v + l/4 */
    __m512i pv[4];
    for (int v = 0; v < 4; v++) {
        int32_t ix[16];
        for (int l = 0; l < 16; l++) ix[l] = 4 * v + l / 4;
        pv[v] = _mm512_loadu_si512(ix);
    }
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512i xv[4], iv[4];
        __m512 dl[4];
        for (int v = 0; v < 4; v++) {
            xv[v] = _mm512_load_si512(c->xq + 256 * sb + 64 * v);
            iv[v] = _mm512_load_si512(c->n32 + 64 * sb + 16 * v);
            dl[v] = _mm512_load_ps(c->dl + 64 * sb + 16 * v);
        }
        for (int r = 0; r < R; r++) {
            const uint8_t *b = row0 + (size_t)r * rb + (size_t)sb * 210;
            for (int k = 0; k < 256; k += 64)
                _mm_prefetch((const char *)(b + 4 * 210 + k), _MM_HINT_T0);
            uint16_t hd;
            memcpy(&hd, b + 208, 2);
            const __m512 fsc = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192)))),
                _mm512_set1_ps(_cvtsh_ss(hd)));
            __m512 s = acc[r];
            for (int hh = 0; hh < 2; hh++) {
                __m512i lq = _mm512_loadu_si512(b + 64 * hh);
                __m512i hq = _mm512_broadcast_i64x4(
                    _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * hh)));
                __m512i wa = _mm512_or_si512(_mm512_and_si512(lq, m4),
                                             _mm512_and_si512(_mm512_sllv_epi16(hq, ca), m30));
                __m512i wb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lq, 4), m4),
                                             _mm512_and_si512(_mm512_srlv_epi16(hq, cb), m30));
                const int va = 2 * hh, vb = 2 * hh + 1;
                s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(iv[va], wa, xv[va])),
                                    _mm512_mul_ps(_mm512_permutexvar_ps(pv[va], fsc), dl[va]), s);
                s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(iv[vb], wb, xv[vb])),
                                    _mm512_mul_ps(_mm512_permutexvar_ps(pv[vb], fsc), dl[vb]), s);
            }
            acc[r] = s;
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

static inline __attribute__((always_inline)) void q80_rows(int R, const uint8_t *row0, size_t rb,
                                                           int64_t cols, const gxcache *c,
                                                           float *out)
{
    const __m512i sign = _mm512_set1_epi8((char)0x80), dsel = pick(0, 1);
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t v = 0; v < cols / 64; v++) {
        const __m512i xv = _mm512_load_si512(c->xq + 64 * v);
        const __m512i iv = _mm512_slli_epi32(_mm512_load_si512(c->n32 + 16 * v), 2); /* −128·Σ */
        const __m512 dl = _mm512_load_ps(c->dl + 16 * v);
        for (int r = 0; r < R; r++) {
            const uint8_t *p = row0 + (size_t)r * rb + (size_t)v * 68;
            _mm_prefetch((const char *)(p + 8 * 68), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + 8 * 68 + 64), _MM_HINT_T0);
            __m512i wq = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2))),
                _mm256_loadu_si256((const __m256i *)(p + 36)), 1);
            __m512i isum = _mm512_dpbusd_epi32(iv, _mm512_xor_si512(wq, sign), xv);
            uint16_t h0, h1;
            memcpy(&h0, p, 2);
            memcpy(&h1, p + 34, 2);
            __m512 dd = _mm512_permutexvar_ps(
                dsel, _mm512_castps128_ps512(
                          _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | (uint32_t)h1 << 16)))));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dd, dl), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

static inline __attribute__((always_inline)) void q40_rows(int R, int q5, const uint8_t *row0,
                                                           size_t rb, int64_t cols,
                                                           const gxcache *c, float *out)
{
    const size_t bb = q5 ? 22 : 18, qoff = q5 ? 6 : 2;
    const __m512i m4 = _mm512_set1_epi8(0x0f), k16 = _mm512_set1_epi8(0x10);
    int32_t ix[16];
    for (int l = 0; l < 16; l++) ix[l] = l / 4;
    const __m512i blk = _mm512_loadu_si512(ix); /* lane l of either code vector: block l/4 */
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < cols / 128; g++) {
        const __m512i x0 = _mm512_load_si512(c->xq0 + 128 * g),
                      x1 = _mm512_load_si512(c->xq0 + 128 * g + 64);
        /* both vectors' lanes map to the same blocks, so one chain takes both offsets */
        __m512i init = _mm512_add_epi32(_mm512_load_si512(c->n8 + 32 * g),
                                        _mm512_load_si512(c->n8 + 32 * g + 16));
        if (q5) init = _mm512_slli_epi32(init, 1); /* −16·Σ */
        const __m512 dl = _mm512_load_ps(c->dl0 + 16 * g);
        for (int r = 0; r < R; r++) {
            const uint8_t *p = row0 + (size_t)r * rb + (size_t)g * 4 * bb;
            _mm_prefetch((const char *)(p + 8 * bb), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + 8 * bb + 64), _MM_HINT_T0);
            __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + qoff)));
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + bb + qoff)), 1);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * bb + qoff)), 2);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * bb + qoff)), 3);
            __m512i w0 = _mm512_and_si512(v, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            uint16_t h[4];
            for (int k = 0; k < 4; k++) memcpy(&h[k], p + (size_t)k * bb, 2);
            if (q5) { /* qh bit j is bit 4 of code j: byte masks straight from the bits */
                uint64_t mlo = 0, mhi = 0;
                for (int k = 0; k < 4; k++) {
                    uint32_t qh;
                    memcpy(&qh, p + (size_t)k * bb + 2, 4);
                    mlo |= (uint64_t)(qh & 0xffffu) << (16 * k);
                    mhi |= (uint64_t)(qh >> 16) << (16 * k);
                }
                            w0 = _mm512_mask_add_epi8(w0, (__mmask64)mlo, w0, k16);
                w1 = _mm512_mask_add_epi8(w1, (__mmask64)mhi, w1, k16);
            }
            __m512i isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, w0, x0), w1, x1);
            __m128 d4 = _mm_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2],
                                                    (short)h[3], 0, 0, 0, 0));
            __m512 f = _mm512_mul_ps(_mm512_permutexvar_ps(blk, _mm512_castps128_ps512(d4)), dl);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), f, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

typedef void (*rows_fn)(const uint8_t *row0, size_t rb, int64_t cols, const gxcache *c,
                        float *out);

#define ROWS(NAME, R, CALL)                                                                      \
    static void NAME##_##R(const uint8_t *row0, size_t rb, int64_t cols, const gxcache *c,      \
                           float *out)                                                          \
    {                                                                                            \
        CALL;                                                                                    \
    }
ROWS(q4k, 4, k4_rows(4, 0, row0, rb, cols / 256, c, out))
ROWS(q4k, 1, k4_rows(1, 0, row0, rb, cols / 256, c, out))
ROWS(q5k, 4, k4_rows(4, 1, row0, rb, cols / 256, c, out))
ROWS(q5k, 1, k4_rows(1, 1, row0, rb, cols / 256, c, out))
ROWS(q6k, 4, q6_rows(4, row0, rb, cols / 256, c, out))
ROWS(q6k, 1, q6_rows(1, row0, rb, cols / 256, c, out))
ROWS(q80, 4, q80_rows(4, row0, rb, cols, c, out))
ROWS(q80, 1, q80_rows(1, row0, rb, cols, c, out))
ROWS(q40, 4, q40_rows(4, 0, row0, rb, cols, c, out))
ROWS(q40, 1, q40_rows(1, 0, row0, rb, cols, c, out))
ROWS(q50, 4, q40_rows(4, 1, row0, rb, cols, c, out))
ROWS(q50, 1, q40_rows(1, 1, row0, rb, cols, c, out))

void qk_gmatvec_q8_vnni(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                        float *y)
{
    if (!qk_gq8_supported(w)) {
        qk_gmatvec_q8_scalar(w, row_begin, row_end, x, y); /* NaN outputs */
        return;
    }
    const int64_t cols = w->cols;
    gxcache *c = &cache;
    if (c->cols != cols || memcmp(c->x, x, (size_t)cols * sizeof *x)) prepare(c, x, cols);
    rows_fn four, one;
    switch (w->ggml_type) {
    case QMIX_GGML_Q4_K: four = q4k_4, one = q4k_1; break;
    case QMIX_GGML_Q5_K: four = q5k_4, one = q5k_1; break;
    case QMIX_GGML_Q6_K: four = q6k_4, one = q6k_1; break;
    case QMIX_GGML_Q4_0: four = q40_4, one = q40_1; break;
    case QMIX_GGML_Q5_0: four = q50_4, one = q50_1; break;
    default: four = q80_4, one = q80_1; break;
    }
    const uint8_t *base = (const uint8_t *)w->data;
    int64_t o = row_begin;
    for (; o + 4 <= row_end; o += 4) four(base + (size_t)o * w->row_bytes, w->row_bytes, cols, c, y + o);
    for (; o < row_end; o++) one(base + (size_t)o * w->row_bytes, w->row_bytes, cols, c, y + o);
}

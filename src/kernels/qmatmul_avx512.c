/* AVX-512 quantized matmul (dtype QMIX_U32, MLX affine codes). Weights are dequantized in
 * registers straight from the mapped checkpoint, 16 codes at a time: the 2·bits bytes holding
 * them are broadcast to the four 128-bit lanes, one pshufb gathers the (at most two) bytes of
 * each code into its 32-bit lane, a variable shift and a mask extract it, and w = q·s + β (one
 * FMA with the group's scale and bias) feeds the same register tiles as the dense kernel: up to
 * 4 rows × 4 tokens, 8 rows × 1 token for decode with the next block of rows prefetched.
 * Scales and biases are widened 16 groups at a time. Each output is accumulated in the same
 * order whatever the tile, so row and token splits are exact. */
#include <immintrin.h>
#include <string.h>

#include "kernels/kernels_impl.h"

#define LANES 16

/* For lane i of a chunk of 16 codes of b bits: pshufb indexes of the bytes holding code i (the
 * second only when the code crosses a byte boundary) and the right shift inside them. */
#define IX(i, b)                                                                                 \
    (uint8_t)(((i) * (b)) >> 3),                                                                 \
        (uint8_t)(((((i) * (b)) & 7) + (b) > 8) ? (((i) * (b)) >> 3) + 1 : 0x80), 0x80, 0x80
#define IX16(b)                                                                                  \
    {IX(0, b),  IX(1, b),  IX(2, b),  IX(3, b),  IX(4, b),  IX(5, b),  IX(6, b),  IX(7, b),      \
     IX(8, b),  IX(9, b),  IX(10, b), IX(11, b), IX(12, b), IX(13, b), IX(14, b), IX(15, b)}
#define SH16(b)                                                                                  \
    {(0 * (b)) & 7,  (1 * (b)) & 7,  (2 * (b)) & 7,  (3 * (b)) & 7,  (4 * (b)) & 7,              \
     (5 * (b)) & 7,  (6 * (b)) & 7,  (7 * (b)) & 7,  (8 * (b)) & 7,  (9 * (b)) & 7,              \
     (10 * (b)) & 7, (11 * (b)) & 7, (12 * (b)) & 7, (13 * (b)) & 7, (14 * (b)) & 7,             \
     (15 * (b)) & 7}

static const uint8_t ix_tab[9][64] __attribute__((aligned(64))) = {
    [2] = IX16(2), [3] = IX16(3), [4] = IX16(4), [5] = IX16(5), [6] = IX16(6), [8] = IX16(8)};
static const uint32_t sh_tab[9][16] __attribute__((aligned(64))) = {
    [2] = SH16(2), [3] = SH16(3), [4] = SH16(4), [5] = SH16(5), [6] = SH16(6), [8] = SH16(8)};

/* Widens cnt ≤ 16 consecutive scales (or biases) of dtype dt to out[0..16). */
static inline __attribute__((always_inline)) void load16(const uint8_t *p, int cnt, qmix_dtype dt,
                                                         float *out)
{
    __mmask16 m = (__mmask16)((1u << cnt) - 1);
    __m512 v;
    if (dt == QMIX_F32) {
        v = _mm512_maskz_loadu_ps(m, p);
    } else {
        __m256i h = _mm256_maskz_loadu_epi16(m, p);
        v = dt == QMIX_F16 ? _mm512_cvtph_ps(h)
                           : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    _mm512_storeu_ps(out, v);
}

/* GS: the group size when fixed at compile time (the decode tiles), 0 to read it from w. */
static inline __attribute__((always_inline)) void tile(int B, int GS, int R, int T,
                                                       const qk_mat *w, int64_t r0, const float *x,
                                                       int64_t ldx, float *y, int64_t ldy)
{
    const __m512i idx = _mm512_load_si512((const void *)ix_tab[B]);
    const __m512i shv = _mm512_load_si512((const void *)sh_tab[B]);
    const __m512i mask = _mm512_set1_epi32((1 << B) - 1), nib = _mm512_set1_epi32(15);
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd =
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const int64_t cols = w->cols;
    const int gs = GS ? GS : w->group_size;
    const int64_t ng = cols / gs;
    const size_t rb = w->row_bytes, srb = w->scale_row_bytes;
    const qmix_dtype sdt = w->scale_dtype;
    const size_t sesz = sdt == QMIX_F32 ? 4 : 2;
    const size_t gbytes = (size_t)gs * B / 8, cbytes = 2 * (size_t)B;
    const size_t code_bytes = (size_t)cols * B / 8;
    const uint8_t *codes = (const uint8_t *)w->data + (size_t)r0 * rb;
    const uint8_t *sp = (const uint8_t *)w->scales + (size_t)r0 * srb;
    const uint8_t *bp = (const uint8_t *)w->biases + (size_t)r0 * srb;

    /* Groups whose 16-byte loads all stay inside the row; the rest go through a padded copy. */
    int64_t safe = ng;
    while (safe > 0 && (size_t)safe * gbytes - cbytes + 16 > code_bytes) safe--;
    uint8_t pad[8][128 + 16];

    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < ng; g0 += 16) {
        /* the scales and biases of the next 16 groups of each row, widened once */
        const int cnt = ng - g0 < 16 ? (int)(ng - g0) : 16;
        float sf[8][16], bf[8][16];
        for (int r = 0; r < R; r++) {
            load16(sp + (size_t)r * srb + (size_t)g0 * sesz, cnt, sdt, sf[r]);
            load16(bp + (size_t)r * srb + (size_t)g0 * sesz, cnt, sdt, bf[r]);
            if (T == 1) { /* decode: the next block of rows' scales and biases */
                const size_t o = (size_t)(R + r) * srb + (size_t)g0 * sesz;
                _mm_prefetch((const char *)(sp + o), _MM_HINT_T0);
                _mm_prefetch((const char *)(bp + o), _MM_HINT_T0);
                if (sesz == 4) {
                    _mm_prefetch((const char *)(sp + o + 63), _MM_HINT_T0);
                    _mm_prefetch((const char *)(bp + o + 63), _MM_HINT_T0);
                }
            }
        }
        for (int64_t g = g0; g < g0 + cnt; g++) {
            const uint8_t *cp[8];
            if (g < safe) {
                for (int r = 0; r < R; r++) cp[r] = codes + (size_t)r * rb + (size_t)g * gbytes;
            } else {
                if (g == safe) memset(pad, 0, sizeof pad);
                for (int r = 0; r < R; r++) {
                    memcpy(pad[r], codes + (size_t)r * rb + (size_t)g * gbytes, gbytes);
                    cp[r] = pad[r];
                }
            }
            if (T == 1) /* decode: fetch the next block of rows, as the dense kernel does */
                for (int r = 0; r < R; r++) { /* each row offset ≡ 0 mod 64 once */
                    const uint8_t *nx = codes + (size_t)(R + r) * rb;
                    const size_t end = (size_t)(g + 1) * gbytes;
                    for (size_t o = ((size_t)g * gbytes + 63) / 64 * 64; o < end; o += 64)
                        _mm_prefetch((const char *)(nx + o), _MM_HINT_T0);
                }
            if (B == 4 && gs >= 64) {
                /* 4 bits, groups of 64 or 128: 32 codes = 16 bytes widened one byte per lane;
                 * the low nibbles are the even codes, the high ones the odd codes, and x is
                 * split into its even and odd elements to match (fewer operations per weight
                 * than the generic extraction below; the order is the same for every tile) */
                for (int c = 0; c < gs / 32; c++) {
                    const int64_t k = g * gs + c * 32;
                    __m512 wlo[8], whi[8];
                    for (int r = 0; r < R; r++) {
                        __m512i v = _mm512_cvtepu8_epi32(
                            _mm_loadu_si128((const __m128i *)(cp[r] + (size_t)c * 16)));
                        __m512 sv = _mm512_set1_ps(sf[r][g - g0]);
                        __m512 bv = _mm512_set1_ps(bf[r][g - g0]);
                        __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_srli_epi32(v, 4);
                        wlo[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), sv, bv);
                        whi[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), sv, bv);
                    }
                    for (int t = 0; t < T; t++) {
                        __m512 x0 = _mm512_loadu_ps(x + t * ldx + k);
                        __m512 x1 = _mm512_loadu_ps(x + t * ldx + k + 16);
                        __m512 xe = _mm512_permutex2var_ps(x0, even, x1);
                        __m512 xo = _mm512_permutex2var_ps(x0, odd, x1);
                        for (int r = 0; r < R; r++) {
                            acc[r][t] = _mm512_fmadd_ps(wlo[r], xe, acc[r][t]);
                            acc[r][t] = _mm512_fmadd_ps(whi[r], xo, acc[r][t]);
                        }
                    }
                }
                continue;
            }
            for (int c = 0; c < gs / LANES; c++) {
                const int64_t k = g * gs + c * LANES;
                __m512 wv[8];
                for (int r = 0; r < R; r++) {
                    __m512i raw = _mm512_broadcast_i32x4(
                        _mm_loadu_si128((const __m128i *)(cp[r] + (size_t)c * cbytes)));
                    /* 8-bit codes come out of the shuffle clean */
                    __m512i q = _mm512_shuffle_epi8(raw, idx);
                    if (B != 8) q = _mm512_and_si512(_mm512_srlv_epi32(q, shv), mask);
                    __m512 sv = _mm512_set1_ps(sf[r][g - g0]), bv = _mm512_set1_ps(bf[r][g - g0]);
                    wv[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), sv, bv);
                }
                for (int t = 0; t < T; t++) {
                    __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
                    for (int r = 0; r < R; r++)
                        acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

typedef void (*tile_fn)(const qk_mat *w, int64_t r0, const float *x, int64_t ldx, float *y,
                        int64_t ldy);

#define TILE(B, R, T)                                                                            \
    static void tile_##B##_##R##x##T(const qk_mat *w, int64_t r0, const float *x, int64_t ldx,   \
                                     float *y, int64_t ldy)                                      \
    {                                                                                            \
        tile(B, 0, R, T, w, r0, x, ldx, y, ldy);                                                 \
    }
#define DECODE(B, GS)                                                                            \
    static void tile_##B##_8x1_g##GS(const qk_mat *w, int64_t r0, const float *x, int64_t ldx,   \
                                     float *y, int64_t ldy)                                      \
    {                                                                                            \
        tile(B, GS, 8, 1, w, r0, x, ldx, y, ldy);                                                \
    }
#define TILES(B)                                                                                 \
    TILE(B, 1, 1) TILE(B, 1, 2) TILE(B, 1, 3) TILE(B, 1, 4) TILE(B, 2, 1) TILE(B, 2, 2)          \
    TILE(B, 2, 3) TILE(B, 2, 4) TILE(B, 3, 1) TILE(B, 3, 2) TILE(B, 3, 3) TILE(B, 3, 4)          \
    TILE(B, 4, 1) TILE(B, 4, 2) TILE(B, 4, 3) TILE(B, 4, 4) DECODE(B, 32) DECODE(B, 64)         \
    DECODE(B, 128)
#define TABLE(B)                                                                                 \
    {{tile_##B##_1x1, tile_##B##_1x2, tile_##B##_1x3, tile_##B##_1x4},                          \
     {tile_##B##_2x1, tile_##B##_2x2, tile_##B##_2x3, tile_##B##_2x4},                          \
     {tile_##B##_3x1, tile_##B##_3x2, tile_##B##_3x3, tile_##B##_3x4},                          \
     {tile_##B##_4x1, tile_##B##_4x2, tile_##B##_4x3, tile_##B##_4x4}}

TILES(2)
TILES(3)
TILES(4)
TILES(5)
TILES(6)
TILES(8)

static const tile_fn tiles[9][4][4] = {[2] = TABLE(2), [3] = TABLE(3), [4] = TABLE(4),
                                       [5] = TABLE(5), [6] = TABLE(6), [8] = TABLE(8)};
#define DECODES(B) {tile_##B##_8x1_g32, tile_##B##_8x1_g64, tile_##B##_8x1_g128}
/* the decode tiles by bits and group size (32, 64, 128) */
static const tile_fn tiles8x1[9][3] = {[2] = DECODES(2), [3] = DECODES(3), [4] = DECODES(4),
                                       [5] = DECODES(5), [6] = DECODES(6), [8] = DECODES(8)};

void qk_qmatmul_avx512(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
                       int n, int64_t ldx, float *y, int64_t ldy)
{
    if (!qk_qmat_valid(w)) {
        qk_qmatmul_scalar(w, row_begin, row_end, x, n, ldx, y, ldy);
        return;
    }
    const int B = w->bits, gi = w->group_size == 32 ? 0 : w->group_size == 64 ? 1 : 2;
    for (int t0 = 0; t0 < n; t0 += QK_TOKEN_CHUNK) {
        int tn = n - t0 < QK_TOKEN_CHUNK ? n - t0 : QK_TOKEN_CHUNK;
        const float *xc = x + (int64_t)t0 * ldx;
        float *yc = y + (int64_t)t0 * ldy;
        int64_t r = row_begin;
        if (tn == 1 && qk_act_int8() && qk_q8_supported(w)) {
            if (B == 2 || B == 4 || B == 8) {
                qk_qmatvec_q8_vnni(w, row_begin, row_end, xc, yc);
                continue;
            }
            if (qk_act_int8_vbmi() && w->cols % 64 == 0) {
                qk_qmatvec_q8_vbmi(w, row_begin, row_end, xc, yc);
                continue;
            }
        }
        if (tn == 1) /* decode: more rows in flight to keep memory busy */
            for (; r + 8 <= row_end; r += 8) tiles8x1[B][gi](w, r, xc, ldx, yc + r, ldy);
        for (; r < row_end; r += 4) {
            int R = row_end - r < 4 ? (int)(row_end - r) : 4;
            for (int t = 0; t < tn; t += 4) {
                int T = tn - t < 4 ? tn - t : 4;
                tiles[B][R - 1][T - 1](w, r, xc + (int64_t)t * ldx, ldx,
                                       yc + (int64_t)t * ldy + r, ldy);
            }
        }
    }
}

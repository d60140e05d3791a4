/* AVX2 quantized matmul (dtype QMIX_U32, MLX affine codes), the AVX-512 kernel's scheme on 8
 * lanes: the (bits ≤ 8) bytes holding 8 codes are broadcast to every 64-bit lane, one pshufb
 * gathers the bytes of each code into its 32-bit lane, a variable shift and a mask extract it,
 * and w = q·s + β feeds register tiles of up to 4 rows × 2 tokens (8 × 1 for decode, with the
 * next block of rows prefetched). Scales and biases are widened 16 groups at a time. Each output
 * is accumulated in the same order whatever the tile, so row and token splits are exact. */
#include <immintrin.h>
#include <string.h>

#include "kernels/kernels_impl.h"

#define LANES 8

/* For lane i of a chunk of 8 codes of b bits: pshufb indexes of the bytes holding code i (the
 * second only when the code crosses a byte boundary) and the right shift inside them. */
#define IX(i, b)                                                                                 \
    (uint8_t)(((i) * (b)) >> 3),                                                                 \
        (uint8_t)(((((i) * (b)) & 7) + (b) > 8) ? (((i) * (b)) >> 3) + 1 : 0x80), 0x80, 0x80
#define IX8(b) {IX(0, b), IX(1, b), IX(2, b), IX(3, b), IX(4, b), IX(5, b), IX(6, b), IX(7, b)}
#define SH8(b)                                                                                   \
    {(0 * (b)) & 7, (1 * (b)) & 7, (2 * (b)) & 7, (3 * (b)) & 7,                                 \
     (4 * (b)) & 7, (5 * (b)) & 7, (6 * (b)) & 7, (7 * (b)) & 7}

static const uint8_t ix_tab[9][32] __attribute__((aligned(32))) = {
    [2] = IX8(2), [3] = IX8(3), [4] = IX8(4), [5] = IX8(5), [6] = IX8(6), [8] = IX8(8)};
static const uint32_t sh_tab[9][8] __attribute__((aligned(32))) = {
    [2] = SH8(2), [3] = SH8(3), [4] = SH8(4), [5] = SH8(5), [6] = SH8(6), [8] = SH8(8)};

/* Widens cnt ≤ 16 consecutive scales (or biases) of dtype dt to out[0..16). */
static inline __attribute__((always_inline)) void load16(const uint8_t *p, int cnt, qmix_dtype dt,
                                                         float *out)
{
    if (dt == QMIX_F32) {
        memcpy(out, p, (size_t)cnt * 4);
        return;
    }
    uint16_t h[16] = {0};
    memcpy(h, p, (size_t)cnt * 2);
    for (int i = 0; i < 16; i += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(h + i));
        __m256 f = dt == QMIX_F16
                       ? _mm256_cvtph_ps(v)
                       : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
        _mm256_storeu_ps(out + i, f);
    }
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* GS: the group size when fixed at compile time (the decode tiles), 0 to read it from w. */
static inline __attribute__((always_inline)) void tile(int B, int GS, int R, int T,
                                                       const qk_mat *w, int64_t r0, const float *x,
                                                       int64_t ldx, float *y, int64_t ldy)
{
    const __m256i idx = _mm256_load_si256((const __m256i *)ix_tab[B]);
    const __m256i shv = _mm256_load_si256((const __m256i *)sh_tab[B]);
    const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
    const int64_t cols = w->cols;
    const int gs = GS ? GS : w->group_size;
    const int64_t ng = cols / gs;
    const size_t rb = w->row_bytes, srb = w->scale_row_bytes;
    const qmix_dtype sdt = w->scale_dtype;
    const size_t sesz = sdt == QMIX_F32 ? 4 : 2;
    const size_t gbytes = (size_t)gs * B / 8, cbytes = (size_t)B;
    const size_t code_bytes = (size_t)cols * B / 8;
    const uint8_t *codes = (const uint8_t *)w->data + (size_t)r0 * rb;
    const uint8_t *sp = (const uint8_t *)w->scales + (size_t)r0 * srb;
    const uint8_t *bp = (const uint8_t *)w->biases + (size_t)r0 * srb;

    /* Groups whose 8-byte loads all stay inside the row; the rest go through a padded copy. */
    int64_t safe = ng;
    while (safe > 0 && (size_t)safe * gbytes - cbytes + 8 > code_bytes) safe--;
    uint8_t pad[8][128 + 8];

    __m256 acc[8][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
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
            for (int c = 0; c < gs / LANES; c++) {
                const int64_t k = g * gs + c * LANES;
                __m256 wv[8];
                for (int r = 0; r < R; r++) {
                    int64_t raw8;
                    memcpy(&raw8, cp[r] + (size_t)c * cbytes, 8);
                    __m256i raw = _mm256_set1_epi64x(raw8);
                    /* 8-bit codes come out of the shuffle clean */
                    __m256i q = _mm256_shuffle_epi8(raw, idx);
                    if (B != 8) q = _mm256_and_si256(_mm256_srlv_epi32(q, shv), mask);
                    __m256 sv = _mm256_set1_ps(sf[r][g - g0]), bv = _mm256_set1_ps(bf[r][g - g0]);
                    wv[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), sv, bv);
                }
                for (int t = 0; t < T; t++) {
                    __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
                    for (int r = 0; r < R; r++)
                        acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[t * ldy + r] = hsum(acc[r][t]);
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
    TILE(B, 1, 1) TILE(B, 1, 2) TILE(B, 2, 1) TILE(B, 2, 2) TILE(B, 3, 1) TILE(B, 3, 2)          \
    TILE(B, 4, 1) TILE(B, 4, 2) DECODE(B, 32) DECODE(B, 64) DECODE(B, 128)
#define TABLE(B)                                                                                 \
    {{tile_##B##_1x1, tile_##B##_1x2},                                                           \
     {tile_##B##_2x1, tile_##B##_2x2},                                                           \
     {tile_##B##_3x1, tile_##B##_3x2},                                                           \
     {tile_##B##_4x1, tile_##B##_4x2}}

TILES(2)
TILES(3)
TILES(4)
TILES(5)
TILES(6)
TILES(8)

static const tile_fn tiles[9][4][2] = {[2] = TABLE(2), [3] = TABLE(3), [4] = TABLE(4),
                                       [5] = TABLE(5), [6] = TABLE(6), [8] = TABLE(8)};
#define DECODES(B) {tile_##B##_8x1_g32, tile_##B##_8x1_g64, tile_##B##_8x1_g128}
/* the decode tiles by bits and group size (32, 64, 128) */
static const tile_fn tiles8x1[9][3] = {[2] = DECODES(2), [3] = DECODES(3), [4] = DECODES(4),
                                       [5] = DECODES(5), [6] = DECODES(6), [8] = DECODES(8)};

void qk_qmatmul_avx2(const qk_mat *w, int64_t row_begin, int64_t row_end, const float *x,
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
        if (tn == 1) /* decode: more rows in flight to keep memory busy */
            for (; r + 8 <= row_end; r += 8) tiles8x1[B][gi](w, r, xc, ldx, yc + r, ldy);
        for (; r < row_end; r += 4) {
            int R = row_end - r < 4 ? (int)(row_end - r) : 4;
            for (int t = 0; t < tn; t += 2) {
                int T = tn - t < 2 ? tn - t : 2;
                tiles[B][R - 1][T - 1](w, r, xc + (int64_t)t * ldx, ldx,
                                       yc + (int64_t)t * ldy + r, ldy);
            }
        }
    }
}
